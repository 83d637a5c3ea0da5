"""PQF on pretrained EfficientNet-Lite0 (ImageNet, from PyPI), post-training, at a file-size
ratio target (file bytes on disk against the fp32 state dict): with and without the
channel permutation (SR-C annealing in both). Measured: top-1 agreement and KL to the
original on scikit-image's photos (centre crops of 100% and 70%, and their mirror images:
92 views), per-layer SQNR with and without permutation, compress and permutation-search
time. `--distill N` adds N steps of distillation on unlabelled random photo views.
`--speed` times codebook learning for every layer (k=256, d=8 where it divides the rows,
else 4, else 1, 20 iterations; plain Lloyd and SR-C) against faiss-cpu if it is installed
(else the faiss rows are skipped); `--speed-only` runs just that timing:

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_efficientnet.py --speed-only --repeats 5 \
        --threads 1

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_efficientnet.py --target x8

Writes benchmarks/results/pqf_efficientnet_<target>[_<block>][_distill<N>].json and prints a
table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.graph import weight_layers
from netshrink.kmeans import assign, kmeans
from netshrink.layers import weight_rows
from netshrink.methods import get_method
from netshrink.methods.pqf import paper_size_bits, plan_of, search_again
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import Finetune, fidelity, fit
from netshrink_lab.data import photo_views, random_photo_views
from netshrink_lab.pretrained import efficientnet_lite0


def _speed_sets(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Subvectors (float32, contiguous) and k of every conv/linear layer, in module order."""
    sets = []
    for _, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rows = weight_rows(m.weight.detach().float(), 0)
            d = 8 if rows.shape[1] % 8 == 0 else (4 if rows.shape[1] % 4 == 0 else 1)
            x = rows.reshape(-1, d).contiguous()
            k = max(2, min(256, 2 ** int(math.floor(math.log2(max(x.shape[0] / 4, 2))))))
            sets.append((x, k))
    return sets


def _mse(sets: list[tuple[torch.Tensor, int]], centroids: list[torch.Tensor]) -> float:
    """Same for every row: each subvector to its nearest returned centroid, squared error
    averaged over all entries of the given layers."""
    total = sum(float(assign(x, c)[1].sum(dtype=torch.float64))
                for (x, _), c in zip(sets, centroids))
    return total / sum(x.numel() for x, _ in sets)


def speed(model: nn.Module, repeats: int = 3, threads: tuple[int, ...] = (1,)) -> dict:
    """Codebook learning for all conv/linear layers: our k-means (Lloyd / SR-C) vs faiss.

    Layer i is seeded with i in every row (kmeans_batched's convention). Rows run
    interleaved (netshrink Lloyd, faiss all points, netshrink SR-C, faiss default), each
    `repeats` times per thread count; the median time is reported, separately for the
    vector layers (d = 8 or 4) and the scalar ones (d = 1: depthwise 3x3 / 5x5 rows,
    where netshrink uses its sorted scalar path). Only the training calls are timed; the
    MSE is computed afterwards, the same way for every row (`_mse`).
    """
    sets = _speed_sets(model)
    groups = {"vector layers (d>1)": [i for i, (x, _) in enumerate(sets) if x.shape[1] > 1],
              "scalar layers (d=1)": [i for i, (x, _) in enumerate(sets) if x.shape[1] == 1]}
    out: dict = {"layers": len(sets), "subvectors": sum(len(x) for x, _ in sets),
                 "groups": {g: {"layers": len(ix), "subvectors": sum(len(sets[i][0]) for i in ix),
                                "dims": sorted({sets[i][0].shape[1] for i in ix})}
                            for g, ix in groups.items()},
                 "iterations": 20, "repeats": repeats,
                 "timed": "training calls only, median of repeats"}
    try:
        import faiss
        import numpy as np
    except ImportError:
        faiss = None
        print("faiss is not installed: the faiss rows were skipped", flush=True)
        out["faiss"] = "not installed: comparison skipped"
    arrays = [np.ascontiguousarray(x.numpy(), dtype=np.float32) for x, _ in sets] \
        if faiss else []

    def netshrink_rows(**kw):
        def run(ix: list[int]) -> list[torch.Tensor]:
            return [kmeans(sets[i][0], sets[i][1], iters=20, seed=i, init="random",
                           **kw).centroids for i in ix]
        return run

    def faiss_rows(all_points: bool):
        def run(ix: list[int]) -> list[torch.Tensor]:
            cents = []
            for i in ix:
                a, k = arrays[i], sets[i][1]
                extra = {"max_points_per_centroid": max(256, -(-len(a) // k))} if all_points \
                    else {}
                km = faiss.Kmeans(a.shape[1], k, niter=20, seed=i, verbose=False, **extra)
                km.train(a)
                cents.append(torch.from_numpy(km.centroids.copy()))
            return cents
        return run

    rows = [("netshrink Lloyd, 20 iterations", netshrink_rows(tol=0.0))]
    if faiss:
        rows.append(("faiss Kmeans niter=20, all points (max_points_per_centroid >= n/k)",
                     faiss_rows(True)))
    rows.append(("netshrink SR-C, I=20", netshrink_rows(anneal=20)))
    if faiss:
        rows.append(("faiss Kmeans niter=20, default (max_points_per_centroid=256)",
                     faiss_rows(False)))
    for t in threads:
        torch.set_num_threads(t)
        if faiss:
            faiss.omp_set_num_threads(t)
        times = {(label, g): [] for label, _ in rows for g in groups}
        mses: dict = {}
        for _ in range(repeats):
            for label, run in rows:
                for g, ix in groups.items():
                    start = time.perf_counter()
                    cents = run(ix)
                    times[label, g].append(time.perf_counter() - start)
                    # deterministic for a seed: the same in every repeat
                    mses[label, g] = _mse([sets[i] for i in ix], cents)
                    print(t, "threads:", label, g, f"{times[label, g][-1]:.2f} s",
                          f"{mses[label, g]:.5e}", flush=True)
        res: dict = {}
        for label, _ in rows:
            res[label] = {g: {"seconds_median": statistics.median(times[label, g]),
                              "seconds": times[label, g], "mse": mses[label, g]}
                          for g in groups}
            n = {g: sum(sets[i][0].numel() for i in ix) for g, ix in groups.items()}
            res[label]["all layers"] = {
                "seconds_median": statistics.median(
                    [sum(times[label, g][r] for g in groups) for r in range(repeats)]),
                "mse": sum(mses[label, g] * n[g] for g in groups) / sum(n.values())}
        out[f"{t} threads"] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x8")
    p.add_argument("--block", default="auto")
    p.add_argument("--distill", type=int, default=0, help="distillation steps (batch 8)")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--speed-only", action="store_true",
                   help="only the codebook-learning timing; writes pqf_efficientnet_speed.json")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts for --speed")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model = efficientnet_lite0()
    threads = tuple(int(t) for t in args.threads.split(","))
    if args.speed_only:
        result = speed(model, args.repeats, threads)
        print(json.dumps(result, indent=1))
        tail = "" if threads == (1,) else "_" + "_".join(map(str, threads)) + "threads"
        out = Path(__file__).parent / "results" / f"pqf_efficientnet_speed{tail}.json"
        out.write_text(json.dumps(result, indent=1))
        return
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
        result["speed"] = speed(model, args.repeats, threads)
        print(result["speed"])
    suffix = ("" if args.block == "auto" else f"_{args.block}") + (
        f"_distill{args.distill}" if args.distill else "")
    out = Path(__file__).parent / "results" / f"pqf_efficientnet_{args.target}{suffix}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
