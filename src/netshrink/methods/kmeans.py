"""`kmeans`: post-training scalar palettization, the baseline the four papers beat.

Per layer, k-means with 2^b centroids on the weights (optionally after dividing each
output channel by its largest magnitude, a per-channel scale as in coremltools'
`enable_per_channel_scale`); each weight is replaced by its centroid and the indices are
stored bit-packed at b bits. b comes from the target: a whole-number "Nbit" target gives
every layer N bits; a fractional bits target, a size or a ratio is met by allocating bits
per layer (`size.allocate`) with the high-rate estimate D_l(b) = n_l var(w_l) 2^(-2b).
Fine-tuning (optional) trains codebooks, scales, biases and norms with the codes frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from ..graph import LayerRef
from ..kmeans import kmeans
from ..layers import (
    PalettizedLayer,
    channel_scales,
    compressible,
    out_axis_of,
    set_module,
    weight_rows,
)
from ..size import Budget, Option, palette_bits
from . import Method, register_method


@dataclass(frozen=True)
class KMeansConfig:
    """Options of the `kmeans` method (all may be overridden per layer, except iters).

    bits: fixed width for every layer (else from the target); per_channel: divide each
    output channel by its max |w| first (safe default for depthwise convs and language
    models, see DESIGN.md); min_bits/max_bits: range the allocator may choose from.
    """

    bits: int | None = None
    per_channel: bool = True
    min_bits: int = 1
    max_bits: int = 8
    iters: int = 30
    codebook_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits is not None and not 1 <= self.bits <= 16:
            raise ConfigError(f"bits must be in 1..16, got {self.bits}")
        if not 1 <= self.min_bits <= self.max_bits <= 16:
            raise ConfigError(f"need 1 <= min_bits <= max_bits <= 16, got "
                              f"{self.min_bits}..{self.max_bits}")
        if self.iters < 0:
            raise ConfigError("iters must be >= 0")
        if self.codebook_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"codebook_dtype must be float16, bfloat16 or float32, "
                              f"got {self.codebook_dtype!r}")


def palette_layer_bits(ref: LayerRef, bits: int, d: int, per_channel: bool, dtype: str) -> int:
    """Stored bits of one palettized layer (vectors of d weights) except its bias, which
    counts as fixed."""
    rows = ref.module.weight.shape[ref.out_axis] if per_channel else 0
    return palette_bits(ref.n_weights // d, bits, d, rows, dtype)


class KMeansMethod(Method):
    name = "kmeans"
    config_cls = KMeansConfig
    summary = "post-training scalar palettization (k-means per layer), the baseline"

    def supports(self, module: nn.Module) -> str | None:
        return compressible(module)

    def _bits_per_layer(self, layers: list[LayerRef], budget: Budget, cfg: KMeansConfig
                        ) -> list[int]:
        fixed = [r.option(cfg, "bits") for r in layers]
        target = budget.target
        if target.kind == "bits" and float(target.value).is_integer():
            return [f if f is not None else int(target.value) for f in fixed]
        counts_side = target.kind != "bits"
        options: list[list[Option]] = []
        for ref, f in zip(layers, fixed):
            lo, hi = (f, f) if f is not None else (ref.option(cfg, "min_bits"),
                                                   ref.option(cfg, "max_bits"))
            var = float(ref.module.weight.detach().float().var()) if ref.n_weights > 1 else 0.0
            per_layer = []
            for b in range(lo, hi + 1):
                size = (palette_layer_bits(ref, b, 1, ref.option(cfg, "per_channel"),
                                      ref.option(cfg, "codebook_dtype"))
                        if counts_side else b * ref.n_weights)
                per_layer.append(Option(b, size, ref.n_weights * var * 2.0 ** (-2 * b)))
            options.append(per_layer)
        picks = budget.pick(options, "at the smallest allowed bit widths")
        return [opts[i].label for opts, i in zip(options, picks)]

    def encode(self, model: nn.Module, layers: list[LayerRef], budget: Budget,
               config: KMeansConfig, *, data: Any = None, seed: int = 0) -> None:
        bits = self._bits_per_layer(layers, budget, config)
        progress = tqdm(list(zip(layers, bits)), desc="kmeans", unit="layer", disable=None,
                        leave=False)
        for i, (ref, b) in enumerate(progress):
            layer = palettize(ref.module, b, per_channel=ref.option(config, "per_channel"),
                              codebook_dtype=ref.option(config, "codebook_dtype"),
                              iters=config.iters, seed=seed + i, out_axis=ref.out_axis)
            set_module(model, ref.name, layer)


def palettize(module: nn.Module, bits: int, *, per_channel: bool = True,
              codebook_dtype: str = "float16", iters: int = 30, seed: int = 0,
              out_axis: int | None = None) -> PalettizedLayer:
    """Scalar k-means palettization of one module's weight at `bits` bits (the module is
    consumed: it becomes the layer's host).

    The per-channel scale is rounded to its storage dtype before clustering, so the codes
    are chosen for the scale that will be saved; dead rows decode to exact zeros
    (`layers.channel_scales`).
    """
    axis = out_axis_of(module) if out_axis is None else out_axis
    rows = weight_rows(module.weight.detach().float().cpu(), axis)
    scale = None
    if per_channel:
        scale, rows = channel_scales(rows, codebook_dtype)
    # k-means++ seeding is sequential in k: past 1024 centroids random seeding is used
    init = "kmeans++" if bits <= 10 else "random"
    result = kmeans(rows.reshape(-1), 2**bits, iters=iters, seed=seed, init=init)
    device = module.weight.device
    codes = result.labels.reshape(rows.shape[0], -1)
    layer = PalettizedLayer(module, codes.to(device), result.centroids.to(device),
                            None if scale is None else scale.to(device), codebook_dtype, axis)
    return layer


register_method(KMeansMethod())
