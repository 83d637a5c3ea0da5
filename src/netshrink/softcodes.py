"""Soft codes: AdaRound's relaxed rounding, for scalar palettes, inside block reconstruction.

AdaRound (Nagel et al., ICML 2020, eq. 22-24), which BRECQ (Li et al., ICLR 2021, §4)
runs inside each block's reconstruction, learns for every weight whether to round down or
up. A palette's grid is its codebook, not integers, so here each weight w (divided by its
row's scale) chooses between two codebook entries a and b:

    w_soft = s * (c[a] + h(V) * (c[b] - c[a])),  h(V) = clip(sigmoid(V)(zeta - gamma)
                                                               + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (eq. 23) and the regulariser sum 1 - |2h - 1|^beta (eq. 24),
beta annealed from 20 to 2 after a warm-up, which pushes every h to 0 or 1. Two starts:
- "weights" (AdaRound's): a, b are the entries around w (a <= w < b; the nearest end
  outside the codebook's range) and h starts at w's place between them, so w_soft = w;
- "codes" (the default): a is the layer's current code (after calibration, GPTQ's, which
  already accounts for the layer's inputs), b its neighbour in the sorted codebook on w's
  side, and h starts at 0.01: the relaxation starts from the calibrated model and may
  move each weight one entry towards its original value. (Measured on EfficientNet-Lite0:
  the "weights" start lost GPTQ's gains and never beat the fixed codes in 200 steps.)
The codebook and scale keep training with the block's other parameters. At the end each
code is a or b by h >= 0.5: the codes change, their count and bit width do not, so the
file has the same bytes.
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

    def __init__(self, layer: PalettizedLayer, original: Tensor, start: str = "codes"
                 ) -> None:
        if not relaxable(layer):
            raise ValueError("soft codes need a plain scalar palette layer")
        if start not in ("codes", "weights"):
            raise ValueError(f"start must be 'codes' or 'weights', got {start!r}")
        self.layer = layer
        self.saved_codes = layer.codes.detach().clone()
        with torch.no_grad():
            rows = weight_rows(original.detach().float(), layer.out_axis).to(
                layer.codebook.device)
            if layer.scale is not None:
                s = layer.scale.detach().float()[:, None]
                rows = torch.where(s != 0, rows / torch.where(s != 0, s, 1.0), 0.0)
            book = layer.codebook.detach()[:, 0].float()
            values, order = book.sort()
            k = values.numel()
            if start == "weights":  # AdaRound: the two entries around w, h(V0) = its place
                pos = torch.searchsorted(values, rows.contiguous(), right=True) - 1
                a_pos, b_pos = pos.clamp(0, k - 1), (pos + 1).clamp(0, k - 1)
                span = values[b_pos] - values[a_pos]
                frac = torch.where(span > 0, (rows - values[a_pos]) / torch.where(
                    span > 0, span, 1.0), torch.zeros_like(rows)).clamp(0.01, 0.99)
            else:  # the current codes (e.g. GPTQ's), and their neighbour towards w
                rank = torch.empty_like(order)
                rank[order] = torch.arange(k, device=order.device)
                a_pos = rank[layer.codes.detach().long().reshape(rows.shape)]
                step = torch.where(rows > values[a_pos], 1, -1)
                b_pos = (a_pos + step).clamp(0, k - 1)
                frac = torch.full_like(rows, 0.01)
            self.a = order[a_pos].to(torch.long)
            self.b = order[b_pos].to(torch.long)
            self.free = values[b_pos] != values[a_pos]
            v0 = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)  # h(V0) = frac
        self.v = nn.Parameter(torch.where(self.free, v0, torch.full_like(v0, -10.0)))
        layer.decode_weight = self._decode  # type: ignore[method-assign]

    def h(self) -> Tensor:
        """The soft choice of `b` over `a` per weight, in [0, 1]."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0) * self.free

    def _decode(self) -> Tensor:
        layer = self.layer
        book = layer.codebook
        a = F.embedding(self.a, book)[..., 0]
        b = F.embedding(self.b, book)[..., 0]
        w = a + self.h() * (b - a)
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
        """Write a or b (h >= 0.5) into the layer's codes and uninstall; returns how many
        codes changed from those the layer had before."""
        with torch.no_grad():
            up = (self.h() >= 0.5) & self.free
            codes = torch.where(up, self.b, self.a).to(self.layer.codes.dtype)
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
