"""`kmeans`: post-training scalar palettization, the baseline the four papers beat.

Per layer, k-means with 2^b centroids on the weights (by default after dividing each
output channel by its largest magnitude, a per-channel scale as in coremltools'
`enable_per_channel_scale`); each weight is replaced by its centroid and the indices are
stored bit-packed at b bits. b comes from the target (`palette.plan_bits`): a whole-number
"Nbit" target gives every layer N bits; a fractional bits target, a size or a ratio is met
by allocating bits per layer with the high-rate estimate D_l(b) = n_l var(w_l) 2^(-2b).
Fine-tuning (optional) trains codebooks, scales, biases and norms with the codes frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from ..graph import LayerRef
from ..layers import PalettizedLayer, compressible, set_module
from ..palette import (
    check_bit_range,
    check_bits,
    check_codebook_dtype,
    fit_palette,
    palette_spec,
    plan_bits,
)
from ..size import Budget
from . import Method, Plan, Request, register_method


@dataclass(frozen=True)
class KMeansConfig:
    """Options of the `kmeans` method (all may be overridden per layer, except iters).

    bits: fixed width for every layer (else from the target); per_channel: divide each
    output channel by its max |w| first (the safe default for depthwise convs and language
    models); min_bits/max_bits: range the allocator may choose from; iters: Lloyd
    iterations; codebook_dtype: storage of codebooks and scales.
    """

    bits: int | None = None
    per_channel: bool = True
    min_bits: int = 1
    max_bits: int = 8
    iters: int = 30
    codebook_dtype: str = "float16"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_bit_range(self.min_bits, self.max_bits)
        if self.iters < 0:
            raise ConfigError("iters must be >= 0")
        check_codebook_dtype(self.codebook_dtype)


class KMeansMethod(Method):
    name = "kmeans"
    config_cls = KMeansConfig
    summary = "post-training scalar palettization (k-means per layer), the baseline"
    calibrates = True

    def supports(self, module: nn.Module) -> str | None:
        return compressible(module)

    def plan(self, request: Request, survey: None, budget: Budget) -> Plan:
        cfg = request.config
        bits = plan_bits(request.layers, [1] * len(request.layers), budget, cfg)
        return Plan({ref.name: palette_spec(ref, 2**b, 1, ref.option(cfg, "per_channel"),
                                            ref.option(cfg, "codebook_dtype"))
                     for ref, b in zip(request.layers, bits)})

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> None:
        progress = tqdm(request.layers, desc="kmeans", unit="layer", disable=None,
                        leave=False)
        for i, ref in enumerate(progress):
            layer = fit_palette(ref.module, plan.layers[ref.name], seed=request.seed + i,
                                init="kmeans++", iters=request.config.iters)
            set_module(model, ref.name, layer)


def palettize(module: nn.Module, bits: int, *, per_channel: bool = True,
              codebook_dtype: str = "float16", iters: int = 30, seed: int = 0,
              out_axis: int | None = None) -> PalettizedLayer:
    """Scalar k-means palettization of one module's weight at `bits` bits, outside
    `compress` (the module is consumed: it becomes the layer's host)."""
    ref = LayerRef("", module, {} if out_axis is None else {"out_axis": out_axis})
    spec = palette_spec(ref, 2**bits, 1, per_channel, codebook_dtype)
    return fit_palette(module, spec, seed=seed, init="kmeans++", iters=iters)


register_method(KMeansMethod())
