"""Input-aware encoding (calibrate.py) on SmolLM2-135M: kmeans at 4 and 3 bits per weight
on every decoder Linear layer (q/k/v/o, gate/up/down of the 30 layers; the tied embedding /
lm_head stays dense, as in benchmarks/pqf_smollm2.py), without and with calibration.

Calibration and evaluation texts are split by document (`netshrink_lab.pretrained.
is_calibration_document`): calibration on `--samples` blocks of `--block` tokens cut from
the GNU licences, perplexity on the other licences (first `--doc-tokens` tokens of each,
windows of `--window`). Reported: perplexity fp32 / without / with, the compressed layers'
stored bits per weight and the file's bytes (identical with and without: same plan),
seconds of each compress call, the calibration record's summary, peak RSS.

    PYTHONPATH=src nice .venv/bin/python benchmarks/calibrate_smollm2.py

Writes benchmarks/results/calibrate_smollm2.json (another name with --out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import netshrink
from netshrink_lab.pretrained import is_calibration_document, local_documents, smollm2
from netshrink_lab.results import write_result

RESULTS = Path(__file__).resolve().parent / "results"


class _Logits(nn.Module):
    """The causal LM called as model(ids) -> logits, without the KV cache."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, use_cache=False).logits


def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """netshrink.perplexity of the wrapped LM (model(ids) -> logits) over the windows, one
    window per batch: every predicted token of every window counts."""
    return netshrink.perplexity(model, [ids[None] for ids in windows])


def tokens(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3",
                    help="comma-separated bits targets; a fractional one (3.2) lets the "
                         "allocator give layers different whole widths at that average")
    ap.add_argument("--calibrated-only", action="store_true",
                    help="skip the runs without calibration")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--memory-mb", type=float, default=512)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default="calibrate_smollm2.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result: dict[str, Any] = {"args": vars(args), "load_average_start": os.getloadavg()}
    start = time.perf_counter()
    model, tokenizer = smollm2()
    docs = local_documents()
    calib_docs = [n for n in docs if is_calibration_document(n)]
    eval_docs = [n for n in docs if not is_calibration_document(n)]
    blocks = [b for n in calib_docs for b in tokens(tokenizer, docs[n]).split(args.block)
              if len(b) == args.block][: args.samples]
    if len(blocks) < args.samples:
        raise SystemExit(f"only {len(blocks)} calibration blocks of {args.block} tokens")
    calib = torch.stack(blocks)
    loader = [(calib[i:i + args.batch],) for i in range(0, len(calib), args.batch)]
    windows = []
    for n in eval_docs:
        ids = tokens(tokenizer, docs[n])[: args.doc_tokens]
        windows += [ids[s:s + args.window] for s in range(0, len(ids), args.window)
                    if len(ids) - s > 1]
    result["text"] = {"calibration_documents": calib_docs, "evaluation_documents": eval_docs,
                      "calibration_tokens": int(calib.numel()),
                      "evaluation_tokens": sum(len(w) for w in windows)}
    wrapped = _Logits(model)
    result["perplexity_fp32"] = round(perplexity(wrapped, windows), 4)
    result["load_and_fp32_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2), flush=True)
    layers = [f"lm.model.layers.{i}.*" for i in range(model.config.num_hidden_layers)]
    rows = []
    for bits in [float(b) for b in args.bits.split(",")]:
        bits = int(bits) if bits.is_integer() else bits
        for calibrate in ((True,) if args.calibrated_only else (False, True)):
            cfg = netshrink.Calibrate(samples=args.samples, memory_mb=args.memory_mb,
                                      passes=args.passes) if calibrate else False
            start = time.perf_counter()
            small = netshrink.compress(wrapped, "kmeans", f"{bits}bit", data=loader,
                                       layers=layers, calibrate=cfg)
            seconds = time.perf_counter() - start
            rep = netshrink.report(small)
            with tempfile.TemporaryDirectory() as tmp:
                file_bytes = netshrink.save(small, Path(tmp) / "m.nsk")
            layer_bits = sum(r.stored_bits for r in rep.layers)
            layer_weights = sum(r.n_weights for r in rep.layers)
            record = rep.calibration or {}
            row = {
                "bits": bits, "calibrated": calibrate, "compress_s": round(seconds, 1),
                "file_bytes": file_bytes, "layers": len(rep.layers),
                "layers_bits_per_weight": round(layer_bits / layer_weights, 4),
                "file_bits_per_weight_all": round(8 * file_bytes / (rep.weights_total or 1), 4),
                "perplexity": round(perplexity(small, windows), 4),
            }
            if record:
                row["calibration"] = {k: record[k] for k in (
                    "samples", "source", "seconds", "groups", "max_layers_at_once",
                    "mean_error_before", "mean_error_after")}
                row["calibration"]["not_applicable"] = len(record["not_applicable"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            del small
            result["runs"] = rows  # written after every run: a partial run leaves its rows
            write_result(RESULTS, args.out, result)
    result["runs"] = rows
    write_result(RESULTS, args.out, result, finished=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
