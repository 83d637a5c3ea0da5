"""Palettes, shared by the palette methods (kmeans, DKM, PQF): scale rows, cluster, build.

A palette stores a layer's weight as codes into a per-layer codebook of k codewords of d
values each, optionally times a per-output-channel scale (`layers.PalettizedLayer`). This
module is the one place that
- checks the codebook options (`check_codebook_dtype`),
- counts a palette's stored bits (`palette_bits`; the layer's `stored()` declares the
  same tensors, and a test holds the two equal),
- divides rows by their scale (`scaled_rows`), clusters them with the library's k-means
  and builds the layer (`fit_palette`),
- plans bits per layer for scalar or vector palettes under a budget (`plan_bits`, with
  the high-rate estimate D(b) = n var(w) 2^(-2b/d)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .encoding import Encoding, ceil_log2
from .errors import ConfigError
from .graph import LayerRef
from .kmeans import KMeansResult, kmeans
from .layers import PalettizedLayer, channel_scales, planned_spec, weight_rows
from .size import Budget, Option

CODEBOOK_DTYPES = ("float16", "bfloat16", "float32")
"""Storage dtypes a codebook (and its per-channel scales) may take."""


def check_codebook_dtype(value: Any) -> None:
    """ConfigError unless `value` names a codebook storage dtype."""
    if value not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook_dtype must be float16, bfloat16 or float32, "
                          f"got {value!r}")


def check_bits(bits: Any, name: str = "bits") -> None:
    """ConfigError unless `bits` is None or an integer code width in 1..16."""
    if bits is not None and not (isinstance(bits, int) and not isinstance(bits, bool)
                                 and 1 <= bits <= 16):
        raise ConfigError(f"{name} must be an integer in 1..16 (k = 2^bits centroids), "
                          f"got {bits!r}")


def check_bit_range(min_bits: Any, max_bits: Any) -> None:
    """ConfigError unless 1 <= min_bits <= max_bits <= 16 (integers)."""
    if not (isinstance(min_bits, int) and isinstance(max_bits, int)
            and 1 <= min_bits <= max_bits <= 16):
        raise ConfigError(f"need 1 <= min_bits <= max_bits <= 16, got {min_bits}..{max_bits}")


def palette_bits(n_codes: int, bits: int, d: int, scale_rows: int, dtype: str) -> int:
    """Stored bits of a palette (bias and other host tensors not included): `n_codes`
    codes packed at `bits` bits, a (2^bits, d) codebook and `scale_rows` per-channel
    scales (0 for none), codebook and scales in `dtype`."""
    enc = Encoding.of(dtype)
    return Encoding.codes(bits).nbits(n_codes) + enc.nbits(2**bits * d) + enc.nbits(scale_rows)


def palette_option(ref: LayerRef, k: int, d: int, scale: bool, dtype: str, label: Any,
                   distortion: float) -> Option:
    """The `Option` of storing `ref` as a palette of k codewords of d values."""
    bits = ceil_log2(k)
    n_codes = ref.n_weights // d
    rows = ref.module.weight.shape[ref.out_axis] if scale else 0
    return Option(label, palette_bits(n_codes, bits, d, rows, dtype),
                  Encoding.codes(bits).nbits(n_codes), distortion)


def palette_spec(ref: LayerRef, k: int, d: int, scale: bool, dtype: str) -> dict[str, Any]:
    """The spec of the `PalettizedLayer` that will store `ref` (what a plan records)."""
    return planned_spec(PalettizedLayer.kind, ref.module, ref.out_axis, k=int(k), d=int(d),
                        scale=bool(scale), codebook_dtype=dtype)


def scaled_rows(module: nn.Module, out_axis: int, scale: bool, dtype: str
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows (out, row_len) fp32, scale or None): the weight as rows, divided by the
    per-channel scale rounded to its storage dtype (`layers.channel_scales`), so codes are
    chosen for the scale that will be saved; dead rows become exact zeros."""
    rows = weight_rows(module.weight.detach().float(), out_axis)
    if not scale:
        return rows, None
    s, normalised = channel_scales(rows, dtype)
    return normalised, s


def cluster_rows(rows: torch.Tensor, k: int, d: int, *, seed: int, init: str, iters: int,
                 anneal: int = 0) -> KMeansResult:
    """k-means of the rows cut into d-vectors, on the CPU. k-means++ seeding is sequential
    in k: past 1024 centroids "kmeans++" falls back to random seeding."""
    if init == "kmeans++" and k > 1024:
        init = "random"
    return kmeans(rows.cpu().reshape(-1, d), k, iters=iters, seed=seed, init=init,
                  anneal=anneal)


def fit_palette(module: nn.Module, spec: dict[str, Any], *, seed: int, init: str,
                iters: int, anneal: int = 0) -> PalettizedLayer:
    """The palette layer `spec` (from `palette_spec`) describes, fitted to the module's
    own weight: rows scaled (if `spec["scale"]`), clustered into k codewords of d values,
    each subvector replaced by its nearest codeword. The module becomes the layer's host."""
    k, d, dtype = int(spec["k"]), int(spec["d"]), str(spec["codebook_dtype"])
    axis = int(spec["out_axis"])
    rows, scale = scaled_rows(module, axis, bool(spec["scale"]), dtype)
    result = cluster_rows(rows, k, d, seed=seed, init=init, iters=iters, anneal=anneal)
    device = module.weight.device
    codes = result.labels.reshape(rows.shape[0], -1)
    return PalettizedLayer(module, codes.to(device), result.centroids.to(device),
                           None if scale is None else scale.to(device), dtype, axis)


def plan_bits(layers: Sequence[LayerRef], dims: Sequence[int], budget: Budget,
              config: Any) -> list[int]:
    """Bits b per d-vector for each layer of a scalar (d = 1) or vector palette.

    A per-layer `bits` option fixes b. A whole-number bits target "Nbit" gives every other
    layer N bits per weight, b = N x d. Any other target allocates b per layer in
    [min_bits, max_bits] (`Budget.pick`) with the high-rate estimate
    D_l(b) = n_l var(w_l) 2^(-2b/d). `config` provides bits, min_bits, max_bits,
    per_channel and codebook_dtype (each may be overridden per layer).
    """
    fixed = [ref.option(config, "bits") for ref in layers]
    for ref, f in zip(layers, fixed):
        check_bits(f, f"layer {ref.name!r}: bits")
    target = budget.target
    if target.kind == "bits" and float(target.value).is_integer():
        out = []
        for ref, f, d in zip(layers, fixed, dims):
            b = f if f is not None else int(target.value) * d
            if not 1 <= b <= 16:
                raise ConfigError(f"layer {ref.name!r}: {target} with cluster_dim={d} "
                                  f"needs {b} bits per vector; allowed 1..16")
            out.append(b)
        return out
    options: list[list[Option]] = []
    for ref, f, d in zip(layers, fixed, dims):
        lo, hi = (f, f) if f is not None else (ref.option(config, "min_bits"),
                                               ref.option(config, "max_bits"))
        var = float(ref.module.weight.detach().float().var()) if ref.n_weights > 1 else 0.0
        scale, dtype = ref.option(config, "per_channel"), ref.option(config, "codebook_dtype")
        options.append([palette_option(ref, 2**b, d, scale, dtype, b,
                                       ref.n_weights * var * 2.0 ** (-2 * b / d))
                        for b in range(lo, hi + 1)])
    picks = budget.pick(options, "at the smallest allowed bit widths")
    return [opts[i].label for opts, i in zip(options, picks)]
