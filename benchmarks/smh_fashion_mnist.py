"""ResNet-32 on Fashion-MNIST: `smh` at 4x and 10x fewer variables vs the full network vs a
width-reduced ResNet-32 of the same variable count, all at one (heavily reduced) training
budget; SMH from scratch (random U, V) vs from the pretrained ResNet-32 (SVD init, then
distillation), where "pretrained" is the full ResNet-32 trained earlier in this same run.

    PYTHONPATH=src .venv/bin/python benchmarks/smh_fashion_mnist.py \
        [--subset 10000] [--epochs 1] [--test-subset 5000] [--factors 4,10]

Every network trains for `--epochs` epochs on the same `--subset` training images
(class-stratified, seed 0), Adam 1e-3 cosine, batch 128, one CPU thread; SMH from the
pretrained model gets the same budget again on top of the full model's (distillation
weight 0.5 from it). "variables" are the covered conv/linear weights and biases (the
paper's count): N for the full and thin networks, 2 M n for SMH (plus one scalar per
layer). Accuracy on `--test-subset` test images. Also: milliseconds per training step
(wall time of the epoch / steps), and inference memory (bytes of the model's tensors, and
the transient of regenerating weights: per call vs the cached U @ V).

Writes benchmarks/results/smh_fashion_mnist.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import netshrink
from netshrink.layers import compressed_layers
from netshrink.methods.smh import bank_of
from netshrink.report import format_table
from netshrink.train import Finetune, evaluate, fit
from netshrink_lab import zoo
from netshrink_lab.data import fashion_mnist_loaders


def covered_values(model: nn.Module) -> int:
    """Conv/linear weights and biases: what SMH tiles (BatchNorm excluded)."""
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer held in memory."""
    return sum(t.numel() * t.element_size() for t in
               list(model.parameters()) + list(model.buffers()))


def thin_resnet32(variables: int, seed: int) -> tuple[nn.Module, int]:
    """The ResNet-32 with stage widths (c, 2c, 4c) whose covered values are closest to
    `variables`; returns (model, c)."""
    best = min(range(1, 17), key=lambda c: abs(covered_values(
        zoo.ResNetCifar(5, 1, 10, "A", widths=(c, 2 * c, 4 * c))) - variables))
    torch.manual_seed(seed)
    return zoo.ResNetCifar(5, 1, 10, "A", widths=(best, 2 * best, 4 * best)), best


def train(model: nn.Module, loader: Any, cfg: Finetune, teacher: nn.Module | None = None
          ) -> tuple[float, float]:
    """(seconds, ms per step) of fit on the loader."""
    t0 = time.perf_counter()
    fit(model, loader, cfg, teacher=teacher)
    seconds = time.perf_counter() - t0
    steps = math.ceil(len(loader.dataset) / 128) * cfg.epochs
    return seconds, 1000 * seconds / steps


def smh_memory(model: nn.Module) -> dict[str, int]:
    """Transient bytes of weight regeneration: per call, the largest layer's block of
    rows x n; cached, the whole n x n product (measured from the tensor built)."""
    bank = bank_of(model)
    per_call = 0
    for _, layer in compressed_layers(model):
        r0 = layer.offset // bank.n
        r1 = (layer.offset + layer.size - 1) // bank.n + 1
        per_call = max(per_call, (r1 - r0) * bank.n * 4 + layer.size * 4)
    with torch.no_grad():
        full = bank.full()
    cached = full.numel() * full.element_size()
    bank.clear_cache()
    return {"per_call_peak_bytes": per_call, "cached_bytes": cached}


