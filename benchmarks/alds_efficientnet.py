"""Pretrained EfficientNet-Lite0 at 2x fewer parameters (keep ratio 0.5 of all parameters)
with `alds`: post-training (ALDS with the paper's and with the code's error, and the
uniform-rank SVD baseline), then ALDS + a SHORT distillation on unlabelled photo views
(a REDUCED protocol: --steps Adam steps of --batch random crops, BatchNorm kept in eval
mode). Every Conv2d with groups = 1 and the classifier are factorised (min_weights=0);
depthwise convs stay dense (docs/methods/alds.md#layers-and-budget).

No ImageNet labels exist offline: fidelity to the original (top-1 agreement, KL) is
measured on scikit-image's photos (`photo_views`: 92 fixed views). Distillation trains on
random crops of the photos NOT in --heldout; agreement is reported on all views and on
the views of the held-out photos alone.

    PYTHONPATH=src .venv/bin/python benchmarks/alds_efficientnet.py [--steps 40] \
        [--sweep 0.9,0.8,0.7]

--sweep adds post-training rows at milder keep ratios (where low rank starts to hold).
"seconds" is the compress time (profile + solve + factorise) for post-training rows and
the distillation time for the others.

Writes benchmarks/results/alds_efficientnet.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.methods.alds import parameter_count
from netshrink.report import format_table
from netshrink.train import Finetune, StepHook, fidelity, fit
from netshrink_lab.data import PHOTOS, photo_views, random_photo_views
from netshrink_lab.pretrained import efficientnet_lite0

HELDOUT = ("chelsea", "coffee", "rocket", "horse", "clock")


class EvalBatchNorm(StepHook):
    """Keep BatchNorm layers in eval mode while fine-tuning on a few unlabelled photos:
    batch statistics of 8 crops of a handful of photos are not ImageNet's."""

    def before_step(self, model: nn.Module, step: int) -> None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--sweep", default="0.9,0.8,0.7",
                   help="extra keep ratios, post-training only (empty: none)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "alds_efficientnet.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views()), batch_size=23)
    held = DataLoader(TensorDataset(photo_views(names=HELDOUT)), batch_size=23)
    total = parameter_count(model)
    rows = []
    students = {}
    for label, solver, error in (("alds (paper error)", "alds", "paper"),
                                 ("alds (code error)", "alds", "code"),
                                 ("uniform SVD", "svd", "paper")):
        start = time.perf_counter()
        small = netshrink.compress(model, "alds", keep_ratio=args.keep, min_weights=0,
                                   solver=solver, error=error)
        seconds = time.perf_counter() - start
        students[label] = small
        rows.append({"setting": label, "keep": args.keep, "distill_steps": 0,
                     "params_ratio": parameter_count(small) / total,
                     **fidelity(small, model, views),
                     "heldout_agreement": fidelity(small, model, held)["agreement"],
                     "seconds": seconds})
        print(rows[-1], flush=True)
    if args.steps > 0:
        train_names = tuple(n for n in PHOTOS if n not in HELDOUT)
        crops = random_photo_views(args.steps * args.batch, names=train_names)
        loader = DataLoader(TensorDataset(crops), batch_size=args.batch)
        cfg = Finetune(epochs=1, optimizer="adam", lr=args.lr, distill_weight=1.0,
                       temperature=1.0, progress=False)
        for label in ("alds (paper error)", "alds (code error)"):
            student = students[label]
            start = time.perf_counter()
            fit(student, loader, cfg, teacher=model, hooks=[EvalBatchNorm()])
            student.eval()
            rows.append({"setting": f"{label} + distillation", "keep": args.keep,
                         "distill_steps": args.steps,
                         "params_ratio": parameter_count(student) / total,
                         **fidelity(student, model, views),
                         "heldout_agreement": fidelity(student, model, held)["agreement"],
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    for keep in [float(k) for k in args.sweep.split(",") if k]:
        for label, solver, error in (("alds (paper error)", "alds", "paper"),
                                     ("alds (code error)", "alds", "code"),
                                     ("uniform SVD", "svd", "paper")):
            start = time.perf_counter()
            small = netshrink.compress(model, "alds", keep_ratio=keep, min_weights=0,
                                       solver=solver, error=error)
            seconds = time.perf_counter() - start
            rows.append({"setting": label, "keep": keep, "distill_steps": 0,
                         "params_ratio": parameter_count(small) / total,
                         **fidelity(small, model, views),
                         "heldout_agreement": fidelity(small, model, held)["agreement"],
                         "seconds": seconds})
            print(rows[-1], flush=True)
    print(format_table(["alds", "keep", "distill steps", "params", "agreement",
                        "KL (nats)", "held-out agreement", "seconds"],
                       [[r["setting"], r["keep"], r["distill_steps"], f"{r['params_ratio']:.3f}",
                         f"{r['agreement']:.3f}", f"{r['kl']:.4f}",
                         f"{r['heldout_agreement']:.3f}", f"{r['seconds']:.1f}"]
                        for r in rows]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "views": len(views.dataset),
                               "heldout_photos": HELDOUT, "keep": args.keep,
                               "distill": {"steps": args.steps, "batch": args.batch,
                                           "lr": args.lr, "loss": "KL, T=1",
                                           "bn": "eval mode"},
                               "torch": torch.__version__, "machine": platform.machine(),
                               "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
