"""Calibration inputs without data: images distilled from a model's BatchNorm statistics.

ZeroQ (Cai et al., CVPR 2020, §3.1, Eq. 3): every BatchNorm layer of a trained network
remembers the mean and standard deviation of its input channels over the training set.
Inputs that reproduce those statistics at every BatchNorm layer look, to the network, like
its training data. Starting from noise, the inputs are optimised to minimise

    sum over BN layers l:  ||mu_l - mu~_l(x)||^2 / B  +  ||sigma_l - sigma~_l(x)||^2 / B

where mu~, sigma~ are the per-sample, per-channel mean and standard deviation of the
layer's input over spatial positions (a (B, C) matrix, compared with the running
statistics broadcast over the batch), plus the same term that pulls the input itself to
mean 0 and standard deviation 1 per channel (the normalised-input prior).

As we read the official code (distill_data.py): uniform noise init ((U{0..254} - 127.5) /
5418.75), Adam with lr 0.5, 500 iterations per batch, ReduceLROnPlateau (patience 100,
min lr 1e-4) on the loss. Those are the defaults here. One difference: the statistics are
taken at each BatchNorm's *input* through a forward pre-hook, where the official code
hooks the convolutions and pairs the i-th conv with the i-th BatchNorm (which breaks on
models whose convs and norms are not one-to-one in module order).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from .errors import ConfigError

logger = logging.getLogger(__name__)

_EPS = 1e-6


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm2d layers with running statistics, in module order (ZeroQ's
    per-sample statistics are over spatial positions: images only)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def synthesize_inputs(model: nn.Module, count: int, shape: tuple[int, ...], *,
                      iters: int = 500, batch_size: int = 32, lr: float = 0.5,
                      seed: int = 0, progress: bool = True) -> torch.Tensor:
    """`count` inputs of `shape` (one sample, e.g. (3, 224, 224)) distilled from the
    model's BatchNorm statistics (module docstring), in batches of `batch_size`, each
    optimised for `iters` Adam steps. The model is used in eval mode and left unchanged
    (its parameters get no gradients). Raises ConfigError for a model without BatchNorm
    layers, where there are no statistics to match."""
    if count < 1 or iters < 0 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"synthesize_inputs needs count >= 1, iters >= 0, batch_size >= 1 "
                          f"and lr > 0 (got {count}, {iters}, {batch_size}, {lr})")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ConfigError(f"shape must be the (channels, height, width) of one image, got "
                          f"{shape}")
    norms = batchnorm_layers(model)
    if not norms:
        raise ConfigError("synthesize_inputs needs BatchNorm layers with running statistics "
                          "(their means and variances are what the inputs are fitted to); "
                          "this model has none: pass calibration data instead")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    needs_grad = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
               for _, m in norms]
    targets = [(m.running_mean.detach().float(), (m.running_var.detach().float() + _EPS).sqrt())
               for _, m in norms]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    try:
        bar = tqdm(range(0, count, batch_size), desc="synthesize inputs", unit="batch",
                   disable=not progress)
        for start in bar:
            n = min(batch_size, count - start)
            noise = torch.randint(0, 255, (n, *shape), generator=gen).float()
            x = ((noise - 127.5) / 5418.75).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)
            for _ in range(iters):
                opt.zero_grad(set_to_none=True)
                seen.clear()
                model(x)
                loss = statistics_loss(x, seen, targets)
                loss.backward()
                opt.step()
                sched.step(loss.item())
            batches.append(x.detach())
            bar.set_postfix(loss=f"{loss.item():.3g}" if iters else "-")
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), needs_grad):
            p.requires_grad_(g)
        model.train(was_training)
    out = torch.cat(batches)
    if not torch.isfinite(out).all():
        raise ConfigError("synthesized inputs are not finite (lower lr)")
    logger.info("synthesized %d inputs of shape %s from %d BatchNorm layers (%d Adam steps "
                "per batch of %d)", count, tuple(shape), len(norms), iters, batch_size)
    return out


def statistics_loss(x: torch.Tensor, inputs: list[torch.Tensor],
                    targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """ZeroQ's Eq. 3: per-sample channel means / standard deviations of every BatchNorm
    input against the running statistics, plus the input's own against (0, 1); each term
    ||target - stats||^2 / batch."""
    loss = x.new_zeros(())
    pairs = list(zip(inputs, targets))
    prior = (x.new_zeros(x.shape[1]), x.new_ones(x.shape[1]))
    for value, (mean, std) in [*pairs, (x, prior)]:
        flat = value.float().reshape(value.shape[0], value.shape[1], -1)
        got_mean = flat.mean(2)
        got_std = (flat.var(2) + _EPS).sqrt()
        loss = loss + ((mean - got_mean).pow(2).sum() + (std - got_std).pow(2).sum()) / len(flat)
    return loss
