"""Multiply-accumulate counts of Conv2d / Linear layers, factorised layers included.

ALDS reports FLOPs of both modules of a factorised layer (docs/methods/alds.md#flops): the grouped
encoder (j·k outputs, c/k·kh·kw each) and the 1x1 decoder
(f outputs, j·k each), per output position. Dense layers count out_positions ·
(c/groups)·kh·kw · f. Counted with forward hooks on one real forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...layers import CompressedLayer
from .layer import LowRankLayer


def count_macs(model: nn.Module, example: torch.Tensor, dense: bool = False) -> int:
    """MACs of one forward pass of `model` on `example` (Conv2d, Linear, LowRankLayer;
    other compressed layers count as their dense host; with `dense`, factorised layers
    too: the MACs of the model before factorisation)."""
    total = [0]
    hosts = {id(m.host) for m in model.modules() if isinstance(m, CompressedLayer)}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if isinstance(module, LowRankLayer) and not dense:
            f, c = module.weight_shape[0], module.weight_shape[1]
            kernel = math.prod(module.weight_shape[2:])
            positions = out.numel() // f
            jk = module.rank * module.groups
            total[0] += positions * (jk * (c // module.groups) * kernel + f * jk)
            return
        if isinstance(module, CompressedLayer):
            module = module.host
        if isinstance(module, nn.Conv2d):
            per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            total[0] += out.numel() * per_out
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if id(m) not in hosts and isinstance(m, (nn.Conv2d, nn.Linear, CompressedLayer))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total[0]
