"""Cost of SMH on ResNet-32 (28x28 inputs, batch 128, one CPU thread): time per training
step (forward, backward, Adam step) and per inference batch, full network vs SMH at 4x
and 10x fewer variables, inference per call vs with the cached U @ V; plus memory.

On a shared, loaded machine wall times drift, so the variants are interleaved: each
round runs every variant once, and the median over rounds is reported.

    PYTHONPATH=src .venv/bin/python benchmarks/smh_step_time.py [--rounds 7]

Writes benchmarks/results/smh_step_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import netshrink
from netshrink.layers import compressed_layers
from netshrink.methods.smh import bank_of
from netshrink_lab import zoo


def covered_values(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in
               list(model.parameters()) + list(model.buffers()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "smh_step_time.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = zoo.create("resnet32")
    n_values = covered_values(full)
    models: dict[str, nn.Module] = {"full": full}
    for factor in (4, 10):
        models[f"smh {factor}x"] = netshrink.compress(full, method="smh", init="random",
                                                      variables=n_values // factor,
                                                      min_weights=0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}
    train: dict[str, list[float]] = {k: [] for k in models}
    infer: dict[str, list[float]] = {k: [] for k in models}
    infer.update({f"{k} cached": [] for k in models if k != "full"})
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, model in models.items():
            model.train()
            t0 = time.perf_counter()
            opts[name].zero_grad()
            F.cross_entropy(model(x), y).backward()
            opts[name].step()
            if r:
                train[name].append(time.perf_counter() - t0)
            model.eval()
            modes = [(name, False)] + ([(f"{name} cached", True)] if name != "full" else [])
            for label, cached in modes:
                if name != "full":
                    bank_of(model).set_cache(cached)
                with torch.no_grad():
                    if cached:
                        model(x[:1])  # the expansion is paid once, outside the timing
                    t0 = time.perf_counter()
                    model(x)
                if r:
                    infer[label].append(time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        row: dict[str, Any] = {"model": name,
                               "train_ms": 1000 * statistics.median(train[name]),
                               "infer_ms": 1000 * statistics.median(infer[name]),
                               "param_buffer_bytes": tensor_bytes(model)}
        if name != "full":
            bank = bank_of(model)
            bank.set_cache(True)
            with torch.no_grad():
                cache = bank.full()
            row["infer_cached_ms"] = 1000 * statistics.median(infer[f"{name} cached"])
            row["cache_bytes"] = cache.numel() * cache.element_size()
            row["largest_layer_block_bytes"] = max(
                ((layer.offset + layer.size - 1) // bank.n - layer.offset // bank.n + 1)
                * bank.n * 4 for _, layer in compressed_layers(model))
            row["M"], row["n"] = bank.rank, bank.n
        rows.append(row)
    base = rows[0]
    print(f"{'model':<10} {'train ms/step':>14} {'extra':>7} {'infer ms':>9} "
          f"{'cached ms':>10} {'params+buffers B':>17} {'cache B':>9}")
    for r in rows:
        extra = r["train_ms"] / base["train_ms"] - 1
        print(f"{r['model']:<10} {r['train_ms']:>14.0f} {extra:>+7.0%} {r['infer_ms']:>9.0f} "
              f"{r.get('infer_cached_ms', float('nan')):>10.0f} "
              f"{r['param_buffer_bytes']:>17} {r.get('cache_bytes', 0):>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "rounds": args.rounds, "batch": 128,
                               "torch": torch.__version__, "machine": platform.platform()},
                              indent=1))


if __name__ == "__main__":
    main()
