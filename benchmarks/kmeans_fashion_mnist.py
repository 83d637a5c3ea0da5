"""ResNet-20 on Fashion-MNIST: fp32 baseline vs `kmeans` at 2, 3, 4 bits, post-training and
after 1 epoch of fine-tuning (distillation from the baseline), on the full 10,000-image
test set. Sizes are the bytes of the saved .nsk files on disk.

    .venv/bin/python benchmarks/kmeans_fashion_mnist.py [--bits 2,3,4] [--epochs 1]

Writes the table to stdout and the rows (with wall times) to
benchmarks/results/kmeans_fashion_mnist.json. Trains and caches the baseline first if it
is missing (`netshrink train-baseline resnet20`, 4 epochs).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import evaluate
from netshrink_lab import zoo
from netshrink_lab.data import get_dataset, get_loaders
from netshrink_lab.demo import measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "kmeans_fashion_mnist.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model, meta = zoo.load_or_train_baseline("resnet20")
    train, _ = get_loaders("fashion-mnist", 128, subset_test=1)
    test = DataLoader(get_dataset("fashion-mnist", "test"), batch_size=512)
    rows = [{"target": "fp32", "finetune_epochs": 0, "file_bytes": int(fp32_bits(model) / 8),
             "ratio": 1.0, "accuracy": evaluate(model, test), "seconds": 0.0}]
    targets = [f"{int(b)}bit" for b in args.bits.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(model, "kmeans", targets, args.epochs, train, test, Path(tmp))
        for r in results:  # the size reported is the size on disk
            path = Path(tmp) / f"kmeans-{r['target']}-ft{r['finetune_epochs']}.nsk"
            assert path.stat().st_size == r["file_bytes"]
    rows += results
    table = format_table(
        ["kmeans target", "fine-tune epochs", "file bytes", "ratio", "test accuracy",
         "compress+FT s"],
        [[r["target"], r["finetune_epochs"], r["file_bytes"], f"x{r['ratio']:.1f}",
          f"{r['accuracy']:.4f}", f"{r['seconds']:.1f}"] for r in rows])
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"baseline": {k: meta.get(k) for k in (
        "epochs", "test_accuracy", "train_seconds")}, "rows": rows,
        "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
