"""Block-wise reconstruction (`netshrink.reconstruct`, BRECQ) of ResNet-20 on Fashion-MNIST
after post-training 2-bit compression, from 1,024 unlabelled training images (labels are
never read): test accuracy of the fp32 baseline, the compressed model, and the
reconstructed one (goal of issue 22: within 1.5 points of fp32).

    PYTHONPATH=src .venv/bin/python benchmarks/reconstruct_resnet20.py --methods kmeans dkm \
        --calibrate --codes soft

`--calibrate` runs the input-aware encoding (calibrate.py) on the same images first;
`--codes soft` lets reconstruction re-choose the codes (AdaRound, softcodes.py).

The baseline is `netshrink_lab.zoo.load_or_train_baseline` (trained and cached if missing).
Writes benchmarks/results/reconstruct_resnet20.json.
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

import netshrink
from netshrink.train import evaluate
from netshrink_lab import zoo
from netshrink_lab.data import get_dataset, get_loaders
from netshrink_lab.reconstruct_args import add_reconstruct_args, reconstruct_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["kmeans", "dkm"])
    p.add_argument("--target", default="2bit")
    p.add_argument("--samples", type=int, default=1024)
    add_reconstruct_args(p, steps=200, batch_size=32, codes="soft")
    p.add_argument("--calibrate", action="store_true",
                   help="input-aware encoding (GPTQ) on the same images before reconstruction")
    p.add_argument("--out", default="reconstruct_resnet20.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, meta = zoo.load_or_train_baseline("resnet20", "fashion-mnist")
    _, test = get_loaders("fashion-mnist", batch_size=256)
    train = get_dataset("fashion-mnist", "train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    images = train.tensors[0][pick[:args.samples]]  # the images only: no labels
    fp32 = evaluate(model, test)
    rows = []
    cfg = reconstruct_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            start = time.perf_counter()
            calib = {"data": [images[i:i + 128] for i in range(0, len(images), 128)],
                     "calibrate": netshrink.Calibrate(samples=args.samples)} \
                if args.calibrate else {}
            small = netshrink.compress(model, method, args.target, seed=0, **calib)
            compress_s = time.perf_counter() - start
            path = Path(tmp) / "m.nsk"
            size = netshrink.save(small, path)
            before = evaluate(netshrink.load(path, model), test)
            report = netshrink.reconstruct(small, model, images, cfg)
            assert netshrink.save(small, path) == size
            after = evaluate(netshrink.load(path, model), test)
            rows.append({"method": method, "target": args.target, "file_bytes": size,
                         "acc_fp32": fp32, "acc_before": before, "acc_after": after,
                         "compress_s": compress_s, "reconstruct_s": report["seconds"],
                         "report": report})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "report"}),
                  flush=True)
    out = Path(__file__).parent / "results" / args.out
    out.write_text(json.dumps({"rows": rows, "settings": vars(args), "baseline": meta,
                               "torch": torch.__version__, "machine": platform.machine(),
                               "threads": torch.get_num_threads()}, indent=1, default=str))


if __name__ == "__main__":
    main()
