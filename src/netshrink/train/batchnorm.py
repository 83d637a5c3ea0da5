"""BatchNorm recalibration: re-estimate running statistics after the weights changed."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .batches import model_device, split_batch, training_mode
from .config import is_int, require

logger = logging.getLogger(__name__)


def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics from ``batches`` batches of ``loader``.

    Why: after weights change (compression, fine-tuning) the stored running stats no longer
    match the activations. Stats are reset and re-accumulated as an exact cumulative average
    (momentum=None) in train mode under no_grad; momentum and modes are restored afterwards.
    Labels are ignored, so unlabelled loaders work.
    """
    require(is_int(batches) and batches >= 1, f"batches must be an integer >= 1, got {batches!r}")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        logger.info("recalibrate_batchnorm: the model has no BatchNorm with running stats")
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    device, seen = model_device(model), 0
    try:
        with torch.no_grad(), training_mode(model, True):
            for batch in itertools.islice(loader, batches):
                inputs, _ = split_batch(batch)
                model(inputs.to(device))
                seen += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    if seen < batches:
        logger.warning("recalibrate_batchnorm: asked for %d batches, the loader had only %d",
                       batches, seen)
    logger.info("recalibrated %d BatchNorm layers on %d batches", len(norms), seen)
