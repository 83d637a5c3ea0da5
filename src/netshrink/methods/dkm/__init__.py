"""`dkm`: Differentiable k-Means (Cho et al., "DKM: Differentiable K-Means Clustering Layer
for Neural Network Compression", ICLR 2022), train-time weight clustering.

Each chosen layer becomes a `DKMLayer` (layer.py): its weight is cut into d-dimensional
vectors (d = `cluster_dim`, d = 1 scalar), k = 2^b centroids are initialised once with the
library's k-means (k-means++ seeding; for d = 1 Lloyd's iterations on sorted scalars run to
their fixed point), and during fine-tuning every forward pass runs the soft k-means
iterations of paper §3.2 (soft.py) with backpropagation through all of them, warm-starting
from the previous step's detached centroids. Evaluation and `finalize` snap every vector to
its nearest centroid; the saved layer is the foundation's `PalettizedLayer`: codes
bit-packed at b bits per vector, the (k, d) codebook in fp16, and with `per_channel` a
per-output-channel scale (max |w| of the row, coremltools' `enable_per_channel_scale`).

Temperature (docs/methods/dkm.md#temperature). The paper's tau is one global constant per
experiment acting on raw squared distances (Table 7 values in `PAPER_TAU`); pass it as
`tau=`. The default is scale-relative: tau_l = `tau_rel` x (mean squared distance of layer
l's vectors to their nearest initial centroid), i.e. relative to the layer's own hard
k-means distortion, so one default works across weight scales, per-channel scaling and bit
widths. Mapping: for a layer with weight variance s^2, scalar k-means distortion is about
0.36 s^2 (1 bit), 0.12 s^2 (2 bits), 0.035 s^2 (3 bits); with s ~ 0.02 (assumed typical
of ImageNet ResNet convs, not measured here) the paper's 5e-5 / 2e-5 / 8e-6 are
tau_rel ~ 0.35 / 0.42 / 0.57. Measured on ResNet-20 / Fashion-MNIST (BENCHMARKS.md),
tau_rel = 0.5 left a large gap between the soft and the snapped model (2 bits: 0.912 vs
0.899; 1 bit, d = 2: 0.895 vs 0.656) and 0.1 a small one with better snapped accuracy
(0.907 / 0.909; 0.875 / 0.854), hence the default 0.1. Each layer's tau is in its repr;
the report's notes (saved in the file) give the rule and the range of the layers' taus.

Bits. `bits` = b bits per vector (the paper's "b/d"); a whole-number bits target "Nbit" is
N bits per *weight*, so b = N x d; other targets pick b per layer with `size.allocate`
(high-rate estimate D(b) = n var(w) 2^(-2b/d)). Protocol presets (`protocol_overrides`):
"table1" keeps the first and last layers dense (paper Table 1), "fig4" puts layers with
fewer than 10,000 weights at 8 bits (paper Fig. 4).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm import tqdm

from ...errors import ConfigError
from ...graph import LayerRef, weight_layers
from ...layers import compressible, set_module, stored_modules
from ...palette import (
    check_bit_range,
    check_bits,
    check_codebook_dtype,
    cluster_rows,
    palette_spec,
    plan_bits,
    scaled_rows,
)
from ...size import Budget
from .. import Method, Notes, Plan, Request, register_method
from .layer import DKMLayer, sixteen_bit
from .soft import DEFAULT_CHUNK_ELEMENTS, dkm, naive_dkm

__all__ = ["DKMConfig", "DKMLayer", "PAPER_TAU", "dkm", "finalize_model", "naive_dkm",
           "protocol_overrides",
           "soft_weights"]

logger = logging.getLogger(__name__)

PAPER_TAU: dict[str, float] = {
    "resnet-3bit": 8e-6,
    "resnet-2bit": 2e-5,
    "resnet-1bit": 5e-5,
    "mobilenet-2bit": 1e-4,
    "distilbert": 8e-5,
}
"""The paper's global temperatures (Table 7), on raw squared distances: ResNet-18/50 at
3, 2, 1 bits, MobileNet-v1/v2 at 2 bits, DistilBERT. Use with `per_channel=False` (the
paper clusters raw weights); with a per-channel scale the distances are in units of each
row's max |w|."""

PROTOCOLS = ("table1", "fig4")
SMALL_LAYER_WEIGHTS = 10_000  # paper Fig. 4: layers below this stay at 8 bits


