"""ResNet-20 on Fashion-MNIST: `dkm` vs `kmeans` with the same fine-tuning (issue 13).

Reduced protocol (2 shared CPU cores): each run fine-tunes for `--steps` optimizer steps
(batch `--batch`, Adam, cosine schedule, distillation from the baseline: the shared
`Finetune`) on a seeded `--train` subset of the training set; accuracy on a seeded,
class-stratified `--test` subset of the test set. For `kmeans` the codes are frozen and
codebooks, scales, biases and norms train (`compress(..., finetune=...)`); for `dkm` the
latent weights train through the soft k-means layers (`finalize=False`, then the shared
`train.fit` with the same `Finetune`), then the layers snap. For DKM both accuracies are
reported: soft (train-time, `soft_weights`) and snapped (the saved model, paper Table 5).
Every compressed model is saved, reloaded and measured from the file; sizes are on disk.

    PYTHONPATH=src python benchmarks/dkm_fashion_mnist.py --runs kmeans:2,dkm:2:1,dkm:2:2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import netshrink
from netshrink.methods.dkm import finalize_model, soft_weights
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import evaluate, fit
from netshrink_lab import zoo
from netshrink_lab.data import fashion_mnist

RESULTS = Path(__file__).parent / "results"


def run(spec: str, model: torch.nn.Module, train: DataLoader, test: DataLoader,
        ft: netshrink.Finetune, tmp: Path, tau_rel: float = 0.1) -> dict:
    parts = spec.split(":")
    method, bits = parts[0], int(parts[1])
    d = int(parts[2]) if len(parts) > 2 else 1
    target = f"{bits}bit"
    start = time.perf_counter()
    row: dict = {"method": method, "bits_per_weight": bits, "cluster_dim": d}
    if method == "kmeans":
        small = netshrink.compress(model, "kmeans", target, data=train, finetune=ft)
        row["post_training"] = evaluate(netshrink.compress(model, "kmeans", target), test)
    else:
        small = netshrink.compress(model, "dkm", target, cluster_dim=d, finalize=False,
                                   tau_rel=tau_rel)
        row["tau_rel"] = tau_rel
        with torch.no_grad():
            row["post_training"] = evaluate(small, test)  # hard snap at the k-means init
        fit(small, train, ft, teacher=model)
        with soft_weights(small):
            row["soft"] = evaluate(small, test)
        finalize_model(small)
    row["seconds"] = round(time.perf_counter() - start, 1)
    path = tmp / f"{spec.replace(':', '-')}.nsk"
    row["file_bytes"] = netshrink.save(small, path)
    row["ratio"] = fp32_bits(model) / 8 / row["file_bytes"]
    row["accuracy"] = evaluate(netshrink.load(path, model), test)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="kmeans:2,dkm:2:1,dkm:2:2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tau-rel", type=float, default=0.1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model, meta = zoo.load_baseline("resnet20")
    train = DataLoader(fashion_mnist("train", subset=args.train), batch_size=args.batch)
    test = DataLoader(fashion_mnist("test", subset=args.test), batch_size=500)
    ft = netshrink.Finetune(epochs=1, max_steps_per_epoch=args.steps, lr=args.lr,
                            batch_size=args.batch, progress=False)
    rows = [{"method": "fp32", "accuracy": evaluate(model, test)}]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            rows.append(run(spec, model, train, test, ft, Path(tmp), args.tau_rel))
            print(rows[-1], flush=True)
    protocol = {k: getattr(args, k) for k in ("steps", "batch", "lr", "train", "test",
                                              "threads", "tau_rel")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"dkm_fashion_mnist{args.tag}.json"
    out.write_text(json.dumps({"protocol": protocol, "baseline": meta.get("test_accuracy"),
                               "rows": rows}, indent=1))
    print(format_table(
        ["method", "bits/w", "d", "post-train", "soft", "snapped (file)", "bytes", "ratio",
         "s"],
        [[r["method"], r.get("bits_per_weight", 32), r.get("cluster_dim", ""),
          f"{r['post_training']:.4f}" if "post_training" in r else "",
          f"{r['soft']:.4f}" if "soft" in r else "", f"{r['accuracy']:.4f}",
          r.get("file_bytes", ""), f"x{r['ratio']:.1f}" if "ratio" in r else "",
          r.get("seconds", "")] for r in rows]))
    print(f"protocol: {protocol}; wrote {out}")


if __name__ == "__main__":
    main()
