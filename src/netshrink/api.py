"""`compress()`: plan -> encode -> fine-tune -> finalize, the library's one verb.

The input model is never modified: compression works on a deep copy. The returned module
runs and trains like any nn.Module; it carries a `netshrink_info` dict (method, target,
config, skipped layers with reasons, per-layer SQNR, fp32 baseline bits, and the method's
`Notes`: "notes" lines and "facts", present only when the method gave some) that `report`
and `save` read.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, FormatError, IncompleteCompressionError, NonFiniteError
from .fileformat import check_savable, header_bytes
from .graph import Selection, select_layers, weight_count
from .layers import compressed_layers
from .methods import Notes, get_method
from .size import Budget, dense_bits, format_bytes, fp32_bits, model_bits, parse_target
from .train import Finetune, fit

logger = logging.getLogger(__name__)

INFO_ATTR = "netshrink_info"


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|w|^2 / |w - w^|^2) in dB."""
    ref = reference.detach().double()
    noise = float(((ref - approx.detach().double()) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def compress(
    model: nn.Module,
    method: str = "kmeans",
    target: str = "4bit",
    data: Any = None,
    finetune: Finetune | None = None,
    *,
    layers: Selection = None,
    exclude: Selection = None,
    min_weights: int = 1024,
    overrides: Mapping[Any, Any] | None = None,
    config: Any = None,
    seed: int = 0,
    eval_data: Any = None,
    strict: bool = False,
    **options: Any,
) -> nn.Module:
    """Compress `model` with `method` to `target`; return a new, compressed module.

    target: '1.5MB' / '800KB' (the whole file on disk, header included), 'x20' (fp32 size
    / file size) or '3bit' (bits per compressible weight). data: a DataLoader of (inputs,
    labels) or unlabelled inputs, needed for fine-tuning. finetune: a `Finetune` config
    (None: post-training only); the loss is task loss plus distillation from the original.
    layers / exclude: name patterns, module types or predicates; overrides: {pattern or
    type: options dict, or None to keep dense}; the option `out_axis` names the output
    axis of an unknown layer kind. Extra keyword options go to the method's config.

    If less than half of the weights can be compressed, or a layer holding more than 1%
    of them is unsupported, a warning names the reason; `strict=True` raises
    `IncompleteCompressionError` instead. A NaN or infinite weight raises `NonFiniteError`.
    """
    algo = get_method(method)
    cfg = algo.make_config(config, **options)
    tgt = parse_target(target)
    if finetune is not None and not isinstance(finetune, Finetune):
        raise ConfigError("finetune must be a netshrink.Finetune or None")
    if finetune is not None and finetune.epochs > 0 and data is None:
        raise ConfigError("fine-tuning needs data: pass data=<DataLoader>")
    if min_weights < 0:
        raise ConfigError("min_weights must be >= 0")

    header_reserve: int | None = None
    for attempt in range(_MAX_PLANS):
        student = copy.deepcopy(model)
        chosen, skipped = select_layers(student, algo.supports, layers=layers,
                                        exclude=exclude, min_weights=min_weights,
                                        overrides=overrides)
        if attempt == 0:
            share = _check_coverage(student, chosen, skipped, strict)
        weights_bits = dense_bits((r.name, r.module.weight) for r in chosen)
        fixed_bits = model_bits(student) - weights_bits
        if header_reserve is None:
            header_reserve = _first_header_estimate(student, len(chosen))
        budget = Budget(tgt, fp32_bits(model), fixed_bits, sum(r.n_weights for r in chosen),
                        header_bits=8 * header_reserve)
        notes = Notes().add(algo.prepare(student, chosen, budget, cfg, data=data, seed=seed))
        originals = {ref.name: ref.module.weight.detach().clone() for ref in chosen}
        logger.info("%s: compressing %d layers (%d weights) to %s; %d layers kept dense",
                    algo.name, len(chosen), budget.n_weights, tgt, len(skipped))
        notes.add(algo.encode(student, chosen, budget, cfg, data=data, seed=seed))
        file_bits = budget.file_bits()
        if file_bits is None:
            break
        setattr(student, INFO_ATTR, _info(algo, tgt, cfg, seed, budget, skipped, share,
                                          _layer_stats(student, originals), notes))
        header = header_bytes(student) + _header_slack(len(chosen))
        fits = model_bits(student) + 8 * header <= file_bits
        wasteful = 8 * (header_reserve - header) > _RESERVE_WASTE * file_bits
        if (fits and not wasteful) or attempt == _MAX_PLANS - 1:
            break
        logger.info("the header needs %d bytes, %d were reserved: planning again",
                    header, header_reserve)
        header_reserve = header

    if finetune is not None and finetune.epochs > 0:
        was_training = model.training
        try:
            fit(student, data, finetune, teacher=model, eval_loader=eval_data,
                hooks=algo.hooks(student, cfg))
        finally:
            model.train(was_training)
    algo.finalize(student, cfg)
    student.eval()
    _check_finite(student)

    setattr(student, INFO_ATTR, _info(algo, tgt, cfg, seed, budget, skipped, share,
                                      _layer_stats(student, originals), notes))
    total = model_bits(student) + 8 * header_bytes(student)
    logger.info("compressed to %s (x%.2f of fp32 %s), header included",
                format_bytes(total / 8), budget.baseline_bits / total,
                format_bytes(budget.baseline_bits / 8))
    if file_bits is not None and total > file_bits:
        logger.warning("result %s exceeds the target %s", format_bytes(total / 8), tgt)
    return student


_MAX_PLANS = 3
_RESERVE_WASTE = 0.02  # plan again when the header reserve overshoots by 2% of the file


def _first_header_estimate(student: nn.Module, n_layers: int) -> int:
    """Header bytes reserved before encoding: the uncompressed model's header plus an
    allowance per compressed layer (its spec and statistics, zlib-compressed). The plan is
    redone with the measured header if this falls short."""
    return header_bytes(student) + 64 * n_layers + 256


def _header_slack(n_layers: int) -> int:
    """Room for the manifest to change after planning (fine-tuned per-layer statistics are
    other numbers of the same form)."""
    return 32 + 2 * n_layers


def _layer_stats(student: nn.Module, originals: dict[str, torch.Tensor]
                 ) -> dict[str, dict[str, float]]:
    comp = dict(compressed_layers(student))
    return {name: {"sqnr_db": round(sqnr_db(weight, comp[name].decode_weight()), 4)}
            for name, weight in originals.items() if name in comp}


def _info(algo: Any, tgt: Any, cfg: Any, seed: int, budget: Budget, skipped: dict[str, str],
          share: tuple[int, int], stats: dict[str, Any], notes: Notes) -> dict[str, Any]:
    """The model's `netshrink_info`. The method's notes and facts are added only when it
    gave some, so methods without notes save the same manifest as before they existed."""
    info = {
        "method": algo.name,
        "target": notes.target or tgt.text,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "seed": seed,
        "baseline_bits": budget.baseline_bits,
        "weights_compressed": share[0],
        "weights_total": share[1],
        "skipped": skipped,
        "layers": stats,
    }
    if notes.lines:
        info["notes"] = list(notes.lines)
    if notes.facts:
        info["facts"] = _jsonable(notes.facts)
    return info


def _skipped_size(model: nn.Module, name: str) -> int:
    """Weights held by a skipped entry: a module's weight, or a named parameter."""
    try:
        return model.get_submodule(name).weight.numel()
    except AttributeError:
        return model.get_parameter(name).numel()


def _check_coverage(student: nn.Module, chosen: list[Any], skipped: dict[str, str],
                    strict: bool) -> tuple[int, int]:
    """(compressed weights, all weights); warn (or raise with strict) when less than half
    can be compressed or an unsupported layer holds more than 1% of the weights. Also
    refuses non-finite input weights."""
    if not chosen:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no weight layers"
        raise ConfigError(f"no layer can be compressed ({reasons})")
    for ref in chosen:
        if not bool(torch.isfinite(ref.module.weight.detach()).all()):
            raise NonFiniteError(f"layer {ref.name!r}: the input weight holds NaN or inf "
                                 "values; compress a model with finite weights")
    total = weight_count(student)
    done = sum(r.n_weights for r in chosen)
    problems = []
    if done < 0.5 * total:
        problems.append(f"only {done / total:.1%} of the weights ({done} of {total}) can be "
                        "compressed")
    for name, reason in skipped.items():
        size = _skipped_size(student, name)
        if reason.startswith("unsupported") and size > 0.01 * total:
            problems.append(f"{name} ({size} weights, {size / total:.1%}) is skipped: {reason}")
    if problems:
        message = "; ".join(problems)
        if strict:
            raise IncompleteCompressionError(message)
        logger.warning("%s", message)
    return done, total


def _check_finite(student: nn.Module) -> None:
    """Every decoded weight and stored tensor is finite, or a clear error."""
    for name, layer in compressed_layers(student):
        if not bool(torch.isfinite(layer.decode_weight().detach()).all()):
            stored = ", ".join(f"{t} {enc.name}" for t, (_, enc) in layer.stored().items())
            raise NonFiniteError(f"layer {name!r}: the decoded weight is not finite; its "
                                 f"stored tensors ({stored}) cannot hold these values "
                                 "(a wider codebook_dtype may)")
    try:
        check_savable(student)
    except FormatError as e:
        raise NonFiniteError(str(e)) from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
