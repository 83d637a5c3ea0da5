"""`pqf`: Permute, Quantize, and Fine-tune (Martinez et al., CVPR 2021; docs/methods/pqf.md).

1. Product quantization (docs/methods/pqf.md#subvectors): each output row of a conv / linear
   weight is cut into subvectors of d consecutive entries (C_in-major, then kh, kw); each
   subvector is replaced by the nearest of k codewords of a per-layer fp16 codebook; the
   codes are stored bit-packed at log2(k) bits (`layers.PalettizedLayer`, shared with
   `kmeans`). k <= min(k_max, 2^floor(log2(n_subvectors / 4))).
2. Permutation (`permute.py`, `groups.py`): before quantizing, the channels of every
   coupled group are reordered to minimise the summed log det of the readers' subvector
   covariances; the network's function does not change.
3. SR-C annealed k-means (`netshrink.kmeans.kmeans(..., anneal=I)`), random init.
4. Fine-tuning through `compress(..., finetune=...)`: codes are buffers (frozen); codebooks,
   BatchNorm, biases and dense layers train. `official_finetune()` is the paper's recipe.

Sizes (`plan.py`): `block="small"` / `"large"` fix d per layer kind as in the paper's
settings (3x3: 9 / 18; 1x1: 4 / 8; classifier: 4); the target then picks k per layer (at
most `k`, `k_fc` for the classifier) with `size.allocate`; `block="auto"` lets the target
pick d too. The planner's distortion estimate is the Gaussian rate-distortion bound the
permutation objective also comes from: D = n det(Sigma_d)^(1/d) k^(-2/d).

Depthwise convs (rows of a single kh x kw kernel) are decided by the planner among: kept
dense, or quantized with a per-output-channel scale at d = kh*kw or d = kw (a
per-tensor codebook without scale collapses them; docs/design.md#per-channel-scales).
`depthwise="scale"` or
`"dense"` forces one. The stem (the first weight layer) stays dense by default.

Report (`netshrink.report(model).notes`, saved in the file): the permutation's outcome
(groups permuted and log det drop; the ops where channels could not be followed, whose
channels keep their order, or that the model could not be traced at all), each depthwise
conv's choice and who made it, the layers kept dense and why, and the size in the paper's
convention; `netshrink_info["facts"]` has "permutation" (counts) and "paper_size_bits" /
"paper_fp32_bits". Each layer's (d, k, scale) is in its report row (`plan_of` reads it back).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm import tqdm

from ...errors import ConfigError
from ...graph import LayerRef, weight_layers
from ...layers import compressible, set_module
from ...palette import check_codebook_dtype, fit_palette, palette_spec
from ...size import Budget, format_bytes
from ...train import Finetune
from .. import Method, Notes, Plan, Request, register_method
from .groups import Analysis, analyse
from .permute import PermutationReport, permute_model, scorable
from .plan import (
    Choice,
    classifier_name,
    is_depthwise,
    layer_options,
    paper_size_bits,
    plan_of,
    stem_name,
)

__all__ = ["Choice", "PQFConfig", "PQFMethod", "is_depthwise", "official_finetune",
           "paper_size_bits", "plan_of", "search_again"]

logger = logging.getLogger(__name__)

_BLOCKS = ("small", "large", "auto")
_DEPTHWISE = ("auto", "scale", "dense")


@dataclass(frozen=True)
class PQFConfig:
    """Options of `pqf` (d, k, scale, depthwise may be overridden per layer).

    block: "small" / "large" (the paper's d per layer kind) or "auto" (the target picks d);
    d: a fixed subvector length for every layer (else from `block`); k / k_fc: largest
    codebook for convs / the classifier (the last Linear); permute / permute_iters: the
    permutation search (10,000 pair swaps per group as in the official code); anneal: SR-C
    passes I (0: plain Lloyd for `iters` iterations); scale: per-output-channel scale on
    non-depthwise layers (not in the paper); depthwise: "auto" (planner), "scale", "dense";
    keep_stem: leave the first weight layer dense (the paper does).
    """

    block: str = "small"
    d: int | None = None
    k: int = 256
    k_fc: int = 2048
    permute: bool = True
    permute_iters: int = 10_000
    anneal: int = 20
    iters: int = 20
    scale: bool = False
    depthwise: str = "auto"
    keep_stem: bool = True
    min_points_per_code: int = 4
    codebook_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.block not in _BLOCKS:
            raise ConfigError(f"block must be one of {_BLOCKS}, got {self.block!r}")
        if self.depthwise not in _DEPTHWISE:
            raise ConfigError(f"depthwise must be one of {_DEPTHWISE}, got {self.depthwise!r}")
        if self.d is not None and not (isinstance(self.d, int) and self.d >= 1):
            raise ConfigError(f"d must be a positive integer or None, got {self.d!r}")
        for name in ("k", "k_fc"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 2 <= value <= 2**16 or value & (value - 1):
                raise ConfigError(f"{name} must be a power of two in 2..65536, got {value!r}")
        for name in ("permute_iters", "anneal", "iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.min_points_per_code, int) or self.min_points_per_code < 1:
            raise ConfigError("min_points_per_code must be an integer >= 1")
        check_codebook_dtype(self.codebook_dtype)


def official_finetune(epochs: int = 9, batch_size: int | None = 128, distill: bool = False,
                      **options: Any) -> Finetune:
    """The official fine-tuning recipe (docs/methods/pqf.md#fine-tuning): Adam lr 1e-3,
    cosine decay per batch to 1e-6, plain cross-entropy (distill=True adds the
    foundation's distillation from the original, as the predecessor BGD does)."""
    settings: dict[str, Any] = dict(epochs=epochs, optimizer="adam", lr=1e-3,
                                    schedule="cosine", min_lr=1e-6, batch_size=batch_size,
                                    distill_weight=0.5 if distill else 0.0)
    settings.update(options)
    return Finetune(**settings)


@dataclass
class _Survey:
    """What `PQFMethod.survey` measures once: every layer's options, the stem kept dense,
    and the channel groups (None when `permute=False`)."""

    options: list[list[tuple[Choice, Any]]]
    stem: str | None
    analysis: Analysis | None
    fp32_paper_bits: int


@dataclass
class _Detail:
    """The plan's choices and what apply needs to report them."""

    choices: dict[str, Choice]
    stem: str | None
    analysis: Analysis | None
    unused: Notes | None


class PQFMethod(Method):
    name = "pqf"
    config_cls = PQFConfig
    summary = "Permute, Quantize, and Fine-tune: product quantization after a channel permutation"

    def supports(self, module: nn.Module) -> str | None:
        reason = compressible(module)
        if reason is None and isinstance(module, nn.Embedding):
            return "embeddings are not part of PQF (convs and linears only)"
        return reason

    def survey(self, request: Request) -> _Survey:
        """Each layer's options (sizes and estimated distortion of every (d, k)) on the
        weights as given, and the model's channel groups for the permutation."""
        cfg, model = request.config, request.model
        fc = classifier_name(model)
        stem = stem_name(model) if cfg.keep_stem else None
        options = [layer_options(ref, cfg, ref.name == fc,
                                 dense=ref.name == stem and not ref.options)
                   for ref in tqdm(request.layers, desc="pqf plan", unit="layer",
                                   disable=None, leave=False)]
        analysis = analyse(model) if cfg.permute else None
        return _Survey(options, stem, analysis, paper_size_bits(model))

    def plan(self, request: Request, survey: _Survey, budget: Budget) -> Plan:
        """One `Choice` per layer: least estimated distortion under the budget. The plan is
        made on the weights as given (before the permutation), so that permuting or not
        compares the same (d, k) per layer."""
        cfg = request.config
        picks = budget.pick([[o for _, o in opts] for opts in survey.options],
                            "with the smallest codebooks")
        choices = {ref.name: opts[i][0]
                   for ref, opts, i in zip(request.layers, survey.options, picks)}
        specs = {ref.name: palette_spec(ref, c.k, c.d, c.scale,
                                        ref.option(cfg, "codebook_dtype"))
                 for ref in request.layers if not (c := choices[ref.name]).dense}
        detail = _Detail(choices, survey.stem, survey.analysis,
                         _unused_budget(request.layers, survey.options, picks, budget, cfg))
        expected = Notes().add(_expected_permutation(detail, cfg))
        fp32 = survey.fp32_paper_bits  # the compressed size, a placeholder of its magnitude
        expected.add(plan_notes(request.layers, detail, cfg, fp32 // 17 + 12345, fp32))
        return Plan(specs, expected=expected, detail=detail)

    def prepare(self, model: nn.Module, plan: Plan, request: Request) -> Notes:
        """Permute the model's channel groups (in place, same function) for the planned
        subvector lengths; returns the permutation's outcome for the report."""
        cfg = request.config
        if not cfg.permute:
            return Notes(["pqf permutation: off (permute=False)"])
        report = permute_model(model, _dims(plan.detail), iters=cfg.permute_iters,
                               seed=request.seed, analysis=plan.detail.analysis)
        if not report.traced:
            logger.warning("pqf: %s; quantizing without it", report.summary())
        return permutation_notes(report)

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> Notes:
        """Product-quantize every planned layer; returns the plan (depthwise choices,
        layers kept dense and why) and the paper-convention size for the report."""
        cfg, detail = request.config, plan.detail
        fp32_paper = paper_size_bits(model)
        progress = tqdm(request.layers, desc="pqf", unit="layer", disable=None, leave=False)
        for i, ref in enumerate(progress):
            spec = plan.layers.get(ref.name)
            if spec is None:
                logger.info("pqf: %s kept dense (%s)", ref.name, _dense_reason(ref, detail.stem))
                continue
            layer = fit_palette(ref.module, spec, seed=request.seed + i, init="random",
                                iters=cfg.iters, anneal=cfg.anneal)
            set_module(model, ref.name, layer)
        if detail.unused is not None:
            logger.warning("%s", detail.unused.lines[0])
        notes = plan_notes(request.layers, detail, cfg, paper_size_bits(model), fp32_paper)
        return notes.add(detail.unused)


def _dims(detail: _Detail) -> dict[str, int]:
    return {name: c.d for name, c in detail.choices.items() if not c.dense}


def _unused_budget(layers: list[LayerRef], options: list[list[tuple[Choice, Any]]],
                   picks: list[int], budget: Budget, cfg: PQFConfig) -> Notes | None:
    """A note when a size or ratio target is far from used: with d fixed by `block`, the
    largest codebooks (k <= `k`) store less than the target allows, so the file comes out
    smaller (and coarser) than asked."""
    if budget.target.kind == "bits":
        return None
    used = sum(opts[i][1].stored_bits for opts, i in zip(options, picks))
    available = budget.available()
    if used >= 0.9 * available:
        return None
    line = (f"pqf: the layers use {format_bytes(used / 8)} of the "
            f"{format_bytes(available / 8)} the target leaves them: the largest codebooks "
            f"(k <= {cfg.k}, d from block={cfg.block!r}) are smaller than the target; "
            "block='auto' lets d shrink to use more")
    return Notes([line], {"layer_bits_used": used, "layer_bits_available": int(available)})


def search_again(model: nn.Module, small: nn.Module) -> PermutationReport:
    """The permutation search that compressing `model` into `small` made, run again on a
    copy of `model` with the same d's, iterations and seed (so the same result), for
    benchmarks that time it: compress keeps no timings (its report is saved and stays
    the same between identical runs)."""
    info = small.netshrink_info
    names = [name for name, _ in weight_layers(model)]
    dims = {n: c.d for n, c in plan_of(small, names).items() if not c.dense}
    return permute_model(copy.deepcopy(model), dims, iters=info["config"]["permute_iters"],
                         seed=info["seed"])


def _dense_reason(ref: LayerRef, stem: str | None) -> str:
    return "stem, as in the paper" if ref.name == stem else "size planner"


def permutation_notes(report: PermutationReport) -> Notes:
    """The permutation's outcome for the report: groups permuted and the objective's drop,
    and the ops where channels could not be followed (their channels keep their order, i.e.
    fall back to no permutation; the model's input and output always do), or that the
    model could not be traced at all."""
    return _permutation_notes(report.traced, report.reason, len(report.groups),
                              report.improvement, report.blocked)


def _permutation_notes(traced: bool, reason: str, groups: int, improvement: float,
                       blocked: list[str]) -> Notes:
    facts: dict[str, Any] = {"traced": traced, "groups": groups,
                             "logdet_drop": round(improvement, 4),
                             "not_permuted": len(blocked)}
    if not traced:
        return Notes([f"pqf permutation: none, the model cannot be traced ({reason}); "
                      "quantized without permutation"], {"permutation": facts})
    line = f"pqf permutation: {groups} channel groups, log det -{improvement:.2f} nats"
    if blocked:
        line += "; not permuted at " + "; ".join(blocked)
    return Notes([line], {"permutation": facts})


def _expected_permutation(detail: _Detail, cfg: PQFConfig) -> Notes:
    """The permutation note `prepare` will return, with a placeholder log-det drop: the
    groups it will search are those with a reader the plan quantizes."""
    if detail.analysis is None:
        return Notes(["pqf permutation: off (permute=False)"])
    a, dims = detail.analysis, _dims(detail)
    searched = sum(any(scorable(m, g.size, dims.get(m.name)) for m in g.readers())
                   for g in a.groups)
    return _permutation_notes(a.traced, a.reason, searched, 12.3456, a.blocked)


def plan_notes(layers: list[LayerRef], detail: _Detail, cfg: PQFConfig, paper_bits: int,
               fp32_paper_bits: int) -> Notes:
    """The plan for the report: each depthwise conv's choice (and whether the size
    planner or `depthwise=` made it), the layers kept dense and why, and the size in the
    paper's convention."""
    lines = []
    choices = detail.choices
    depthwise = [ref for ref in layers if is_depthwise(ref.module)]
    dw_names = {ref.name for ref in depthwise}
    if depthwise:
        modes = {ref.option(cfg, "depthwise") for ref in depthwise}
        who = ("size planner" if modes == {"auto"} else
               "depthwise=" + "/".join(sorted(modes)))
        lines.append(f"pqf depthwise ({who}): "
                     + ", ".join(f"{ref.name} {choices[ref.name]}" for ref in depthwise))
    dense = [ref for ref in layers if choices[ref.name].dense and ref.name not in dw_names]
    if dense:
        lines.append("pqf kept dense: " + ", ".join(
            f"{ref.name} ({_dense_reason(ref, detail.stem)})" for ref in dense))
    lines.append(f"pqf size as the paper counts it (other tensors fp32, BN folded to two "
                 f"vectors): {format_bytes(paper_bits / 8)}, "
                 f"x{fp32_paper_bits / max(paper_bits, 1):.2f} of fp32")
    return Notes(lines, {"paper_size_bits": paper_bits, "paper_fp32_bits": fp32_paper_bits})


register_method(PQFMethod())