def eval_timed(model: nn.Module, test: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    with torch.no_grad():  # the cache serves only computations that need no gradient
        acc = evaluate(model, test)
    return acc, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--test-subset", type=int, default=5000)
    p.add_argument("--factors", default="4,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pretrained", action="store_true",
                   help="skip the full ResNet-32 and SMH from pretrained (thin vs SMH "
                        "from scratch only)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "smh_fashion_mnist.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    loader, test = fashion_mnist_loaders(128, subset_train=args.subset,
                                         subset_test=args.test_subset, seed=args.seed)
    scratch = Finetune(epochs=args.epochs, distill_weight=0.0, seed=args.seed, progress=False)
    distil = Finetune(epochs=args.epochs, distill_weight=0.5, seed=args.seed, progress=False)
    rows: list[dict[str, Any]] = []

    torch.manual_seed(args.seed)
    full = zoo.create("resnet32")
    n_full = covered_values(full)
    if not args.no_pretrained:
        secs, ms = train(full, loader, scratch)
        acc, _ = eval_timed(full, test)
        rows.append({"model": "ResNet-32 full", "variables": n_full,
                     "trainable": trainable(full), "accuracy": acc, "ms_per_step": ms,
                     "train_s": secs, "memory_bytes": tensor_bytes(full)})
    inits = ("random",) if args.no_pretrained else ("random", "svd")

    with tempfile.TemporaryDirectory() as tmp:
        for factor in (int(f) for f in args.factors.split(",") if f.strip()):
            target = n_full // factor
            thin, c = thin_resnet32(target, args.seed)
            secs, ms = train(thin, loader, scratch)
            acc, _ = eval_timed(thin, test)
            rows.append({"model": f"thin ResNet-32 widths ({c},{2 * c},{4 * c})",
                         "factor": factor, "variables": covered_values(thin),
                         "trainable": trainable(thin), "accuracy": acc, "ms_per_step": ms,
                         "train_s": secs, "memory_bytes": tensor_bytes(thin)})

            for init in inits:
                base = full
                if init == "random":
                    torch.manual_seed(args.seed)
                    base = zoo.create("resnet32")
                small = netshrink.compress(base, method="smh", variables=target, init=init,
                                           min_weights=0, seed=args.seed)
                bank = bank_of(small)
                row: dict[str, Any] = {
                    "model": f"SMH {'from scratch' if init == 'random' else 'from pretrained'}",
                    "factor": factor, "variables": bank.variables(), "M": bank.rank,
                    "n": bank.n, "trainable": trainable(small)}
                if init == "svd":
                    row["accuracy_svd_init"] = evaluate(small, test)
                secs, ms = train(small, loader, scratch if init == "random" else distil,
                                 teacher=None if init == "random" else full)
                netshrink.get_method("smh").finalize(small, None)
                acc, eval_s = eval_timed(small, test)
                bank.cache = True
                acc_cached, eval_cached_s = eval_timed(small, test)
                bank.cache = False
                bank.clear_cache()
                path = Path(tmp) / f"smh-{init}-{factor}.nsk"
                size = netshrink.save(small, path)
                loaded = netshrink.load(path)
                x = next(iter(test))[0][:8]
                row.update({"accuracy": acc, "accuracy_cached": acc_cached,
                            "ms_per_step": ms, "train_s": secs,
                            "eval_s_per_call": eval_s, "eval_s_cached": eval_cached_s,
                            "memory_bytes": tensor_bytes(small), **smh_memory(small),
                            "file_bytes": size,
                            "reload_identical": bool(torch.equal(loaded(x), small(x)))})
                rows.append(row)
        if not args.no_pretrained:
            rows[0]["file_bytes"] = netshrink.save(full, Path(tmp) / "full.nsk")

    table = format_table(
        ["model", "factor", "variables", "trainable", "test acc", "SVD-init acc", "ms/step",
         "param+buffer bytes", "file bytes"],
        [[r["model"], r.get("factor", 1), r["variables"], r["trainable"],
          f"{r['accuracy']:.4f}",
          f"{r['accuracy_svd_init']:.4f}" if "accuracy_svd_init" in r else "-",
          f"{r['ms_per_step']:.0f}", r["memory_bytes"], r.get("file_bytes", "-")]
         for r in rows])
    print(table)
    protocol = (f"{args.epochs} epoch(s) on a {args.subset}-image class-stratified subset of "
                f"Fashion-MNIST train, batch 128, Adam 1e-3 cosine, 1 thread; accuracy on "
                f"{args.test_subset} test images" + (
                    "" if args.no_pretrained else "; SMH from pretrained: SVD init from the "
                    "full ResNet-32 trained above, then the same budget with distillation 0.5"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": protocol, "rows": rows,
                               "wall_s": time.perf_counter() - start,
                               "machine": platform.platform(),
                               "torch": torch.__version__}, indent=1))
    print(protocol)
    print(f"wall {time.perf_counter() - start:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
