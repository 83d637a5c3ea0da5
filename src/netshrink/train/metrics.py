"""Losses and measurements: the distillation loss, top-1 accuracy, how faithfully a
compressed model reproduces its original (top-1 agreement, KL), and the perplexity of a
language model on token blocks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netshrink.errors import ConfigError

from .batches import hard_targets, limited, model_device, split_batch, training_mode
from .config import require


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    The T^2 factor keeps gradient magnitudes comparable to the cross-entropy term across
    temperatures (Hinton et al. 2015). Classes are on the last dimension.
    """
    require(temperature > 0, f"temperature must be > 0, got {temperature!r}")
    require(student_logits.shape == teacher_logits.shape,
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, max_batches: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on labelled ``loader``, in [0, 1].

    Runs in eval mode without gradients and restores each submodule's previous mode.
    Raises ConfigError on unlabelled batches (use :func:`agreement`) or an empty loader.
    """
    device = model_device(model)
    correct, total = 0, 0
    with training_mode(model, False):
        for batch in limited(loader, max_batches):
            inputs, labels = split_batch(batch)
            if labels is None:
                raise ConfigError("evaluate() needs labelled (x, y) batches; "
                                  "use agreement() for unlabelled data")
            logits = model(inputs.to(device))
            targets = hard_targets(labels.to(device), logits)
            correct += int((logits.argmax(dim=-1) == targets).sum())
            total += targets.numel()
    require(total > 0, "evaluate(): the loader yielded no samples")
    return correct / total


@torch.no_grad()
def fidelity(
    model: nn.Module, reference: nn.Module, loader: Iterable[Any], max_batches: int | None = None
) -> dict[str, float]:
    """How faithfully ``model`` reproduces ``reference`` on (possibly unlabelled) inputs:
    ``agreement`` (fraction of inputs with the same top-1 class) and ``kl`` (mean
    KL(reference || model) of the softmax outputs, in nats per input). Labels, if any,
    are ignored; both models run in eval mode (restored after)."""
    device, ref_device = model_device(model), model_device(reference)
    same, total, kl = 0, 0, 0.0
    with training_mode(model, False), training_mode(reference, False):
        for batch in limited(loader, max_batches):
            inputs, _ = split_batch(batch)
            logits = model(inputs.to(device)).float()
            expected = reference(inputs.to(ref_device)).float().to(logits.device)
            same += int((logits.argmax(dim=-1) == expected.argmax(dim=-1)).sum())
            classes = logits.shape[-1]
            kl += float(F.kl_div(logits.reshape(-1, classes).log_softmax(-1),
                                 expected.reshape(-1, classes).log_softmax(-1),
                                 reduction="sum", log_target=True))
            total += logits.argmax(dim=-1).numel()
    require(total > 0, "fidelity(): the loader yielded no samples")
    return {"agreement": same / total, "kl": kl / total}


def agreement(
    model: nn.Module, reference: nn.Module, loader: Iterable[Any], max_batches: int | None = None
) -> float:
    """Fraction of inputs on which ``model`` and ``reference`` predict the same class
    (see :func:`fidelity`)."""
    return fidelity(model, reference, loader, max_batches)["agreement"]


@torch.no_grad()
def perplexity(model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> float:
    """exp(mean next-token cross-entropy) of a causal language model on batches of token
    ids (B, T): the logits at position t predict the token at t+1. Lower is better."""
    device = model_device(model)
    nll, count = 0.0, 0
    with training_mode(model, False):
        for batch in limited(loader, max_batches):
            ids, _ = split_batch(batch)
            ids = ids.to(device)
            require(ids.dim() == 2 and not ids.is_floating_point(),
                    f"perplexity() needs integer token batches (B, T), got {tuple(ids.shape)}")
            logits = model(ids).float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    require(count > 0, "perplexity(): the loader yielded no token pairs")
    return math.exp(nll / count)
