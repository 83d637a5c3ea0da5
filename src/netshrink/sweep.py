"""`run_sweep`: every method at every target on one model, measured on the reloaded files.

For each (method, target) cell the sweep compresses the model (`netshrink.compress`), saves
the .nsk file, reloads it with `netshrink.load` and measures the reloaded model: top-1
accuracy with labelled evaluation data, else top-1 agreement (and KL) with the original
model (`netshrink.train.metrics`). The file size is the file on disk (`os.stat`). A cell
whose target the method cannot meet (or any other `NetshrinkError`) is a failed cell with
its reason, not a crashed sweep.

Layout of `out_dir` (docs/design.md keeps one home per concern; this is the sweep's):
  sweep.json          the configuration (model and data fingerprints, metric, fine-tuning,
                      compress options, each method's options); a re-run with another
                      configuration raises `SweepConfigError` unless force=True
  cells/*.json        one finished cell each, written atomically (`atomic.py`): a killed
                      sweep re-run skips them
  files/*.nsk         the compressed files
  results.csv/.json   one row per cell (COLUMNS), plus the baseline in the JSON
  pareto.png/.svg     file bytes (log) against the metric, one series per method, the
                      Pareto frontier and the baseline (needs matplotlib: netshrink[plot])
  report.html         the table and the inline SVG plot, no external assets
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import html
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, fileformat
from .atomic import atomic_write
from .errors import ConfigError, NetshrinkError, SweepConfigError
from .graph import weight_count
from .methods import get_method
from .report import format_table, report
from .size import fp32_bits, parse_target
from .train import Finetune, evaluate, fidelity, perplexity, split_batch

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
METRICS = ("auto", "accuracy", "agreement", "perplexity")
LOWER_IS_BETTER = frozenset({"perplexity"})
COLUMNS = ["method", "target", "status", "file_bytes", "ratio", "bits_per_weight", "metric",
           "score", "kl", "seconds", "eval_seconds", "path", "error"]
"""results.csv / results.json columns. file_bytes: the .nsk file on disk; ratio: fp32 bytes
/ file bytes; bits_per_weight: file bits / weights of the original model (floating
parameters of dim >= 2, what compress counts), everything in the file included; score:
the metric of the reloaded file; kl: mean KL(original || reloaded) in nats (agreement
only); seconds: compress (+ fine-tune) and save; eval_seconds: reload and evaluate."""

PLOT_HINT = "matplotlib is not installed, no pareto.png/.svg: pip install 'netshrink[plot]'"
HEARTBEAT_SECONDS = 60.0


@dataclass
class SweepResult:
    """What `run_sweep` measured: one dict per cell (COLUMNS), the baseline row, the metric
    name and the files written (name -> path)."""

    out_dir: Path
    metric: str
    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    def frontier(self) -> list[dict[str, Any]]:
        """The Pareto-optimal cells: no other cell is as small with a higher score."""
        return pareto_frontier(self.rows)

    def table(self) -> str:
        """The results as a plain-text table (baseline first), failures listed below."""
        return format_results(self.baseline, self.rows)


# ------------------------------------------------------------------------------ helpers


def _cell_key(method: str, target: str) -> str:
    """A file-name-safe key of one cell."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{method}-{target}")


def _jsonable(value: Any) -> Any:
    """JSON-able form of options and configs (dataclasses as dicts, the rest by repr)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _hash_tensors(tensors: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model's class and a hash of its state dict (what makes two models the same)."""
    state = model.state_dict()
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "state_sha256": _hash_tensors(state[k] for k in sorted(state))}


def data_fingerprint(data: Any) -> dict[str, Any] | None:
    """A hash of a DataLoader's TensorDataset (never iterates the loader, so a shuffled
    loader's random state is untouched); type and length only for other data."""
    if data is None:
        return None
    dataset = getattr(data, "dataset", None)
    out: dict[str, Any] = {"type": type(dataset if dataset is not None else data).__name__}
    with contextlib.suppress(TypeError):
        out["len"] = len(dataset if dataset is not None else data)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        out["sha256"] = _hash_tensors(dataset.tensors)
    return out


def has_labels(data: Iterable[Any]) -> bool:
    """Whether the first batch of `data` carries labels."""
    for batch in data:
        return split_batch(batch)[1] is not None
    raise ConfigError("the evaluation data yielded no batches")