@dataclass(frozen=True)
class DKMConfig:
    """Options of the `dkm` method (bits, cluster_dim, per_channel, tau, tau_rel,
    min_bits, max_bits and codebook_dtype may be overridden per layer).

    bits: b bits per vector for every layer (else from the target); cluster_dim: d;
    tau: the paper's absolute temperature (or a `PAPER_TAU` key), else tau_rel x the
    layer's initial k-means distortion per vector; iters / epsilon / stop: the iteration
    cap and rule ("centroids": paper, max centroid change <= epsilon, 5 iterations;
    "inertia": coremltools, relative inertia change <= epsilon, use iters=3; epsilon is in
    the units of the clustered values, which with `per_channel` lie in [-1, 1], so the
    paper's 1e-4 is rarely reached and all `iters` run); unique:
    eDKM uniquification ("auto": for d = 1 when the weight is 16-bit); init_iters: Lloyd
    iterations of the initial k-means; chunk_elements: size of the temporaries;
    finalize=False: `compress` leaves the train-time DKM layers in place (coremltools'
    prepare step) for a training loop of your own; `finalize_model` snaps them afterwards.
    """

    bits: int | None = None
    cluster_dim: int = 1
    per_channel: bool = True
    tau: float | str | None = None
    tau_rel: float = 0.1
    iters: int = 5
    epsilon: float = 1e-4
    stop: str = "centroids"
    unique: bool | str = "auto"
    min_bits: int = 1
    max_bits: int = 8
    init_iters: int = 30
    codebook_dtype: str = "float16"
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    finalize: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_dim(self.cluster_dim)
        check_bit_range(self.min_bits, self.max_bits)
        _tau_value(self.tau)
        if not self.tau_rel > 0:
            raise ConfigError(f"tau_rel must be > 0, got {self.tau_rel!r}")
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise ConfigError(f"iters must be an integer >= 1, got {self.iters!r}")
        if not self.epsilon >= 0:
            raise ConfigError(f"epsilon must be >= 0, got {self.epsilon!r}")
        if self.stop not in ("centroids", "inertia"):
            raise ConfigError(f"stop must be 'centroids' (paper) or 'inertia' (coremltools), "
                              f"got {self.stop!r}")
        if self.unique not in (True, False, "auto"):
            raise ConfigError(f"unique must be True, False or 'auto', got {self.unique!r}")
        if self.unique is True and self.cluster_dim != 1:
            raise ConfigError("unique=True (eDKM uniquification) needs cluster_dim=1")
        if self.init_iters < 0 or self.chunk_elements < 1:
            raise ConfigError("init_iters must be >= 0 and chunk_elements >= 1")
        check_codebook_dtype(self.codebook_dtype)


def _check_dim(d: Any) -> None:
    if not (isinstance(d, int) and not isinstance(d, bool) and d >= 1):
        raise ConfigError(f"cluster_dim must be an integer >= 1, got {d!r}")


def _tau_value(tau: float | str | None) -> float | None:
    if tau is None:
        return None
    if isinstance(tau, str):
        if tau not in PAPER_TAU:
            raise ConfigError(f"unknown tau preset {tau!r}; known: {', '.join(PAPER_TAU)}")
        return PAPER_TAU[tau]
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise ConfigError(f"tau must be > 0 or a preset name, got {tau!r}")
    return float(tau)


class DKMMethod(Method):
    name = "dkm"
    config_cls = DKMConfig
    summary = "differentiable k-means (train-time soft clustering, scalar or vector)"
    calibrates = True

    def supports(self, module: nn.Module) -> str | None:
        return compressible(module)

    def _layer_dims(self, layers: list[LayerRef], cfg: DKMConfig) -> list[int]:
        dims = []
        for ref in layers:
            d = ref.option(cfg, "cluster_dim")
            _check_dim(d)
            row_len = ref.n_weights // ref.module.weight.shape[ref.out_axis]
            if row_len % d:
                raise ConfigError(f"layer {ref.name!r}: cluster_dim={d} does not divide its "
                                  f"rows of {row_len} weights (weight "
                                  f"{tuple(ref.module.weight.shape)}); choose a divisor or "
                                  "override cluster_dim for this layer")
            dims.append(d)
        return dims

    def plan(self, request: Request, survey: None, budget: Budget) -> Plan:
        """b bits per d-vector for each layer (`palette.plan_bits`); the saved form is the
        snapped palette. The temperatures come from the initial k-means (apply)."""
        cfg = request.config
        dims = self._layer_dims(request.layers, cfg)
        bits = plan_bits(request.layers, dims, budget, cfg)
        specs = {ref.name: palette_spec(ref, 2**b, d, ref.option(cfg, "per_channel"),
                                        ref.option(cfg, "codebook_dtype"))
                 for ref, d, b in zip(request.layers, dims, bits)}
        return Plan(specs, expected=tau_notes([1.2345e-4, 6.789e-3], cfg))

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> Notes:
        """Make each layer a DKM layer (initial k-means); returns the temperatures and the
        iteration rule for the report (the per-layer rows keep b and d)."""
        progress = tqdm(request.layers, desc="dkm init", unit="layer", disable=None,
                        leave=False)
        taus: list[float] = []
        for i, ref in enumerate(progress):
            layer = make_layer(ref, plan.layers[ref.name], request.config, request.seed + i)
            logger.debug("%s: %s, tau=%.3g", ref.name, layer.extra_repr(), layer.tau)
            set_module(model, ref.name, layer)
            taus.append(layer.tau)
        return tau_notes(taus, request.config)

    def finalize(self, model: nn.Module, config: Any) -> None:
        """Snap every DKM layer to its nearest centroids: plain `PalettizedLayer`s
        (unless `finalize=False` asks to keep the train-time form)."""
        if getattr(config, "finalize", True):
            finalize_model(model)


