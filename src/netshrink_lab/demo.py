"""The end-to-end demo: compare the compression methods on ResNet-20 / Fashion-MNIST.

Loads the cached baseline (trained once if missing: about 8 minutes on 2 cores, with a
progress bar), then for each method (by default every registered method: the `kmeans`
baseline and the papers' methods) compresses it to ONE common file-size target, both
post-training and with the same short fine-tuning (distillation from the baseline on a
training subset), saves each result as a .nsk file, reloads it, measures it on the test
set and prints one table: method, target, file bytes on disk, ratio to the fp32 model,
test accuracy post-training and after fine-tuning, and seconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from netshrink import api, fileformat
from netshrink.errors import NetshrinkError
from netshrink.methods import methods
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import Finetune, evaluate
from netshrink_lab import zoo
from netshrink_lab.data import get_dataset, get_loaders

logger = logging.getLogger(__name__)

MODEL, DATA = "resnet20", "fashion-mnist"

DEFAULT_TARGET = "x8"
"""The demo's common size target (file bytes on disk against the fp32 model). Every method
meets it on the ResNet-20 baseline (alds with fp32 factors, smh with fp32 U and V, pqf's
paper-size subvectors with k <= 256 codewords land slightly below it). At x10 the one short
epoch of the demo left alds and smh near chance (measured: 0.49 / 0.42 after 40 steps); at
x8 they reach 0.73 / 0.72 after 79 steps."""

METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # kmeans: the baseline, its defaults (per-channel scale, bits per layer from the target).
    "kmeans": {},
    # pqf: the paper's block="small" subvectors, permutation and SR-C at their defaults; its
    # official fine-tune preset (`methods.pqf.official_finetune`: Adam 1e-3, cosine to 1e-6)
    # is the shared Finetune below, which adds the distillation every method gets here.
    "pqf": {"block": "small"},
    # dkm: trains soft clusters during fine-tuning and snaps them at finalize (the default
    # finalize=True), so the saved file is palettized like kmeans; tau_rel 0.1 default.
    "dkm": {"finalize": True},
    # alds: sized by the file target (no keep_ratio, which would override it); factors are
    # stored at the weights' dtype (fp32), the paper's Theorem-1 error (the default).
    "alds": {"error": "paper"},
    # smh: start from the truncated SVD of the trained weights (init="random" is for
    # training from scratch); U and V in fp32; M is the largest the file target allows.
    "smh": {"init": "svd"},
}
"""Per-method options for `compress` in the demo (any registered method not listed here
runs with its defaults)."""


def demo_methods() -> list[str]:
    """The demo's default methods: `kmeans` first (the baseline), then the others."""
    names = methods()
    return sorted(names, key=lambda m: (m != "kmeans", m))


def measure(model: nn.Module, method: str, targets: list[str], epochs: int,
            train: DataLoader, test: DataLoader, out_dir: Path, seed: int = 0,
            options: dict[str, Any] | None = None, finetune: Finetune | None = None,
            post_training: bool = True) -> list[dict[str, Any]]:
    """For each target: compress `model` with `method` post-training (if `post_training`)
    and with `epochs` of fine-tuning (`finetune`, else `Finetune(epochs, seed=seed)`:
    Adam, distillation from `model`), save to `out_dir`/<method>-<target>-ft<epochs>.nsk,
    reload the file (into a copy of `model`, so any architecture works) and measure it on
    `test`. One dict per result: method, target,
    finetune_epochs, path, file_bytes (on disk), ratio (fp32 bytes / file bytes), accuracy
    (of the reloaded model) and seconds (compress + fine-tune wall time)."""
    base_bytes = fp32_bits(model) / 8
    out_dir.mkdir(parents=True, exist_ok=True)
    options = METHOD_OPTIONS.get(method, {}) if options is None else options
    rows = []
    for target in targets:
        runs = sorted({0, epochs}) if post_training else [epochs]
        for ft_epochs in runs:
            start = time.perf_counter()
            ft = None
            if ft_epochs:
                ft = finetune if finetune is not None else Finetune(epochs=ft_epochs, seed=seed)
            small = api.compress(model, method, target, data=train, finetune=ft, seed=seed,
                                 **options)
            seconds = time.perf_counter() - start
            path = out_dir / f"{method}-{target}-ft{ft_epochs}.nsk"
            size = fileformat.save(small, path)
            rows.append({"method": method, "target": target, "finetune_epochs": ft_epochs,
                         "path": str(path), "file_bytes": size, "ratio": base_bytes / size,
                         "accuracy": evaluate(fileformat.load(path, model), test),
                         "seconds": seconds})
            logger.info("%s", rows[-1])
    return rows


def run_demo(methods_: list[str] | None = None, target: str = DEFAULT_TARGET, *,
             epochs: int = 1, subset_train: int | None = 10000,
             subset_test: int | None = None, out_dir: Path = Path("runs/demo"),
             post_training: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """Run the demo and print its table; returns one dict per method (method, target,
    file_bytes, ratio, post_accuracy, accuracy, seconds, path; `error` instead when the
    method failed, e.g. an infeasible target)."""
    names = methods_ or demo_methods()
    model, meta = zoo.load_or_train_baseline(MODEL, DATA)
    train, _ = get_loaders(DATA, 128, subset_train=subset_train, subset_test=1, seed=seed)
    test = DataLoader(get_dataset(DATA, "test", subset=subset_test, seed=seed), batch_size=512)
    start = time.perf_counter()
    base_acc = evaluate(model, test)
    base_row = [f"{MODEL} fp32", "-", int(fp32_bits(model) / 8), "x1.0", f"{base_acc:.4f}",
                f"{base_acc:.4f}", f"{time.perf_counter() - start:.0f}"]
    results: list[dict[str, Any]] = []
    finetune = Finetune(epochs=epochs, seed=seed) if epochs else None
    for name in names:
        start = time.perf_counter()
        try:
            rows = measure(model, name, [target], epochs, train, test, out_dir, seed,
                           finetune=finetune, post_training=post_training)
        except NetshrinkError as e:  # e.g. a target this method cannot meet: report, go on
            logger.error("%s at %s: %s", name, target, e)
            results.append({"method": name, "target": target, "error": str(e)})
            continue
        final = rows[-1]
        post = rows[0]["accuracy"] if post_training and epochs else None
        results.append({**final, "post_accuracy": post,
                        "seconds": time.perf_counter() - start})
    table = [base_row]
    for r in results:
        if "error" in r:
            table.append([r["method"], r["target"], "-", "-", "-", "failed", "-"])
            continue
        post = "-" if r["post_accuracy"] is None else f"{r['post_accuracy']:.4f}"
        table.append([r["method"], r["target"], r["file_bytes"], f"x{r['ratio']:.1f}", post,
                      f"{r['accuracy']:.4f}", f"{r['seconds']:.0f}"])
    headers = ["method", "target", "file bytes", "ratio", "acc post-training",
               f"acc after {epochs} ep FT", "seconds"]
    print(f"\n{MODEL} on {DATA}: accuracy of the reloaded .nsk file on {len(test.dataset)} "
          f"test images; baseline trained {meta.get('epochs')} epochs; fine-tuning: "
          f"{epochs} epoch(s) of distillation on {len(train.dataset)} training images; sizes "
          f"are the files on disk (in {out_dir}); seconds: compress, fine-tune and "
          f"evaluate\n")
    print(format_table(headers, table))
    for r in results:
        if "error" in r:
            print(f"{r['method']} failed: {r['error']}")
    return results
