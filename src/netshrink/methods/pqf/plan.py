"""PQF's planner: one (d, k, scale) choice per layer under the budget, and the paper's size.

Each layer's options (`layer_options`) are measured once per call (`PQFMethod.survey`):
for every subvector length d the layer allows, every codebook size k = 2..k_cap, with the
Gaussian rate-distortion estimate D = n det(Sigma_d)^(1/d) k^(-2/d), where Sigma_d is the
covariance of the layer's d-subvectors (the bound the permutation objective also comes
from). `plan` then picks one option per layer with `Budget.pick`.

d per layer (docs/methods/pqf.md#subvectors): `block="small"` / `"large"` fix d per layer
kind as in the paper's settings (3x3: 9 / 18; 1x1 and linear: 4 / 8; classifier: 4);
`block="auto"` lets the target pick d too. k <= min(k_max, 2^floor(log2(n_sub / 4))).
Depthwise convs choose among dense, or a per-output-channel scale at d = kh*kw or d = kw.
The stem conv stays dense as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...encoding import Encoding, ceil_log2
from ...errors import ConfigError
from ...graph import LayerRef, weight_layers
from ...layers import PalettizedLayer, channel_scales, compressed_layers, weight_rows
from ...palette import palette_option
from ...size import Option


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


def _d_candidates(ref: LayerRef, cfg: Any, classifier: bool) -> list[int]:
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


def _dense_option(ref: LayerRef) -> tuple[Choice, Option]:
    bits = Encoding.of(ref.module.weight.dtype).nbits(ref.n_weights)
    return Choice(), Option(Choice(), bits, bits, 0.0)


def layer_options(ref: LayerRef, cfg: Any, classifier: bool, dense: bool = False
                  ) -> list[tuple[Choice, Option]]:
    """Every way to store one layer, with its sizes and estimated distortion."""
    if dense:
        return [_dense_option(ref)]
    module = ref.module
    dtype = ref.option(cfg, "codebook_dtype")
    rows = weight_rows(module.weight.detach().float().cpu(), ref.out_axis)
    depthwise = is_depthwise(module)
    mode = ref.option(cfg, "depthwise") if depthwise else None
    scale = True if depthwise else bool(ref.option(cfg, "scale"))
    out: list[tuple[Choice, Option]] = []
    if mode in ("auto", "dense"):
        out.append(_dense_option(ref))
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
            # weight_sq = sum over rows of scale^2 * row length (n_weights without scales),
            # so the estimate is in the units of the original weights
            distortion = weight_sq * sigma * k ** (-2.0 / d)
            choice = Choice(d, k, scale)
            out.append((choice, palette_option(ref, k, d, scale, dtype, choice, distortion)))
    return out


def stem_name(model: nn.Module) -> str | None:
    """The stem: the first weight layer in module order when it is a convolution. PQF
    leaves it dense (a network whose first weight layer is a Linear or an Embedding, as
    in a transformer, has no stem in the paper's sense)."""
    layers = weight_layers(model)
    if layers and isinstance(layers[0][1], nn.modules.conv._ConvNd):
        return layers[0][0]
    return None


def classifier_name(model: nn.Module) -> str | None:
    """The last nn.Linear in module order: the paper gives it a larger codebook."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def paper_size_bits(model: nn.Module) -> int:
    """Size in the paper's convention (docs/methods/pqf.md#size): codes at log2(k) bits,
    codebooks fp16, every other tensor fp32, BatchNorm counted as two vectors (running
    statistics folded), integer buffers not counted. Works for the original model too
    (then every weight is fp32)."""
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
