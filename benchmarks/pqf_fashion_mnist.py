"""PQF ablation on the ResNet-20 Fashion-MNIST baseline (reduced protocol).

Rows at one size target (file bytes, header included): plain PQ (Lloyd k-means, 20
iterations, no permutation), + permutation, + SR-C annealing, full PQF (both); each
post-training and after the same short fine-tuning (the official recipe: Adam 1e-3, cosine
per batch to 1e-6; cross-entropy, or with --distill the foundation's distillation from the
original). "Gap closed" = (PQF - plain PQ) / (fp32 - plain PQ) after fine-tuning.

Reduced protocol (a 2-core machine shared by 5 developers): `--steps` fine-tuning steps of
batch 64 on a seeded, stratified `--train` subset of the training set; accuracy on a
seeded, stratified `--test` subset of the test set; one thread.

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_fashion_mnist.py --target x20 --block large

Writes benchmarks/results/pqf_fashion_mnist_<target>_<block>[_distill].json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import netshrink
from netshrink import zoo
from netshrink.data import fashion_mnist
from netshrink.graph import weight_layers
from netshrink.methods import get_method
from netshrink.methods.pqf import official_finetune, paper_size_bits, plan_of, search_again
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import evaluate, fit

VARIANTS = {
    "plain PQ": dict(permute=False, anneal=0),
    "+ permutation": dict(permute=True, anneal=0),
    "+ SR-C": dict(permute=False),
    "PQF (both)": dict(permute=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x20")
    p.add_argument("--block", default="large", choices=["small", "large", "auto"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train", type=int, default=9600)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--distill", action="store_true")
    p.add_argument("--anneal", type=int, default=None, help="SR-C passes (default: pqf's)")
    p.add_argument("--untrained", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if args.untrained:  # smoke test of the script only
        model = zoo.create("resnet20").eval()
    else:
        model, _ = zoo.load_baseline("resnet20")
    train = DataLoader(fashion_mnist("train", subset=args.train, seed=0), batch_size=64,
                       shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(fashion_mnist("test", subset=args.test, seed=0), batch_size=500)
    fp32_acc = evaluate(model, test)
    tune = official_finetune(epochs=1, batch_size=64, max_steps_per_epoch=args.steps,
                             distill=args.distill, progress=False)
    method = get_method("pqf")
    rows = []
    extra = {} if args.anneal is None else {"anneal": args.anneal}
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in VARIANTS.items():
            opts = {**extra, **options}
            kw = dict(block=args.block, seed=0, **opts)
            start = time.perf_counter()
            post = netshrink.compress(model, "pqf", args.target, **kw)
            post_s = time.perf_counter() - start
            perm = search_again(model, post) if opts.get("permute") else None
            plan = plan_of(post, [n for n, _ in weight_layers(model)])
            # = compress(..., data=train, finetune=tune) without encoding twice
            start = time.perf_counter()
            tuned = copy.deepcopy(post)
            fit(tuned, train, tune, teacher=model)
            method.finalize(tuned, None)
            tuned.eval()
            tune_s = time.perf_counter() - start
            path = Path(tmp) / "m.nsk"
            size = netshrink.save(tuned, path)
            assert size == path.stat().st_size
            rows.append({
                "variant": label, "options": opts, "file_bytes": size,
                "ratio": fp32_bits(model) / 8 / size,
                "paper_ratio": paper_size_bits(model) / paper_size_bits(tuned),
                "post_acc": evaluate(post, test), "tuned_acc": evaluate(tuned, test),
                "compress_s": post_s, "tune_s": tune_s,
                "perm_groups": len(perm.groups) if perm else 0,
                "perm_logdet_drop": perm.improvement if perm else 0.0,
                "perm_search_s": perm.seconds if perm else 0.0,
                "mean_sqnr_db": sum(v["sqnr_db"] for v in post.netshrink_info["layers"].values())
                / len(post.netshrink_info["layers"]),
                "plan": {k: str(v) for k, v in plan.items()},
            })
            print({k: v for k, v in rows[-1].items() if k != "plan"}, flush=True)
    plain = rows[0]["tuned_acc"]
    full = rows[-1]["tuned_acc"]
    gap = (full - plain) / (fp32_acc - plain) if fp32_acc != plain else float("nan")
    loss = "CE + distillation" if args.distill else "CE"
    print(f"ResNet-20 Fashion-MNIST, target {args.target}, block {args.block}, fine-tuning "
          f"{args.steps} steps x 64 ({loss}) on {args.train} train images; "
          f"accuracy on {args.test} test images; fp32 {fp32_acc:.4f}")
    print(format_table(
        ["variant", "file bytes", "ratio", "paper ratio", "SQNR dB", "post-training",
         "fine-tuned", "perm s"],
        [[r["variant"], r["file_bytes"], f"x{r['ratio']:.1f}", f"x{r['paper_ratio']:.1f}",
          f"{r['mean_sqnr_db']:.2f}", f"{r['post_acc']:.4f}", f"{r['tuned_acc']:.4f}",
          f"{r['perm_search_s']:.1f}"] for r in rows]))
    print(f"gap to fp32 closed by PQF over plain PQ (fine-tuned): {gap:.1%}")
    name = f"pqf_fashion_mnist_{args.target}_{args.block}{'_distill' if args.distill else ''}"
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps({
        "protocol": {"target": args.target, "block": args.block, "steps": args.steps,
                     "batch": 64, "train_subset": args.train, "test_subset": args.test,
                     "loss": loss, "threads": 1},
        "fp32_acc": fp32_acc, "gap_closed": gap, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
