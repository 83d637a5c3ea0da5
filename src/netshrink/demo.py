"""The end-to-end demo: ResNet-20 on Fashion-MNIST, compressed with `kmeans` at two targets.

Trains the baseline once (cached; about 8 minutes on 2 cores, with a progress bar), then
for each target compresses post-training and with fine-tuning (distillation from the
baseline, on a 20,000-image subset by default to keep the run short), saves each result as
a .nsk file, reloads it, and prints one table: file size on disk, ratio to the fp32
model, and test accuracy on the full test set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from . import api, fileformat, zoo
from .data import get_dataset, get_loaders
from .report import format_table
from .size import fp32_bits
from .train import Finetune, evaluate

logger = logging.getLogger(__name__)

MODEL, DATA = "resnet20", "fashion-mnist"


def measure_kmeans(model: nn.Module, targets: list[str], epochs: int, train: DataLoader,
                   test: DataLoader, out_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """For each target: compress post-training and with `epochs` of fine-tuning, save to
    `out_dir`, reload the file and measure it. One dict per result: target,
    finetune_epochs, file_bytes, ratio (fp32 bytes / file bytes), accuracy (of the reloaded
    model) and seconds (compress + fine-tune wall time)."""
    base_bytes = fp32_bits(model) / 8
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in targets:
        for ft_epochs in sorted({0, epochs}):
            start = time.perf_counter()
            finetune = Finetune(epochs=ft_epochs, seed=seed) if ft_epochs else None
            small = api.compress(model, "kmeans", target, data=train, finetune=finetune,
                                 seed=seed)
            seconds = time.perf_counter() - start
            path = out_dir / f"kmeans-{target}-ft{ft_epochs}.nsk"
            size = fileformat.save(small, path)
            rows.append({"target": target, "finetune_epochs": ft_epochs, "file_bytes": size,
                         "ratio": base_bytes / size,
                         "accuracy": evaluate(fileformat.load(path), test),
                         "seconds": seconds})
            logger.info("%s", rows[-1])
    return rows


def run_demo(targets: list[str], *, epochs: int = 1, subset_train: int | None = None,
             subset_test: int | None = None, out_dir: Path = Path("runs/demo"),
             seed: int = 0) -> list[list[object]]:
    """Run the demo and print its table; returns the table rows."""
    model, meta = zoo.load_or_train_baseline(MODEL, DATA)
    train, _ = get_loaders(DATA, 128, subset_train=subset_train, subset_test=1, seed=seed)
    test = DataLoader(get_dataset(DATA, "test", subset=subset_test, seed=seed), batch_size=512)
    rows: list[list[object]] = [[f"{MODEL} fp32", "-", "-", int(fp32_bits(model) / 8), "x1.0",
                                 f"{evaluate(model, test):.4f}"]]
    for r in measure_kmeans(model, targets, epochs, train, test, out_dir, seed):
        rows.append([f"{MODEL} kmeans", r["target"], r["finetune_epochs"], r["file_bytes"],
                     f"x{r['ratio']:.1f}", f"{r['accuracy']:.4f}"])
    headers = ["model", "target", "fine-tune epochs", "file bytes", "ratio", "test accuracy"]
    print(f"\n{MODEL} on {DATA}: accuracy on {len(test.dataset)} test images; baseline "
          f"trained {meta.get('epochs')} epochs; fine-tuning on {len(train.dataset)} training "
          f"images; sizes are the .nsk files on disk\n")
    print(format_table(headers, rows))
    return rows
