"""`pqf`: Permute, Quantize, and Fine-tune (Martinez et al., CVPR 2021; METHODS.md, PQF).

1. Product quantization (METHODS.md, "Subvectors"): each output row of a conv / linear
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

Sizes (`_plan`): `block="small"` / `"large"` fix d per layer kind as in the paper's
settings (3x3: 9 / 18; 1x1: 4 / 8; classifier: 4); the target then picks k per layer (at
most `k`, `k_fc` for the classifier) with `size.allocate`; `block="auto"` lets the target
pick d too. The planner's distortion estimate is the Gaussian rate-distortion bound the
permutation objective also comes from: D = n det(Sigma_d)^(1/d) k^(-2/d).

Depthwise convs (rows of a single kh x kw kernel) are decided by the planner among: kept
dense, or quantized with a per-output-channel scale at d = kh*kw or d = kw (a
per-tensor codebook without scale collapses them; DESIGN.md). `depthwise="scale"` or
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
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...errors import ConfigError
from ...graph import LayerRef, weight_layers
from ...kmeans import kmeans
from ...layers import (
    PalettizedLayer,
    channel_scales,
    compressed_layers,
    compressible,
    set_module,
    weight_rows,
)
from ...size import Budget, Encoding, Option, ceil_log2, format_bytes, palette_bits
from ...train import Finetune
from .. import Method, Notes, register_method
from .groups import analyse
from .permute import PermutationReport, apply_permutation, permute_model

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
        if self.codebook_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"codebook_dtype must be float16, bfloat16 or float32, "
                              f"got {self.codebook_dtype!r}")


def official_finetune(epochs: int = 9, batch_size: int | None = 128, distill: bool = False,
                      **options: Any) -> Finetune:
    """The official fine-tuning recipe (METHODS.md, PQF, "Fine-tuning"): Adam lr 1e-3,
    cosine decay per batch to 1e-6, plain cross-entropy (distill=True adds the
    foundation's distillation from the original, as the predecessor BGD does)."""
    settings: dict[str, Any] = dict(epochs=epochs, optimizer="adam", lr=1e-3,
                                    schedule="cosine", min_lr=1e-6, batch_size=batch_size,
                                    distill_weight=0.5 if distill else 0.0)
    settings.update(options)
    return Finetune(**settings)


# ---------------------------------------------------------------------------------------
# Planning: one choice per layer


@dataclass(frozen=True)
class Choice:
    """How one layer is stored: dense, or product-quantized with (d, k, scale)."""

    d: int = 0
    k: int = 0
    scale: bool = False

    @property
    def dense(self) -> bool:
        return self.d == 0

    def __str__(self) -> str:
        return "dense" if self.dense else (f"d={self.d} k={self.k}"
                                           + (" scaled" if self.scale else ""))


def _kernel(module: nn.Module) -> int:
    w = module.weight
    return int(np.prod(w.shape[2:])) if w.dim() > 2 else 1


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _d_candidates(ref: LayerRef, cfg: PQFConfig, classifier: bool) -> list[int]:
    """Subvector lengths allowed for a layer (each divides its rows)."""
    rows = ref.module.weight.shape[ref.out_axis]
    row_len = ref.n_weights // rows
    fixed = ref.option(cfg, "d")
    k2 = _kernel(ref.module)
    if fixed is not None:
        if row_len % fixed:
            raise ConfigError(f"layer {ref.name}: d={fixed} does not divide its rows of "
                              f"{row_len}")
        return [fixed]
    if is_depthwise(ref.module):
        cands = [k2, int(ref.module.kernel_size[-1])]
    elif classifier:
        cands = [4]
    elif cfg.block == "auto":
        cands = [1, 2, 4, 8] + ([k2 // 3, k2, 2 * k2] if k2 > 1 else [])
    elif k2 > 1:
        cands = [k2 if cfg.block == "small" else 2 * k2]
    else:
        cands = [4 if cfg.block == "small" else 8]
    ok = sorted({d for d in cands if d >= 1 and row_len % d == 0})
    if not ok:  # e.g. 1x1 with an odd number of inputs: largest divisor below the preset
        ok = [max(d for d in range(1, min(cands) + 1) if row_len % d == 0)]
    return ok


def _sigma_eff(x: torch.Tensor) -> float:
    """det(Sigma)^(1/d) of the subvectors x (n, d): the Gaussian bound's effective variance
    (eigenvalues floored at 1e-12 of the largest, so dead channels stay finite)."""
    if x.shape[0] < 2:
        return float(x.pow(2).mean()) if x.numel() else 0.0
    xc = x.double() - x.double().mean(0)
    cov = xc.T @ xc / (x.shape[0] - 1)
    ev = torch.linalg.eigvalsh(cov).clamp_min(0)
    top = float(ev.max())
    if top <= 0:
        return 0.0
    return float(torch.exp(torch.log(ev.clamp_min(top * 1e-12)).mean()))


def _options(ref: LayerRef, cfg: PQFConfig, classifier: bool, counts_side: bool,
             dense: bool = False) -> list[tuple[Choice, Option]]:
    module = ref.module
    if dense:
        return [(Choice(), Option(0, Encoding.of(module.weight.dtype).nbits(ref.n_weights)
                                  if counts_side else 32 * ref.n_weights, 0.0))]
    dtype = ref.option(cfg, "codebook_dtype")
    w = module.weight.detach().float().cpu()
    rows = weight_rows(w, ref.out_axis)
    depthwise = is_depthwise(module)
    mode = ref.option(cfg, "depthwise") if depthwise else None
    scale = True if depthwise else bool(ref.option(cfg, "scale"))
    out: list[tuple[Choice, Option]] = []
    if mode in ("auto", "dense"):
        out.append((Choice(), Option(0, Encoding.of(module.weight.dtype).nbits(ref.n_weights),
                                     0.0)))
    if mode == "dense":
        return out
    if scale:
        s, normed = channel_scales(rows, dtype)
        weight_sq = float(s.pow(2).sum()) * rows.shape[1]
    else:
        normed, weight_sq = rows, float(rows.shape[0] * rows.shape[1])
    k_max = ref.option(cfg, "k_fc" if classifier else "k")
    for d in _d_candidates(ref, cfg, classifier):
        subs = normed.reshape(-1, d)
        n_sub = subs.shape[0]
        sigma = _sigma_eff(subs)
        k_cap = max(2, min(k_max, 2 ** int(math.floor(math.log2(
            max(n_sub / ref.option(cfg, "min_points_per_code"), 2))))))
        for bits in range(1, ceil_log2(k_cap) + 1):
            k = 2**bits
            if counts_side:
                size = palette_bits(n_sub, bits, d, rows.shape[0] if scale else 0, dtype)
            else:
                size = bits * n_sub
            # weight_sq = sum over rows of scale^2 * row length (n_weights without scales),
            # so the estimate is in the units of the original weights
            distortion = weight_sq * sigma * k ** (-2.0 / d)
            out.append((Choice(d, k, scale), Option(len(out), size, distortion)))
    return out


def stem_name(model: nn.Module) -> str | None:
    """The first weight layer in module order: PQF leaves it dense."""
    layers = weight_layers(model)
    return layers[0][0] if layers else None


def classifier_name(model: nn.Module) -> str | None:
    """The last nn.Linear in module order: the paper gives it a larger codebook."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def plan(model: nn.Module, layers: list[LayerRef], budget: Budget, cfg: PQFConfig
         ) -> dict[str, Choice]:
    """One `Choice` per layer: least estimated distortion under the budget."""
    fc = classifier_name(model)
    stem = stem_name(model) if cfg.keep_stem else None
    counts_side = budget.target.kind != "bits"
    per_layer = [_options(ref, cfg, ref.name == fc, counts_side,
                          dense=ref.name == stem and not ref.options) for ref in layers]
    options = [[o for _, o in opts] for opts in per_layer]
    picks = budget.pick(options, "with the smallest codebooks")
    return {ref.name: opts[i][0] for ref, opts, i in zip(layers, per_layer, picks)}


# ---------------------------------------------------------------------------------------
# Quantization


def product_quantize(module: nn.Module, choice: Choice, *, out_axis: int = 0,
                     anneal: int = 20, iters: int = 20, seed: int = 0,
                     codebook_dtype: str = "float16") -> PalettizedLayer:
    """PQ of one module's weight (the module becomes the layer's host): rows cut into
    d-subvectors, k codewords from SR-C annealed k-means (random init, as the official code)
    or plain Lloyd (anneal=0); optional per-row scale first (rounded to its dtype)."""
    rows = weight_rows(module.weight.detach().float().cpu(), out_axis)
    scale = None
    if choice.scale:
        scale, rows = channel_scales(rows, codebook_dtype)
    subs = rows.reshape(-1, choice.d)
    result = kmeans(subs, choice.k, iters=iters, seed=seed, init="random", anneal=anneal)
    device = module.weight.device
    codes = result.labels.reshape(rows.shape[0], -1)
    return PalettizedLayer(module, codes.to(device), result.centroids.to(device),
                           None if scale is None else scale.to(device), codebook_dtype,
                           out_axis)


def paper_size_bits(model: nn.Module) -> int:
    """Size in the paper's convention (METHODS.md, PQF, "Size as the paper counts it"):
    codes at log2(k) bits, codebooks fp16, every other tensor fp32, BatchNorm counted as
    two vectors (running statistics folded), integer buffers not counted. Works for the
    original model too (then every weight is fp32)."""
    total = 0
    skip: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, PalettizedLayer):
            k, d = m.codebook.shape
            total += m.codes.numel() * ceil_log2(k) + 16 * k * d
            total += 32 * sum(t.numel() for n, t in m.host_state().items())
            if m.scale is not None:
                total += 32 * m.scale.numel()
            skip.add(name + ".")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            total += 2 * 32 * m.num_features
            skip.add(name + ".")
    for key, t in model.state_dict().items():
        if key.startswith(tuple(skip)) or not t.is_floating_point():
            continue
        total += 32 * t.numel()
    return total


@dataclass
class _PermCache:
    key: str = ""
    perms: list[tuple[int, np.ndarray]] = field(default_factory=list)
    report: PermutationReport | None = None


_PLAN_ATTR = "_pqf_plan"
"""Attribute of the model being compressed that carries `prepare`'s plan to `encode`."""


class PQFMethod(Method):
    name = "pqf"
    config_cls = PQFConfig
    summary = "Permute, Quantize, and Fine-tune: product quantization after a channel permutation"

    def __init__(self) -> None:
        # a memo of the last permutation search, keyed by the weights, d's, iters and seed
        # (compress plans up to three times; the search is the slow part)
        self._cache = _PermCache()

    def supports(self, module: nn.Module) -> str | None:
        reason = compressible(module)
        if reason is None and isinstance(module, nn.Embedding):
            return "embeddings are not part of PQF (convs and linears only)"
        return reason

    def prepare(self, model: nn.Module, layers: list[LayerRef], budget: Budget,
                config: PQFConfig, *, data: Any = None, seed: int = 0) -> Notes:
        """Plan sizes, then permute the model's channel groups (in place, same function) for
        the planned subvector lengths. The plan is made on the weights as given and handed
        to `encode` on the model being compressed (not on this shared instance), so that
        permuting or not compares the same (d, k) per layer. Returns the permutation's
        outcome for the report."""
        choices = plan(model, layers, budget, config)
        setattr(model, _PLAN_ATTR, ([r.name for r in layers], choices))
        if not config.permute:
            return Notes(["pqf permutation: off (permute=False)"])
        dims = {name: c.d for name, c in choices.items() if not c.dense}
        key = _cache_key(model, dims, config, seed)
        if key == self._cache.key and self._cache.report is not None:
            analysis = analyse(model)
            for index, perm in self._cache.perms:
                apply_permutation(analysis.groups[index], perm)
            return permutation_notes(self._cache.report)
        report = permute_model(model, dims, iters=config.permute_iters, seed=seed)
        if not report.traced:
            logger.warning("pqf: %s; quantizing without it", report.summary())
        self._cache = _PermCache(key, [(g.index, g.perm) for g in report.groups], report)
        return permutation_notes(report)

    def encode(self, model: nn.Module, layers: list[LayerRef], budget: Budget,
               config: PQFConfig, *, data: Any = None, seed: int = 0) -> Notes:
        """Product-quantize every planned layer; returns the plan (depthwise choices,
        layers kept dense and why) and the paper-convention size for the report."""
        planned = model.__dict__.pop(_PLAN_ATTR, None)
        if planned is not None and planned[0] == [r.name for r in layers]:
            choices = planned[1]
        else:
            choices = plan(model, layers, budget, config)
        fp32_paper = paper_size_bits(model)
        unused = _unused_budget(layers, choices, budget, config)  # before the weights move
        stem = stem_name(model) if config.keep_stem else None
        progress = tqdm(layers, desc="pqf", unit="layer", disable=None, leave=False)
        for i, ref in enumerate(progress):
            choice = choices[ref.name]
            if choice.dense:
                logger.info("pqf: %s kept dense (%s)", ref.name, _dense_reason(ref, stem))
                continue
            layer = product_quantize(ref.module, choice, out_axis=ref.out_axis,
                                     anneal=config.anneal, iters=config.iters, seed=seed + i,
                                     codebook_dtype=ref.option(config, "codebook_dtype"))
            set_module(model, ref.name, layer)
        notes = plan_notes(layers, choices, config, stem, paper_size_bits(model), fp32_paper)
        return notes.add(unused)

    def finalize(self, model: nn.Module, config: Any) -> None:
        super().finalize(model, config)
        _finalize_note(model)


def _choice_bits(ref: LayerRef, choice: Choice, cfg: PQFConfig) -> int:
    """Stored bits of one planned layer except its bias (as `_options` counts them)."""
    if choice.dense:
        return Encoding.of(ref.module.weight.dtype).nbits(ref.n_weights)
    rows = ref.module.weight.shape[ref.out_axis] if choice.scale else 0
    return palette_bits(ref.n_weights // choice.d, ceil_log2(choice.k), choice.d, rows,
                        ref.option(cfg, "codebook_dtype"))


def _unused_budget(layers: list[LayerRef], choices: dict[str, Choice], budget: Budget,
                   cfg: PQFConfig) -> Notes | None:
    """A note (and a warning) when a size or ratio target is far from used: with d fixed by
    `block`, the largest codebooks (k <= `k`) store less than the target allows, so the
    file comes out smaller (and coarser) than asked."""
    if budget.target.kind == "bits":
        return None
    used, available = sum(_choice_bits(r, choices[r.name], cfg) for r in layers), \
        budget.layer_bits()
    if used >= 0.9 * available:
        return None
    line = (f"pqf: the layers use {format_bytes(used / 8)} of the "
            f"{format_bytes(available / 8)} the target leaves them: the largest codebooks "
            f"(k <= {cfg.k}, d from block={cfg.block!r}) are smaller than the target; "
            "block='auto' lets d shrink to use more")
    logger.warning("%s", line)
    return Notes([line], {"layer_bits_used": used, "layer_bits_available": int(available)})


def plan_of(model: nn.Module, layers: list[str]) -> dict[str, Choice]:
    """The `Choice` each of `layers` got, read from the compressed model (for tests and
    benchmarks): a PalettizedLayer's codebook is (k, d); any other layer is dense."""
    compressed = dict(compressed_layers(model))
    out = {}
    for name in layers:
        layer = compressed.get(name)
        if isinstance(layer, PalettizedLayer):
            k, d = layer.codebook.shape
            out[name] = Choice(int(d), int(k), layer.scale is not None)
        else:
            out[name] = Choice()
    return out


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
    facts: dict[str, Any] = {"traced": report.traced, "groups": len(report.groups),
                             "logdet_drop": round(report.improvement, 4),
                             "not_permuted": len(report.blocked)}
    if not report.traced:
        return Notes([f"pqf permutation: none, the model cannot be traced ({report.reason}); "
                      "quantized without permutation"], {"permutation": facts})
    line = (f"pqf permutation: {len(report.groups)} channel groups, log det "
            f"-{report.improvement:.2f} nats")
    if report.blocked:
        line += "; not permuted at " + "; ".join(report.blocked)
    return Notes([line], {"permutation": facts})


def plan_notes(layers: list[LayerRef], choices: dict[str, Choice], cfg: PQFConfig,
               stem: str | None, paper_bits: int, fp32_paper_bits: int) -> Notes:
    """The plan for the report: each depthwise conv's choice (and whether the size
    planner or `depthwise=` made it), the layers kept dense and why, and the size in the
    paper's convention."""
    lines = []
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
            f"{ref.name} ({_dense_reason(ref, stem)})" for ref in dense))
    lines.append(f"pqf size as the paper counts it (other tensors fp32, BN folded to two "
                 f"vectors): {format_bytes(paper_bits / 8)}, "
                 f"x{fp32_paper_bits / max(paper_bits, 1):.2f} of fp32")
    return Notes(lines, {"paper_size_bits": paper_bits, "paper_fp32_bits": fp32_paper_bits})


def _finalize_note(model: nn.Module) -> None:
    logger.info("pqf: size in the paper's convention (codes, fp16 codebooks, other tensors "
                "fp32, BatchNorm as two vectors): %s", format_bytes(paper_size_bits(model) / 8))


def _cache_key(model: nn.Module, dims: dict[str, int], cfg: PQFConfig, seed: int) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    h.update(repr((sorted(dims.items()), cfg.permute_iters, seed)).encode())
    return h.hexdigest()


register_method(PQFMethod())