def tau_notes(taus: list[float], cfg: DKMConfig) -> Notes:
    """How the layers' temperatures were set and their range, and the soft k-means rule
    of each training step (the taus are gone from the snapped layers, so the report keeps
    them). Per-layer overrides of tau / tau_rel are included in the range."""
    rule = (f"tau = {cfg.tau}" + (f" ({_tau_value(cfg.tau):g})" if isinstance(cfg.tau, str)
                                  else "") if cfg.tau is not None else
            f"tau = {cfg.tau_rel} x each layer's initial k-means distortion")
    line = (f"dkm: {rule}; layer taus {min(taus):.3g} .. {max(taus):.3g}; soft k-means up "
            f"to {cfg.iters} iterations per training step (stop '{cfg.stop}', "
            f"epsilon {cfg.epsilon:g})")
    return Notes([line], {"tau_min": min(taus), "tau_max": max(taus)})


def finalize_model(model: nn.Module) -> nn.Module:
    """Replace every DKM layer of `model` (in place) by its snapped `PalettizedLayer`,
    rounded to the storage dtypes: exactly what `netshrink.save` writes. Returns `model`."""
    for name, layer in list(stored_modules(model)):
        if isinstance(layer, DKMLayer):
            set_module(model, name, layer.snapped())
    for _, layer in stored_modules(model):
        layer.finalize()
    return model


def make_layer(ref: LayerRef, spec: dict[str, Any], cfg: DKMConfig, seed: int) -> DKMLayer:
    """A `DKMLayer` for one chosen layer as `spec` (a palette spec) plans it: initial
    k-means of its (scaled) vectors, temperature, options."""
    module = ref.module
    k, d, dtype = int(spec["k"]), int(spec["d"]), str(spec["codebook_dtype"])
    rows, scale = scaled_rows(module, ref.out_axis, bool(spec["scale"]), dtype)
    result = cluster_rows(rows, k, d, seed=seed, init="kmeans++", iters=cfg.init_iters)
    points = rows.reshape(-1, d)
    tau = _tau_value(ref.option(cfg, "tau"))
    if tau is None:
        distortion = result.inertia / points.shape[0]
        spread = float(points.var()) * d if points.numel() > 1 else 1.0
        # a perfectly clustered layer has zero distortion: fall back to a tiny fraction
        # of its spread so that the softmax stays defined
        tau = ref.option(cfg, "tau_rel") * max(distortion, 1e-6 * spread, 1e-12)
    unique = cfg.unique if cfg.unique != "auto" else (d == 1 and sixteen_bit(module))
    if unique and d != 1:
        raise ConfigError(f"layer {ref.name!r}: unique=True needs cluster_dim=1")
    device = module.weight.device
    return DKMLayer(module, result.centroids.to(device), rows.to(device),
                    None if scale is None else scale.to(device), tau=tau, iters=cfg.iters,
                    epsilon=cfg.epsilon, stop=cfg.stop, unique=bool(unique),
                    codebook_dtype=dtype, out_axis=ref.out_axis,
                    chunk_elements=cfg.chunk_elements)


def protocol_overrides(model: nn.Module, protocol: str) -> dict[str, Any]:
    """`compress` keyword arguments for the paper's two protocols.

    "table1": first and last weight layers stay dense (paper Table 1), returned as
    `overrides={first: None, last: None}`. "fig4": layers with fewer than 10,000 weights
    are compressed at 8 bits (paper Fig. 4): `overrides={name: {"bits": 8}}` for each, and
    `min_weights=0` so that they are not skipped. Usage:
    `compress(model, "dkm", "2bit", **protocol_overrides(model, "table1"))`.
    """
    layers = [(n, m) for n, m in weight_layers(model) if compressible(m) is None]
    if protocol == "table1":
        if not layers:
            return {"overrides": {}}
        return {"overrides": {layers[0][0]: None, layers[-1][0]: None}}
    if protocol == "fig4":
        small = {n: {"bits": 8} for n, m in layers if m.weight.numel() < SMALL_LAYER_WEIGHTS}
        return {"overrides": small, "min_weights": 0}
    raise ConfigError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


@contextlib.contextmanager
def soft_weights(model: nn.Module) -> Iterator[None]:
    """Within this block, DKM layers compute with their soft weights W~ = A C even in
    evaluation mode: the paper's train-time accuracy (Table 5), beside the snapped one."""
    layers = [m for _, m in stored_modules(model) if isinstance(m, DKMLayer)]
    saved = [m.soft_eval for m in layers]
    for m in layers:
        m.soft_eval = True
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.soft_eval = flag


register_method(DKMMethod())
