"""Block-wise reconstruction (`netshrink.reconstruct`, BRECQ) of pretrained
EfficientNet-Lite0 after post-training compression: top-1 agreement and KL to the fp32
model on held-out photos, before and after reconstruction, at the same file bytes.

Calibration: `--samples` random views (random crops and mirrors) of CALIBRATION_PHOTOS;
evaluation: the deterministic views of EVALUATION_PHOTOS (disjoint photos). With `--tune`
both come from CALIBRATION_PHOTOS only (calibrated on its even photos, scored on its odd
ones): the split to pick settings on, never the evaluation photos.

    PYTHONPATH=src .venv/bin/python benchmarks/reconstruct_efficientnet.py --method kmeans \
        --target x8 --steps 100

Writes benchmarks/results/reconstruct_efficientnet_<method>_<target>[_tune].json.
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
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.size import fp32_bits
from netshrink.train import fidelity
from netshrink_lab.data import (
    CALIBRATION_PHOTOS,
    EVALUATION_PHOTOS,
    photo_views,
    random_photo_views,
)
from netshrink_lab.pretrained import efficientnet_lite0
from netshrink_lab.reconstruct_args import add_reconstruct_args, reconstruct_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="kmeans")
    p.add_argument("--target", default="x8", help="a target, or keep=0.5 for alds")
    p.add_argument("--samples", type=int, default=512)
    add_reconstruct_args(p, steps=100, batch_size=32, codes="fixed")
    p.add_argument("--gptq-samples", type=int, default=0,
                   help="first calibrate (compress's calibrate=) on this many of the "
                        "calibration views (0: post-training k-means only)")
    p.add_argument("--tune", action="store_true",
                   help="calibrate and score on two halves of the calibration photos")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    calib_names = CALIBRATION_PHOTOS[0::2] if args.tune else CALIBRATION_PHOTOS
    eval_names = CALIBRATION_PHOTOS[1::2] if args.tune else EVALUATION_PHOTOS
    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views(names=eval_names)), batch_size=32)
    calib = random_photo_views(args.samples, names=calib_names)
    start = time.perf_counter()
    options = ({"keep_ratio": float(args.target.split("=")[1])}
               if args.target.startswith("keep=") else {"target": args.target})
    gptq = args.gptq_samples > 0
    small = netshrink.compress(model, args.method, min_weights=0, exclude=["_conv_stem"],
                               seed=0, data=DataLoader(TensorDataset(calib), batch_size=32)
                               if gptq else None,
                               calibrate=netshrink.Calibrate(samples=args.gptq_samples)
                               if gptq else False, **options)
    compress_s = time.perf_counter() - start
    cfg = reconstruct_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.nsk"
        size = netshrink.save(small, path)
        before = fidelity(netshrink.load(path, model), model, views)
        print("before", before, flush=True)
        report = netshrink.reconstruct(small, model, calib, cfg)
        size_after = netshrink.save(small, path)
        assert size_after == size == path.stat().st_size
        after = fidelity(netshrink.load(path, model), model, views)
    print("after", after, flush=True)
    result = {"method": args.method, "target": args.target, "file_bytes": size,
              "ratio": fp32_bits(model) / 8 / size, "before": before, "after": after,
              "compress_s": compress_s, "reconstruct_s": report["seconds"],
              "settings": vars(args), "eval_views": len(views.dataset),
              "calibration_photos": list(calib_names), "evaluation_photos": list(eval_names),
              "report": report, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads()}
    tail = ("_tune" if args.tune else "") + (f"_gptq{args.gptq_samples}" if gptq else "") \
        + f"_{args.codes}{args.steps}"
    out = (Path(__file__).parent / "results" /
           f"reconstruct_efficientnet_{args.method}_{args.target.replace('=', '')}{tail}.json")
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("file_bytes", "ratio", "before", "after",
                                             "compress_s", "reconstruct_s")}, indent=1))


if __name__ == "__main__":
    main()
