"""Soft codes: AdaRound's relaxed rounding, for scalar palettes, inside block reconstruction.

AdaRound (Nagel et al., ICML 2020, eq. 22-24), which BRECQ (Li et al., ICLR 2021, §4)
runs inside each block's reconstruction, learns for every weight whether to round down or
up. A palette's grid is its codebook, not integers, so here each weight w (divided by its
row's scale) chooses between the two neighbouring codebook entries that bracket it,
lo <= w < hi:

    w_soft = s * (c[lo] + h(V) * (c[hi] - c[lo])),  h(V) = clip(sigmoid(V)(zeta - gamma)
                                                                  + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (eq. 23), V started so that w_soft = w (the original
weight; AdaRound's initialisation), and the regulariser sum 1 - |2h - 1|^beta (eq. 24)
with beta annealed from 20 to 2 after a warm-up, which pushes every h to 0 or 1. Weights
outside the codebook's range take its nearest end. The codebook and scale keep training
with the block's other parameters. At the end each weight's code is lo or hi by h >= 0.5:
the codes change, their count and bit width do not, so the file has the same bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import PalettizedLayer, rows_to_weight, weight_rows

ZETA, GAMMA = 1.1, -0.1
"""AdaRound's stretch of the sigmoid (eq. 23)."""


def relaxable(module: nn.Module) -> bool:
    """Whether soft codes apply: a plain scalar palette layer (d = 1)."""
    return type(module) is PalettizedLayer and module.codebook.shape[1] == 1


class SoftCodes:
    """The relaxed codes of one scalar palette layer, installed over its `decode_weight`
    until `harden` (or `discard`). `original` is the layer's uncompressed weight."""

    def __init__(self, layer: PalettizedLayer, original: Tensor) -> None:
        if not relaxable(layer):
            raise ValueError("soft codes need a plain scalar palette layer")
        self.layer = layer
        self.saved_codes = layer.codes.detach().clone()
        with torch.no_grad():
            rows = weight_rows(original.detach().float(), layer.out_axis).to(
                layer.codebook.device)
            if layer.scale is not None:
                s = layer.scale.detach().float()[:, None]
                rows = torch.where(s != 0, rows / torch.where(s != 0, s, 1.0), 0.0)
            values, order = layer.codebook.detach()[:, 0].float().sort()
            k = values.numel()
            # lo: last entry <= w (clamped to the range); hi: the next one up
            pos = torch.searchsorted(values, rows.contiguous(), right=True) - 1
            lo_pos = pos.clamp(0, k - 1)
            hi_pos = (pos + 1).clamp(0, k - 1)
            self.lo = order[lo_pos].to(torch.long)
            self.hi = order[hi_pos].to(torch.long)
            span = values[hi_pos] - values[lo_pos]
            frac = torch.where(span > 0, (rows - values[lo_pos]) / torch.where(
                span > 0, span, 1.0), torch.zeros_like(rows))
            frac = frac.clamp(0.01, 0.99)
            # h(V0) = frac
            v0 = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
            self.free = span > 0
        self.v = nn.Parameter(torch.where(self.free, v0, torch.full_like(v0, -10.0)))
        layer.decode_weight = self._decode  # type: ignore[method-assign]

    def h(self) -> Tensor:
        """The soft choice of `hi` per weight, in [0, 1]."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0) * self.free

    def _decode(self) -> Tensor:
        layer = self.layer
        book = layer.codebook
        lo = F.embedding(self.lo, book)[..., 0]
        hi = F.embedding(self.hi, book)[..., 0]
        w = lo + self.h() * (hi - lo)
        if layer.scale is not None:
            w = w * layer.scale[:, None]
        return rows_to_weight(w, layer.weight_shape, layer.out_axis)

    def regulariser(self, beta: float) -> Tensor:
        """AdaRound's eq. 24, averaged over the free weights (0 when every h is 0 or 1)."""
        h = self.h()[self.free]
        if h.numel() == 0:
            return self.v.sum() * 0.0
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()

    def harden(self) -> int:
        """Write lo / hi into the layer's codes and uninstall; returns how many codes
        changed from those the layer had before."""
        with torch.no_grad():
            up = (self.h() >= 0.5) & self.free
            codes = torch.where(up, self.hi, self.lo).to(self.layer.codes.dtype)
            self.layer.codes.copy_(codes.reshape(self.layer.codes.shape))
        self._uninstall()
        return int((self.layer.codes != self.saved_codes).sum())

    def discard(self) -> None:
        """Put the layer's codes back as they were and uninstall."""
        with torch.no_grad():
            self.layer.codes.copy_(self.saved_codes)
        self._uninstall()

    def _uninstall(self) -> None:
        self.layer.__dict__.pop("decode_weight", None)
        self.v.requires_grad_(False)


def beta_at(step: int, steps: int, warmup: float = 0.2, start: float = 20.0,
            end: float = 2.0) -> float | None:
    """AdaRound's annealed beta at `step` of `steps` (None during the warm-up, when the
    regulariser is off): linear from `start` to `end` after `warmup` of the steps."""
    first = int(math.ceil(warmup * steps))
    if step < first:
        return None
    t = (step - first) / max(1, steps - first)
    return start + (end - start) * t
