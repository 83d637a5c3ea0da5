"""Batches and models as the training loop and the metrics see them: splitting a batch into
inputs and labels (`split_batch`, public: methods that calibrate on data use it too), the
model's device, train/eval mode that is restored afterwards, and a loader cut short."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from netshrink.errors import ConfigError

from .config import is_int, require


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a batch into (inputs, labels-or-None): ``(x, y)``, ``(x,)`` or a bare tensor.

    Anything else raises ConfigError."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        if len(batch) == 1:
            return batch[0], None
        if isinstance(batch[1], Tensor):
            return batch[0], batch[1]
    raise ConfigError(
        "batches must be (x, y) or (x,) tuples/lists of tensors, or a bare tensor; "
        f"got {type(batch).__name__}"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (first buffer, else CPU)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def hard_targets(labels: Tensor, logits: Tensor) -> Tensor:
    """Class indices for accuracy: the labels, or their argmax when they are soft targets."""
    if labels.is_floating_point() and labels.shape == logits.shape:
        return labels.argmax(dim=-1)
    return labels


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Set ``model`` to train/eval mode, restoring every submodule's own flag afterwards."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def limited(loader: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    """The loader, cut after ``max_batches`` batches when that is given."""
    if max_batches is None:
        return loader
    require(is_int(max_batches) and max_batches >= 1,
            f"max_batches must be None or an integer >= 1, got {max_batches!r}")
    return itertools.islice(loader, max_batches)
