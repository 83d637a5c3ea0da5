"""SMH from the pretrained ResNet-20 Fashion-MNIST baseline (the zoo's cached model):
accuracy right after the truncated-SVD start at several variable budgets, then after
re-estimating BatchNorm statistics (`train.recalibrate_batchnorm`, 20 batches of 128
training images), then after a short distillation (`compress(..., finetune=...)`,
`--steps` steps of batch 128, distillation weight 0.5, followed by the same BN
re-estimation). Per-layer SQNR (median) of the SVD start from `netshrink.report`.

    PYTHONPATH=src .venv/bin/python benchmarks/smh_resnet20_pretrained.py \
        [--factors 1.5,2,4] [--steps 40] [--test-subset 5000]

Writes benchmarks/results/smh_resnet20_pretrained.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import netshrink
from netshrink.methods.smh import bank_of
from netshrink.report import format_table
from netshrink.train import Finetune, evaluate, recalibrate_batchnorm
from netshrink_lab import zoo
from netshrink_lab.data import fashion_mnist_loaders


def covered_values(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def acc(model: nn.Module, test) -> float:
    with torch.no_grad():
        return evaluate(model, test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--factors", default="1.5,2,4")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--test-subset", type=int, default=5000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "smh_resnet20_pretrained.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, _ = zoo.load_baseline("resnet20")
    train, test = fashion_mnist_loaders(128, subset_test=args.test_subset)
    n_values = covered_values(model)
    rows = [{"setting": "baseline ResNet-20", "variables": n_values,
             "accuracy": acc(model, test)}]
    for factor in (float(f) for f in args.factors.split(",")):
        small = netshrink.compress(model, method="smh", variables=int(n_values / factor),
                                   min_weights=0)
        sq = [r.sqnr_db for r in netshrink.report(small).layers if r.kind == "smh"]
        row = {"setting": f"SMH {factor:g}x fewer variables",
               "variables": bank_of(small).variables(), "M": bank_of(small).rank,
               "median_sqnr_db": statistics.median(sq), "svd_start": acc(small, test)}
        recal = copy.deepcopy(small)
        recalibrate_batchnorm(recal, train, 20)
        row["svd_start_bn_recalibrated"] = acc(recal, test)
        if args.steps > 0:
            tuned = netshrink.compress(
                model, method="smh", variables=int(n_values / factor), min_weights=0,
                data=train, finetune=Finetune(epochs=1, max_steps_per_epoch=args.steps,
                                              bn_recalibration_batches=20, progress=False))
            row[f"distilled_{args.steps}_steps"] = acc(tuned, test)
        rows.append(row)
        print(row, flush=True)
    keys = ["svd_start", "svd_start_bn_recalibrated", f"distilled_{args.steps}_steps"]
    print(format_table(["setting", "variables", "median SQNR dB", "SVD start",
                        "+ BN re-estimated", f"+ {args.steps} distillation steps"],
                       [[r["setting"], r["variables"],
                         f"{r['median_sqnr_db']:.1f}" if "median_sqnr_db" in r else "-"]
                        + [f"{r[k]:.4f}" if k in r else "-" for k in keys] for r in rows[1:]]))
    print(f"baseline accuracy {rows[0]['accuracy']:.4f} on {args.test_subset} test images; "
          f"wall {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "test_subset": args.test_subset,
                               "wall_s": time.perf_counter() - start,
                               "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
