"""Sweep of pretrained EfficientNet-Lite0: every method at x4, x8, x16, measured as top-1
agreement (and KL) with the original on views of the evaluation photos; calibration and
the optional distillation use random views of the calibration photos (a disjoint set of
photos, netshrink_lab.data.CALIBRATION_PHOTOS / EVALUATION_PHOTOS). No ImageNet labels
exist offline, hence agreement, not accuracy.

    PYTHONPATH=src nice .venv/bin/python benchmarks/sweep_efficientnet.py        # post-training
    PYTHONPATH=src nice .venv/bin/python benchmarks/sweep_efficientnet.py --distill-steps 20

Writes runs/bench/sweep_efficientnet_lite0/ (resumable) and copies
benchmarks/results/sweep_efficientnet_lite0.{json,png,svg} (see sweep_table.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from netshrink import Finetune
from netshrink.sweep import run_sweep
from netshrink_lab.data import (
    CALIBRATION_PHOTOS,
    EVALUATION_PHOTOS,
    photo_views,
    random_photo_views,
)
from netshrink_lab.demo import demo_methods
from netshrink_lab.pretrained import efficientnet_lite0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_table import markdown, publish  # noqa: E402

NAME = "sweep_efficientnet_lite0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(demo_methods()))
    p.add_argument("--targets", default="x4,x8,x16")
    p.add_argument("--calibration-views", type=int, default=64)
    p.add_argument("--distill-steps", type=int, default=0,
                   help="distillation steps (batch 8) on the calibration views; 0: none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=f"runs/bench/{NAME}")
    p.add_argument("--force", action="store_true", help="discard a sweep of another config")
    p.add_argument("--no-publish", action="store_true",
                   help="do not copy the results to benchmarks/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    model = efficientnet_lite0()
    evaluation = DataLoader(TensorDataset(photo_views(names=EVALUATION_PHOTOS)), batch_size=16)
    calibration = DataLoader(
        TensorDataset(random_photo_views(args.calibration_views, names=CALIBRATION_PHOTOS)),
        batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    finetune = None
    if args.distill_steps:
        finetune = Finetune(epochs=1, max_steps_per_epoch=args.distill_steps,
                            distill_weight=1.0, lr=1e-4)
    result = run_sweep(model, args.methods.split(","), args.targets.split(","),
                       train_data=calibration, eval_data=evaluation, out_dir=args.out_dir,
                       metric="agreement", finetune=finetune, force=args.force,
                       describe={"model": "efficientnet-lite0 (pretrained)",
                                 "eval": "photo_views(EVALUATION_PHOTOS)",
                                 "calibration": f"random_photo_views({args.calibration_views},"
                                                " CALIBRATION_PHOTOS)"})
    print(result.table())
    if not args.no_publish:
        print(markdown(json.loads(publish(Path(args.out_dir), NAME).read_text())))


if __name__ == "__main__":
    main()