@contextlib.contextmanager
def heartbeat(what: str, interval: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Log "still <what> (N s)" every `interval` seconds while the block runs, so a long
    step (ALDS on a large model runs for minutes) shows it is alive in a log file too."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(interval):
            logger.info("  still %s (%.0f s)", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------ config


def _check_config(out_dir: Path, config: dict[str, Any], force: bool) -> None:
    """Refuse to mix cells of two configurations in one folder; write sweep.json.

    Every entry but "methods" must match; a method present in both must have the same
    options (new methods may be added). force=True discards the old cells and files."""
    path = out_dir / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        differ = sorted(k for k in set(old) | set(config)
                        if k != "methods" and old.get(k) != config.get(k))
        old_methods = old.get("methods") or {}
        differ += [f"methods.{m}" for m in sorted(set(old_methods) & set(config["methods"]))
                   if old_methods[m] != config["methods"][m]]
        if differ and not force:
            raise SweepConfigError(
                f"{out_dir} holds a sweep with another configuration ({', '.join(differ)} "
                "differ): use another --out-dir, or --force (force=True) to discard it")
        if differ:
            logger.warning("--force: discarding the sweep in %s (%s differ)", out_dir,
                           ", ".join(differ))
            for sub in ("cells", "files"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
        else:
            config = {**config, "methods": {**old_methods, **config["methods"]}}
    atomic_write(path, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode())


def _read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell, or None when absent or unreadable (then it is run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the sweep


def run_sweep(
    model: nn.Module,
    methods: Sequence[str],
    targets: Sequence[str],
    *,
    train_data: Any = None,
    eval_data: Any,
    out_dir: str | os.PathLike[str],
    metric: str = "auto",
    finetune: Finetune | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    compress_kwargs: Mapping[str, Any] | None = None,
    calibrate: Any = "auto",
    describe: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Compress `model` with every method in `methods` at every target in `targets`, save,
    reload and measure each file on `eval_data`; write the results to `out_dir`.

    train_data: calibration / fine-tuning data handed to `compress` (`data=`).
    metric: "accuracy" (labelled eval_data), "agreement" (top-1 agreement with `model`,
    labels ignored; KL recorded too) or "auto" (accuracy when eval_data has labels).
    finetune: the same `Finetune` for every cell (None: post-training). options: per-method
    options ({"kmeans": {"per_channel": False}}); compress_kwargs: options for every cell
    (min_weights, seed, layers, ...). calibrate: compress's `calibrate=` for every cell, or
    a mapping method -> value (methods left out: "auto"). describe: what identifies model
    and data beyond the hashes (e.g. names, subsets), stored in sweep.json. Methods,
    targets and options are checked before any work (ConfigError). A re-run into the same
    out_dir skips finished cells; another configuration raises SweepConfigError unless
    force=True (which discards the old cells). progress=False also silences the
    fine-tuning progress bar.
    """
    out = Path(out_dir)
    unknown = set(options or {}) - set(methods)
    if unknown:
        raise ConfigError(f"options for methods not swept: {', '.join(sorted(unknown))}")
    options = {m: dict((options or {}).get(m, {})) for m in methods}
    compress_kwargs = dict(compress_kwargs or {})
    if "calibrate" in compress_kwargs:  # compress_kwargs' own calibrate: the same for all
        calibrate = compress_kwargs.pop("calibrate")
    calibration = ({m: calibrate.get(m, "auto") for m in methods}
                   if isinstance(calibrate, Mapping) else {m: calibrate for m in methods})
    if not methods or not targets:
        raise ConfigError("a sweep needs at least one method and one target")
    for m in methods:
        get_method(m).make_config(**options[m])  # unknown methods / options fail here
    for t in targets:
        parse_target(t)
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "auto":
        metric = "accuracy" if has_labels(eval_data) else "agreement"
    if finetune is not None and not progress:
        finetune = dataclasses.replace(finetune, progress=False)

    config = {"version": CONFIG_VERSION, "model": model_fingerprint(model),
              "train_data": data_fingerprint(train_data),
              "eval_data": data_fingerprint(eval_data), "metric": metric,
              "finetune": _jsonable(finetune), "compress": _jsonable(compress_kwargs),
              "describe": _jsonable(dict(describe or {})),
              "methods": {m: _jsonable(options[m]) for m in methods},
              "calibrate": {m: _jsonable(calibration[m]) for m in methods}}
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config, force)

    fp32_bytes = fp32_bits(model) / 8
    n_weights = max(weight_count(model), 1)

    def measure(candidate: nn.Module) -> tuple[float, float | None]:
        if metric == "accuracy":
            return evaluate(candidate, eval_data), None
        if metric == "perplexity":
            return perplexity(candidate, eval_data), None
        fid = fidelity(candidate, model, eval_data)
        return fid["agreement"], fid["kl"]

    baseline_path = out / "cells" / "baseline.json"
    baseline = _read_cell(baseline_path)
    if baseline is None:
        start = time.perf_counter()
        score = (evaluate(model, eval_data) if metric == "accuracy" else
                 perplexity(model, eval_data) if metric == "perplexity" else 1.0)
        baseline = {"method": "fp32", "target": "-", "status": "ok",
                     "file_bytes": fp32_bytes, "ratio": 1.0,
                     "bits_per_weight": 8 * fp32_bytes / n_weights, "metric": metric,
                     "score": score, "kl": 0.0 if metric == "agreement" else None,
                     "seconds": 0.0, "eval_seconds": time.perf_counter() - start,
                     "path": None, "error": None}
        _write_json(baseline_path, baseline)
    logger.info("baseline: fp32 %d bytes, %s %.4f", fp32_bytes, metric, baseline["score"])

    rows: list[dict[str, Any]] = []
    cells = [(m, t) for m in methods for t in targets]
    for i, (method, target) in enumerate(cells, 1):
        key = _cell_key(method, target)
        cell_path = out / "cells" / f"{key}.json"
        done = _read_cell(cell_path)
        if done is not None:
            logger.info("cell %d/%d %s %s: finished earlier, skipped", i, len(cells), method,
                        target)
            rows.append(done)
            continue
        logger.info("cell %d/%d %s %s: start", i, len(cells), method, target)
        row = _run_cell(model, method, target, out / "files" / f"{key}.nsk", metric,
                        fp32_bytes, n_weights, measure, train_data, finetune,
                        {**compress_kwargs, "calibrate": calibration[method],
                         **options[method]})
        rows.append(row)
        if row["status"] == "ok":
            logger.info("cell %d/%d %s %s: done, %d bytes (x%.2f), %s %.4f, %.0f s + %.0f s "
                        "eval", i, len(cells), method, target, row["file_bytes"], row["ratio"],
                        metric, row["score"], row["seconds"], row["eval_seconds"])
        else:
            logger.warning("cell %d/%d %s %s: failed after %.0f s: %s", i, len(cells),
                           method, target, row["seconds"], row["error"])
        if not row.pop("retry", False):
            _write_json(cell_path, row)

    result = SweepResult(out, metric, baseline, rows)
    write_outputs(result, config)
    return result


def _run_cell(model: nn.Module, method: str, target: str, path: Path, metric: str,
              fp32_bytes: float, n_weights: int, measure: Any, train_data: Any,
              finetune: Finetune | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Compress, save, reload, measure one cell; a NetshrinkError is a failed cell (final),
    any other exception a failed cell with its traceback logged and `retry` set (not
    recorded, so a re-run tries it again)."""
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(method=method, target=target, metric=metric)
    start = time.perf_counter()
    try:
        with heartbeat(f"compressing {method} {target}"):
            small = api.compress(model, method, target, data=train_data, finetune=finetune,
                                 **kwargs)
        fileformat.save(small, path)
        row["seconds"] = time.perf_counter() - start
        size = os.stat(path).st_size
        start = time.perf_counter()
        with heartbeat(f"evaluating {method} {target}"):
            again = fileformat.load(path, model_like=model)
            score, kl = measure(again)
        row.update(status="ok", file_bytes=size, ratio=fp32_bytes / size,
                   bits_per_weight=8 * size / n_weights, score=score, kl=kl,
                   eval_seconds=time.perf_counter() - start, path=str(path),
                   notes=list(report(again).notes))
    except NetshrinkError as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}",
                   seconds=row["seconds"] or time.perf_counter() - start)
    except Exception as e:  # a bug: keep the sweep going, show the traceback, retry later
        logger.error("%s", traceback.format_exc())
        row.update(status="failed", error=f"internal error {type(e).__name__}: {e}",
                   seconds=row["seconds"] or time.perf_counter() - start, retry=True)
    return row


# ------------------------------------------------------------------------------ outputs


def pareto_frontier(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The successful cells that no other is both no larger than and better than, by size."""
    ok = sorted((dict(r) for r in rows if r.get("status") == "ok"),
                key=lambda r: (r["file_bytes"], -_goodness(r)))
    frontier: list[dict[str, Any]] = []
    for r in ok:
        if not frontier or _goodness(r) > _goodness(frontier[-1]):
            frontier.append(r)
    return frontier


def _goodness(row: Mapping[str, Any]) -> float:
    """The row's score with higher always better (perplexity is negated)."""
    return -row["score"] if row.get("metric") in LOWER_IS_BETTER else row["score"]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_results(baseline: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The plain-text results table, baseline first; failed cells' reasons below it."""
    metric = baseline["metric"]
    headers = ["method", "target", "file bytes", "ratio", "bits/weight", metric, "seconds"]
    table = []
    for r in [baseline, *rows]:
        if r["status"] != "ok":
            table.append([r["method"], r["target"], "-", "-", "-", "failed",
                          _fmt(r["seconds"], ".0f")])
            continue
        table.append([r["method"], r["target"], f"{r['file_bytes']:.0f}",
                      f"x{r['ratio']:.1f}", f"{r['bits_per_weight']:.2f}",
                      f"{r['score']:.4f}", _fmt(r["seconds"], ".0f")])
    lines = [format_table(headers, table)]
    lines += [f"{r['method']} {r['target']} failed: {r['error']}" for r in rows
              if r["status"] != "ok"]
    return "\n".join(lines)


def write_outputs(result: SweepResult, config: Mapping[str, Any]) -> None:
    """results.csv, results.json, pareto.png/.svg (when matplotlib is there), report.html."""
    out = result.out_dir
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    atomic_write(out / "results.csv", buf.getvalue().encode())
    _write_json(out / "results.json", {"columns": COLUMNS, "metric": result.metric,
                                       "baseline": result.baseline, "rows": result.rows,
                                       "config": config})
    result.files.update({"csv": out / "results.csv", "json": out / "results.json"})
    svg = None
    try:
        svg = plot_pareto(result, out / "pareto")
    except ImportError:
        print(PLOT_HINT)  # one line, not a warning: the sweep itself is complete
    else:
        result.files.update({"png": out / "pareto.png", "svg": out / "pareto.svg"})
    atomic_write(out / "report.html", render_html(result, svg).encode())
    result.files["html"] = out / "report.html"


def plot_pareto(result: SweepResult, stem: Path) -> str:
    """Draw file bytes (log x) against the metric: one series per method, the Pareto
    frontier, the fp32 baseline as a horizontal line; write stem.png and stem.svg and return
    the SVG text. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, NullFormatter

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "netshrink"}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in result.rows):
            pts = sorted((r["file_bytes"], r["score"], r["target"]) for r in result.rows
                         if r["method"] == method and r["status"] == "ok")
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, alpha=0.85)
            for x, y, t in pts:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = result.frontier()
        if front:
            ax.step([r["file_bytes"] for r in front], [r["score"] for r in front], "k--",
                    where="post", linewidth=1, label="Pareto frontier")
        base = result.baseline
        ax.axhline(base["score"], color="grey", linewidth=1, linestyle=":",
                   label=f"fp32 baseline ({base['file_bytes']:.0f} B)")
        ax.set_xscale("log")
        if result.metric in LOWER_IS_BETTER:
            ax.set_yscale("log")  # perplexity spans orders of magnitude once it breaks
        sizes = [r["file_bytes"] for r in result.rows if r["status"] == "ok"]
        narrow = bool(sizes) and max(sizes) < 10 * min(sizes)  # label minor ticks then
        ax.xaxis.set_major_formatter(EngFormatter(unit="B", places=0))
        ax.xaxis.set_minor_formatter(EngFormatter(unit="B") if narrow
                                     else NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("file bytes (.nsk on disk, log scale)")
        ax.set_ylabel(result.metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        meta = {"Date": None}
        fig.savefig(f"{stem}.png", dpi=120)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=meta)
        plt.close(fig)
    svg = buf.getvalue()
    atomic_write(f"{stem}.svg", svg.encode())
    return svg


def render_html(result: SweepResult, svg: str | None) -> str:
    """A small self-contained HTML page: the inline SVG plot (if drawn) and the table."""
    head = ["method", "target", "status", "file bytes", "ratio", "bits/weight",
            result.metric, "seconds", "error"]
    body = []
    for r in [result.baseline, *result.rows]:
        ok = r["status"] == "ok"
        cells = [r["method"], r["target"], r["status"],
                 f"{r['file_bytes']:.0f}" if ok else "-", f"x{r['ratio']:.2f}" if ok else "-",
                 f"{r['bits_per_weight']:.2f}" if ok else "-", f"{r['score']:.4f}" if ok else "-",
                 _fmt(r["seconds"], ".1f"), r["error"] or ""]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + "</tr>")
    if svg:
        figure = svg[svg.find("<svg"):]
    else:
        figure = f"<p>{html.escape(PLOT_HINT)}</p>"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>netshrink sweep</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left}svg{max-width:100%;height:auto}</style></head>\n"
        f"<body><h1>netshrink sweep: {html.escape(result.metric)} against file size</h1>\n"
        f"{figure}\n<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n"
        + "\n".join(body) + "\n</table>\n<p>file bytes: the .nsk file on disk; ratio: fp32 "
        "bytes / file bytes; the metric is measured on the reloaded file.</p></body></html>\n")
