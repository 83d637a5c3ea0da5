"""`compress()`: plan -> encode -> fine-tune -> finalize, the library's one verb.

The input model is never modified: compression works on a deep copy. The returned module
runs and trains like any nn.Module; it carries a `netshrink_info` dict (method, target,
config, skipped layers with reasons, per-layer SQNR, fp32 baseline bits) that `report`
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

from .errors import ConfigError
from .graph import Selection, select_layers
from .layers import compressed_layers
from .methods import get_method
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
    **options: Any,
) -> nn.Module:
    """Compress `model` with `method` to `target`; return a new, compressed module.

    target: '1.5MB' / '800KB' (whole stored model), 'x20' (ratio to fp32) or '3bit'
    (bits per compressible weight). data: a DataLoader of (inputs, labels) or unlabelled
    inputs, needed for fine-tuning. finetune: a `Finetune` config (None: post-training
    only); the loss is task loss plus distillation from the original model. layers /
    exclude: name patterns, module types or predicates; overrides: {pattern or type:
    options dict, or None to keep dense}. Extra keyword options go to the method's config.
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

    student = copy.deepcopy(model)
    chosen, skipped = select_layers(student, algo.supports, layers=layers, exclude=exclude,
                                    min_weights=min_weights, overrides=overrides)
    if not chosen:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no weight layers"
        raise ConfigError(f"no layer can be compressed ({reasons})")
    originals = {ref.name: ref.module.weight.detach().clone() for ref in chosen}
    weights_bits = dense_bits((r.name, r.module.weight) for r in chosen)
    budget = Budget(tgt, fp32_bits(model), model_bits(student) - weights_bits,
                    sum(r.n_weights for r in chosen))
    logger.info("%s: compressing %d layers (%d weights) to %s; %d layers kept dense",
                algo.name, len(chosen), budget.n_weights, tgt, len(skipped))
    algo.encode(student, chosen, budget, cfg, data=data, seed=seed)

    if finetune is not None and finetune.epochs > 0:
        was_training = model.training
        try:
            fit(student, data, finetune, teacher=model, eval_loader=eval_data,
                hooks=algo.hooks(student, cfg))
        finally:
            model.train(was_training)
    algo.finalize(student, cfg)
    student.eval()

    comp = dict(compressed_layers(student))
    stats = {name: {"sqnr_db": round(sqnr_db(weight, comp[name].decode_weight()), 4)}
             for name, weight in originals.items()}
    info = {
        "method": algo.name,
        "target": tgt.text,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "seed": seed,
        "baseline_bits": budget.baseline_bits,
        "skipped": skipped,
        "layers": stats,
    }
    setattr(student, INFO_ATTR, info)
    total = model_bits(student)
    logger.info("compressed to %s (x%.2f of fp32 %s)", format_bytes(total / 8),
                budget.baseline_bits / total, format_bytes(budget.baseline_bits / 8))
    if tgt.kind in ("bytes", "ratio") and total > budget.total_bits() + 0.5:
        logger.warning("result %s exceeds the target %s", format_bytes(total / 8), tgt)
    return student


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
