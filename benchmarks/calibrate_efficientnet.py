"""Input-aware encoding (calibrate.py) on pretrained EfficientNet-Lite0: kmeans at x8 file
bytes on every layer but the stem (post-training; the classifier included: dense, it
alone would take 5 MiB of the 2.3 MiB budget), without calibration, with calibration on
unlabelled photo views, and data-free (inputs distilled from the BatchNorm statistics).

Calibration views come from `netshrink_lab.data.CALIBRATION_PHOTOS` only
(`random_photo_views(--samples, names=CALIBRATION_PHOTOS)`); top-1 agreement and KL to
the original are measured on the views of the other photos (`photo_views(names=
EVALUATION_PHOTOS)`): split by photo. Every row has the same plan (same stored bytes).

    PYTHONPATH=src nice .venv/bin/python benchmarks/calibrate_efficientnet.py

Writes benchmarks/results/calibrate_efficientnet.json (another name with --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.report import format_table
from netshrink.train import fidelity
from netshrink_lab.data import (
    CALIBRATION_PHOTOS,
    EVALUATION_PHOTOS,
    photo_views,
    random_photo_views,
)
from netshrink_lab.pretrained import efficientnet_lite0

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x8")
    ap.add_argument("--method", default="kmeans")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--max-layers", type=int, default=8,
                    help="layers captured at once (GPTQ's sequential capture)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-bits", type=int, default=None,
                    help="Calibrate(max_bits=): wider layers keep the plan (default: none)")
    ap.add_argument("--min-vectors", type=float, default=0.0,
                    help="Calibrate(min_vectors=): input vectors per input a layer needs")
    ap.add_argument("--synthetic-samples", type=int, default=128)
    ap.add_argument("--synthetic-iters", type=int, default=50)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", default="calibrate_efficientnet.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = efficientnet_lite0()
    calib = DataLoader(TensorDataset(random_photo_views(args.samples, seed=0,
                                                        names=CALIBRATION_PHOTOS)),
                       batch_size=32)
    views = DataLoader(TensorDataset(photo_views(names=EVALUATION_PHOTOS)), batch_size=16)
    common = dict(exclude="_conv_stem", min_weights=0)
    settings: list[tuple[str, Any, Any]] = [
        ("without calibration", None, False),
        (f"calibrated on {args.samples} photo views", calib,
         netshrink.Calibrate(samples=args.samples, max_layers=args.max_layers,
                             passes=args.passes, max_bits=args.max_bits,
                             min_vectors=args.min_vectors)),
    ]
    if not args.no_synthetic:
        settings.append((f"data-free ({args.synthetic_samples} synthetic BN inputs)", None,
                         netshrink.Calibrate(samples=args.synthetic_samples,
                                             max_layers=args.max_layers, passes=args.passes,
                                             max_bits=args.max_bits,
                                             min_vectors=args.min_vectors,
                                             input_shape=(3, 224, 224),
                                             synthetic_iters=args.synthetic_iters)))
    rows: list[dict[str, Any]] = []
    for label, data, calibrate in settings:
        start = time.perf_counter()
        small = netshrink.compress(model, args.method, args.target, data=data,
                                   calibrate=calibrate, **common)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            size = netshrink.save(small, Path(tmp) / "m.nsk")
        rep = netshrink.report(small)
        row = {"setting": label, "file_bytes": size, "ratio": round(rep.baseline_bytes / size, 3),
               "layers": len(rep.layers), **fidelity(small, model, views),
               "seconds": round(seconds, 1)}
        if rep.calibration:
            rec = rep.calibration
            row["calibration"] = {k: rec[k] for k in (
                "samples", "source", "seconds", "groups", "max_layers_at_once",
                "mean_error_before", "mean_error_after")}
            row["calibration"]["not_applicable"] = rec["not_applicable"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(exist_ok=True)  # after every row: a partial run leaves its rows
        (RESULTS / args.out).write_text(json.dumps({"args": vars(args), "rows": rows},
                                                   indent=2) + "\n")
    print(format_table(["setting", "file bytes", "ratio", "top-1 agreement", "KL", "seconds"],
                       [[r["setting"], r["file_bytes"], f"x{r['ratio']:.2f}",
                         f"{r['agreement']:.3f}", f"{r['kl']:.4f}", r["seconds"]]
                        for r in rows]))
    result = {"args": vars(args), "evaluation_views": len(views.dataset),
              "calibration_photos": list(CALIBRATION_PHOTOS),
              "evaluation_photos": list(EVALUATION_PHOTOS), "rows": rows,
              "threads": torch.get_num_threads(), "load_average_end": os.getloadavg(),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                    / 2**20, 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
