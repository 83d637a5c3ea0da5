"""PQF on pretrained EfficientNet-Lite0 (ImageNet, from PyPI), post-training, at a file-size
ratio target (file bytes on disk against the fp32 state dict): with and without the
channel permutation (SR-C annealing in both). Measured: top-1 agreement and KL to the
original on scikit-image's photos (centre crops of 100% and 70%, and their mirror images:
92 views), per-layer SQNR with and without permutation, compress and permutation-search
time. `--distill N` adds N steps of distillation on unlabelled random photo views.
`--speed` times codebook learning for every layer (k=256, d=8 where it divides the rows,
else 4, 20 iterations; plain Lloyd and SR-C): faiss is compared only if it is installed.

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_efficientnet.py --target x8

Writes benchmarks/results/pqf_efficientnet_<target>[_<block>].json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.data import photo_views, random_photo_views
from netshrink.graph import weight_layers
from netshrink.kmeans import kmeans
from netshrink.layers import weight_rows
from netshrink.methods import get_method
from netshrink.methods.pqf import paper_size_bits, plan_of, search_again
from netshrink.pretrained import efficientnet_lite0
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import Finetune, fidelity, fit


def speed(model: nn.Module) -> dict:
    """Codebook learning for all conv/linear layers: our k-means (Lloyd / SR-C) vs faiss."""
    sets = []
    for _, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rows = weight_rows(m.weight.detach().float(), 0)
            d = 8 if rows.shape[1] % 8 == 0 else (4 if rows.shape[1] % 4 == 0 else 1)
            x = rows.reshape(-1, d)
            k = max(2, min(256, 2 ** int(math.floor(math.log2(max(x.shape[0] / 4, 2))))))
            sets.append((x, k))
    out = {"layers": len(sets), "subvectors": sum(len(x) for x, _ in sets)}
    for label, kw in (("netshrink lloyd 20", dict(iters=20, tol=0.0)),
                      ("netshrink SR-C I=20", dict(anneal=20))):
        start = time.perf_counter()
        mse = sum(kmeans(x, k, seed=0, init="random", **kw).inertia for x, k in sets)
        out[label] = {"seconds": time.perf_counter() - start,
                      "mse": mse / sum(x.numel() for x, _ in sets)}
    try:
        import faiss  # noqa: F401
    except ImportError:
        out["faiss"] = "not installed: comparison skipped"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x8")
    p.add_argument("--block", default="auto")
    p.add_argument("--distill", type=int, default=0, help="distillation steps (batch 8)")
    p.add_argument("--speed", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views()), batch_size=23)
    method = get_method("pqf")
    rows, sqnr = [], {}
    result: dict = {"target": args.target, "block": args.block, "views": len(views.dataset),
                    "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        for permute in (False, True):
            start = time.perf_counter()
            small = netshrink.compress(model, "pqf", args.target, block=args.block,
                                       permute=permute, min_weights=0, seed=0)
            seconds = time.perf_counter() - start
            perm = search_again(model, small) if permute else None
            path = Path(tmp) / "m.nsk"
            size = netshrink.save(small, path)
            again = netshrink.load(path, model)
            label = "PQF (permuted)" if permute else "PQ + SR-C (no permutation)"
            sqnr[label] = {k: v["sqnr_db"] for k, v in small.netshrink_info["layers"].items()}
            names = [n for n, _ in weight_layers(model)]
            plan = [str(v) for v in plan_of(small, names).values()]
            row = {"setting": label, "file_bytes": size,
                   "ratio": fp32_bits(model) / 8 / size,
                   "paper_ratio": paper_size_bits(model) / paper_size_bits(small),
                   **fidelity(again, model, views), "compress_s": seconds,
                   "perm_search_s": perm.seconds if perm else 0.0,
                   "perm_groups": len(perm.groups) if perm else 0,
                   "perm_logdet_drop": perm.improvement if perm else 0.0,
                   "dense_layers": sum(p == "dense" for p in plan),
                   "mean_sqnr_db": sum(sqnr[label].values()) / len(sqnr[label])}
            rows.append(row)
            print(row, flush=True)
            if args.distill:
                tuned = copy.deepcopy(small)
                data = DataLoader(TensorDataset(random_photo_views(8 * args.distill, seed=1)),
                                  batch_size=8)
                start = time.perf_counter()
                fit(tuned, data, Finetune(epochs=1, lr=1e-4, progress=False), teacher=model)
                method.finalize(tuned, None)
                rows.append({**row, "setting": label + f" + distill {args.distill} steps",
                             **fidelity(tuned.eval(), model, views),
                             "distill_s": time.perf_counter() - start})
                print(rows[-1], flush=True)
    names = list(sqnr["PQF (permuted)"])
    diffs = {n: sqnr["PQF (permuted)"][n] - sqnr["PQ + SR-C (no permutation)"][n]
             for n in names if n in sqnr["PQ + SR-C (no permutation)"]}
    result.update(rows=rows, sqnr=sqnr, sqnr_gain_db=diffs)
    print(format_table(["pqf " + args.target, "file bytes", "ratio", "paper ratio",
                        "agreement", "KL (nats)", "SQNR dB", "compress s", "perm s"],
                       [[r["setting"], r["file_bytes"], f"x{r['ratio']:.2f}",
                         f"x{r['paper_ratio']:.2f}", f"{r['agreement']:.3f}",
                         f"{r['kl']:.4f}", f"{r['mean_sqnr_db']:.2f}",
                         f"{r['compress_s']:.0f}", f"{r['perm_search_s']:.1f}"]
                        for r in rows]))
    gains = sorted(diffs.values())
    print(f"per-layer SQNR gain from permutation: mean {sum(gains) / len(gains):+.3f} dB, "
          f"min {gains[0]:+.3f}, max {gains[-1]:+.3f}, "
          f"{sum(g > 0 for g in gains)} of {len(gains)} layers improved")
    if args.speed:
        result["speed"] = speed(model)
        print(result["speed"])
    suffix = "" if args.block == "auto" else f"_{args.block}"
    out = Path(__file__).parent / "results" / f"pqf_efficientnet_{args.target}{suffix}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
