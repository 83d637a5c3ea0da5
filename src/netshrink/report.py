"""The per-layer report: bits per weight, SQNR, ratio, codebook usage, and the totals.

All sizes come from the layers' own `stored()` declarations via `size.py`, so the report
says exactly what `save` writes (plus the file header, shown by `netshrink inspect`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .encoding import Encoding
from .fileformat import header_bytes
from .layers import CompressedLayer, stored_modules
from .size import format_bytes, fp32_bits, model_bits, tensor_bits


@dataclass
class LayerRow:
    """One compressed layer: what it stores and how well it approximates the original."""

    name: str
    kind: str
    shape: tuple[int, ...]
    n_weights: int
    stored_bits: int
    bits_per_weight: float
    ratio: float
    sqnr_db: float | None
    detail: str


@dataclass
class Report:
    """Whole-model sizes and one row per compressed layer.

    compressed_bytes: the stored tensors (what the size accounting counts);
    header_bytes: the file's header and manifest; `file_bytes` is their sum, the size on
    disk, and `ratio` is fp32 bytes / file bytes. weights_compressed / weights_total give
    the share of the model's weights (floating parameters of dim >= 2) that was
    compressed. calibration: the record of the calibration stage (calibrate.py: samples,
    source, seconds, per-layer relative output error before/after), None when the model
    was not calibrated in this process (it is not saved in files). notes: what the method
    reported about its choices (the `Notes` of its `prepare` / `encode`, e.g. PQF's
    permutation, ALDS's keep ratio) and remarks such as dtype casts made on load; facts:
    the method's facts as a JSON-able dict.
    """

    method: str | None
    target: str | None
    baseline_bytes: float
    compressed_bytes: float
    layers: list[LayerRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0
    weights_compressed: int | None = None
    weights_total: int | None = None
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def file_bytes(self) -> float:
        return self.compressed_bytes + self.header_bytes

    @property
    def ratio(self) -> float:
        return self.baseline_bytes / self.file_bytes

    @property
    def compressed_share(self) -> float | None:
        """Fraction of the weights that was compressed (None when unknown)."""
        if not self.weights_total or self.weights_compressed is None:
            return None
        return self.weights_compressed / self.weights_total

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["file_bytes"] = self.file_bytes
        out["compressed_share"] = self.compressed_share
        return out

    def summary(self) -> str:
        """The totals in two lines: sizes and ratio, and the share compressed."""
        lines = [f"method {self.method} target {self.target}: fp32 baseline "
                 f"{format_bytes(self.baseline_bytes)} ({self.baseline_bytes:.0f} B) -> file "
                 f"{format_bytes(self.file_bytes)} ({self.file_bytes:.0f} B = "
                 f"{self.compressed_bytes:.0f} B stored tensors + {self.header_bytes} B "
                 f"header), x{self.ratio:.2f}"]
        share = self.compressed_share
        if share is not None:
            lines.append(f"compressed {self.weights_compressed} of {self.weights_total} "
                         f"weights ({share:.1%}); {len(self.skipped)} kept dense (listed above)")
        lines += [f"note: {n}" for n in self.notes]
        if self.calibration:
            lines.append(calibration_line(self.calibration))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<8} {'weights':>9} {'bits/w':>7} {'ratio':>7} " \
               f"{'SQNR dB':>8}  detail"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            sq = "inf" if r.sqnr_db is not None and math.isinf(r.sqnr_db) else (
                f"{r.sqnr_db:.2f}" if r.sqnr_db is not None else "-")
            if r.n_weights:
                per_weight = f"{r.n_weights:>9} {r.bits_per_weight:>7.3f} {r.ratio:>7.1f}"
            else:  # a shared module: its bits serve many layers
                per_weight = f"{'shared':>9} {'-':>7} {'-':>7}"
            lines.append(f"{r.name[-28:]:<28} {r.kind:<8} {per_weight} {sq:>8}  "
                         f"{r.detail or f'{r.stored_bits} bits stored'}")
        for name, why in self.skipped.items():
            lines.append(f"{name[-28:]:<28} {'dense':<8} {'':>9} {'':>7} {'':>7} {'':>8}  {why}")
        lines.append("-" * len(head))
        lines.append(self.summary())
        return "\n".join(lines)


def _row(name: str, kind: str, shape: tuple[int, ...], bits: int, sqnr: Any, detail: str
         ) -> LayerRow:
    """A report row; a shared module (no weight shape of its own) has no per-weight figures."""
    n = math.prod(shape) if shape else 0
    return LayerRow(name, kind, shape, n, bits, bits / n if n else math.nan,
                    32 * n / bits if n else math.nan,
                    float(sqnr) if sqnr is not None else None, detail)


def report(model: nn.Module) -> Report:
    """The report of a compressed (or loaded) model."""
    info = getattr(model, "netshrink_info", None) or {}
    stats = info.get("layers", {})
    rows = []
    for name, module in stored_modules(model):
        shape = module.weight_shape if isinstance(module, CompressedLayer) else ()
        bits = sum(tensor_bits(t, enc) for t, enc in module.stored().values())
        rows.append(_row(name, module.kind, shape, bits, stats.get(name, {}).get("sqnr_db"),
                         module.describe()))
    baseline = info.get("baseline_bits") or fp32_bits(model)
    return Report(info.get("method"), info.get("target"), baseline / 8, model_bits(model) / 8,
                  rows, dict(info.get("skipped", {})), header_bytes(model),
                  info.get("weights_compressed"), info.get("weights_total"),
                  list(info.get("notes", [])), dict(info.get("facts", {})),
                  info.get("calibration"))


def calibration_line(record: dict[str, Any]) -> str:
    """One line on the calibration stage: samples and their source, time, layers and
    mean relative output error before -> after."""
    line = (f"calibration: {record['samples']} samples ({record['source']}), "
            f"{record['seconds']:.1f} s, {len(record['layers'])} layers re-encoded")
    if record.get("mean_error_before") is not None:
        line += (f", mean relative output error {record['mean_error_before']:.4g} -> "
                 f"{record['mean_error_after']:.4g}")
    if record.get("not_applicable"):
        line += f", {len(record['not_applicable'])} left as planned"
    rec = record.get("reconstruct")
    if rec:
        line += (f"; block reconstruction: {len(rec['blocks'])} blocks, {rec['steps']} steps "
                 f"each on {rec['samples']} samples, {rec['seconds']:.1f} s, output error "
                 f"{rec['output_error_before']:.4g} -> {rec['output_error_after']:.4g}")
    return line


def report_from_manifest(manifest: dict[str, Any], header: int = 0) -> Report:
    """The report of a saved file, read from its manifest alone (no model needed);
    `header` is the file's header bytes (`inspect_file`)."""
    info = manifest.get("info") or {}
    stats = info.get("layers", {})
    rows = []
    total = 0
    for name, entry in manifest["layers"].items():
        spec = entry["spec"]
        shape = tuple(spec.get("weight_shape", ()))
        bits = sum(Encoding(enc).nbits(math.prod(tshape))
                   for enc, tshape, _ in entry["tensors"].values())
        total += bits
        detail = ", ".join(f"{t} {enc}{list(s)}" for t, (enc, s, _) in entry["tensors"].items())
        rows.append(_row(name, spec["kind"], shape, bits, stats.get(name, {}).get("sqnr_db"),
                         detail))
    total += sum(Encoding(e[1]).nbits(math.prod(e[2])) for e in manifest["dense"] if e[1] != "=")
    baseline = info.get("baseline_bits") or total
    return Report(info.get("method"), info.get("target"), baseline / 8, total / 8, rows,
                  dict(info.get("skipped", {})), header, info.get("weights_compressed"),
                  info.get("weights_total"), list(info.get("notes", [])),
                  dict(info.get("facts", {})))


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned (used by the
    demo and benchmarks; callers format their numbers)."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

