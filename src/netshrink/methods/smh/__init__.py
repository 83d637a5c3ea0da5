"""`smh`: Structured Multi-Hashing (Eban et al., CVPR 2020): the whole network from U @ V.

Every chosen layer's weight and bias (conv kernels, depthwise too, linear layers; never
BatchNorm, which `supports` leaves out with the other 1-D tensors) is tiled, in creation
order, into one virtual n x n matrix that is the product of two thin trainable matrices
(§3.1, Eq. 2-4; `layers.py`). The budget sets M (§3.2): 2 M n variables, stored at
`dtype`, plus one fp32 scalar per layer, plus everything left out at its stored dtype.

`compress`'s `min_weights` (default 1024) keeps smaller layers dense (counted at their
dtype); pass `min_weights=0` to cover every conv/linear layer, as the paper does.

Targets:
- a size ('1.5MB') or ratio ('x10'): the largest M whose whole file (header included) fits;
- bits per weight ('2bit'): 2 M n * dtype_bits <= bits * (compressed weights);
- `variables=T` (config): M = floor(T / 2n), the paper's variable budget (code: floor);
- `rank=M` (config): M directly.
`variables` / `rank` take precedence over the target.

Initialisation (§3.3-3.4): `init="random"` draws U, V i.i.d. N(0, M^(-1/2)) and starts
every layer at its He fan-out std (training from scratch, the paper's setting: pass
`Finetune(distill_weight=0.0)` or train with `netshrink.train.fit`). `init="svd"` (the
default, for a trained model) starts from the truncated SVD of the tiled weights, each
layer divided by its He std: the best rank-M fit (Eckart-Young), then distillation from
the original through `compress(..., finetune=Finetune(...))` (docs/methods/smh.md#training).

Expansion: by default every layer regenerates its slice in every call (`U[rows] @ V`,
peak extra memory one layer's rows x n); `cache=True` keeps the whole U @ V (n^2 floats,
about the dense weights' size) while no gradient is needed, so inference pays the
product once (`HashBank.set_cache` toggles it after loading). The report's notes state
M, n, the variables, and which expansion the model was saved with and the memory it costs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...encoding import Encoding
from ...errors import ConfigError, InfeasibleTargetError
from ...graph import LayerRef
from ...layers import compressible, set_module
from ...size import Budget, format_bytes
from .. import Method, Notes, Plan, Request, register_method
from .layers import HashBank, HashedLayer, he_fan_out_std, side

__all__ = ["HashBank", "HashedLayer", "SMHConfig", "SMHMethod", "plan_rank", "tiling"]

logger = logging.getLogger(__name__)

_INITS = ("svd", "random")


@dataclass(frozen=True)
class SMHConfig:
    """Options of the `smh` method (global: one bank for the whole network).

    rank: M directly; variables: a budget of trainable hash variables (M = floor(T / 2n));
    init: 'svd' (from the given weights) or 'random' (from scratch); dtype: storage of
    U and V; cache: expand U @ V once for inference instead of per call; bank_name: the
    attribute the shared bank is attached under.
    """

    rank: int | None = None
    variables: int | None = None
    init: str = "svd"
    dtype: str = "float32"
    cache: bool = False
    bank_name: str = "smh_bank"

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) < 1):
            raise ConfigError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.variables is not None and (isinstance(self.variables, bool)
                                           or int(self.variables) < 2):
            raise ConfigError(f"variables must be an integer >= 2, got {self.variables!r}")
        if self.init not in _INITS:
            raise ConfigError(f"init must be one of {_INITS}, got {self.init!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not self.bank_name.isidentifier():
            raise ConfigError(f"bank_name must be a Python identifier, got {self.bank_name!r}")


def tiling(layers: list[LayerRef]) -> list[tuple[str, int, int]]:
    """(name, offset, size) per layer in creation order: weight then bias, contiguous."""
    out, offset = [], 0
    for ref in layers:
        bias = ref.module._parameters.get("bias")
        size = ref.n_weights + (bias.numel() if bias is not None else 0)
        out.append((ref.name, offset, size))
        offset += size
    return out


def _bias_bits(layers: list[LayerRef]) -> int:
    """Bits of the chosen layers' biases, which the budget counted as fixed but SMH tiles."""
    return sum(Encoding.of(b.dtype).nbits(b.numel()) for r in layers
               if (b := r.module._parameters.get("bias")) is not None)


def plan_rank(layers: list[LayerRef], budget: Budget, config: SMHConfig) -> tuple[int, int]:
    """(n, M) for these layers under the budget (§3.2): `rank` or `variables` when given,
    else the largest M whose U and V (plus one scale per layer, less the biases now tiled)
    cost no more than the budget allows (`Budget.cost`: everything for a size or ratio
    target, U and V alone for a bits target). M is capped at n."""
    n_values = sum(size for _, _, size in tiling(layers))
    n = side(n_values)
    var_bits = Encoding.of(config.dtype).bits
    if config.rank is not None:
        rank = int(config.rank)
    elif config.variables is not None:
        rank = int(config.variables) // (2 * n)
        if rank < 1:
            raise InfeasibleTargetError(
                f"variables={config.variables} is below the smallest SMH budget for these "
                f"layers: 2n = {2 * n} variables (M = 1, n = {n}, N = {n_values} values)")
    else:
        side_bits = HashedLayer.ALPHA.nbits(1) * len(layers) - _bias_bits(layers)
        per_rank = 2 * n * var_bits
        rank = math.floor((budget.available() - budget.cost(side_bits, 0)) / per_rank)
        if rank < 1:
            raise budget.infeasible(budget.cost(per_rank + side_bits, per_rank),
                                    f"with SMH at M = 1 (n = {n}, U and V at {config.dtype})")
    return n, min(rank, n)


def tiled_matrix(layers: list[LayerRef], n: int, scales: list[float]) -> torch.Tensor:
    """The n x n matrix of the layers' weights and biases, each divided by its scale, in
    the tiling order; unused entries are zero."""
    flat = torch.zeros(n * n, dtype=torch.float64)
    offset = 0
    for ref, scale in zip(layers, scales):
        parts = [ref.module.weight]
        if (bias := ref.module._parameters.get("bias")) is not None:
            parts.append(bias)
        for t in parts:
            k = t.numel()
            flat[offset:offset + k] = t.detach().reshape(-1).double().cpu() / scale
            offset += k
    return flat.reshape(n, n)


class SMHMethod(Method):
    name = "smh"
    config_cls = SMHConfig
    summary = "structured multi-hashing: all weights from two thin matrices U @ V"

    def supports(self, module: nn.Module) -> str | None:
        return compressible(module)

    def plan(self, request: Request, survey: None, budget: Budget) -> Plan:
        """M from the budget; every chosen layer becomes a slice of one bank, which is held
        by the first chosen layer (`bank_name` under it): not by the model's root, whose
        forward may call every child (nn.Sequential)."""
        layers, config = request.layers, request.config
        first = layers[0]
        if hasattr(first.module, config.bank_name):
            raise ConfigError(f"layer {first.name!r} already has an attribute "
                              f"{config.bank_name!r}: choose another bank_name")
        n, rank = plan_rank(layers, budget, config)
        order = tiling(layers)
        bank_path = f"{first.name}.{config.bank_name}"
        specs = {ref.name: HashedLayer.plan_spec(
                     ref.module, offset, he_fan_out_std(tuple(ref.module.weight.shape),
                                                        ref.out_axis), bank_path, ref.out_axis)
                 for ref, (_, offset, _) in zip(layers, order)}
        bank = HashBank.plan_spec(n, rank, order, config.dtype, config.cache)
        return Plan(specs, {bank_path: bank}, notes=bank_notes(bank), detail=bank_path)

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> None:
        """Tile the layers into one bank (random or SVD start) and replace them by hashed
        layers."""
        layers, config = request.layers, request.config
        bank_path = plan.detail
        spec = plan.attached[bank_path]
        if spec["rank"] == spec["n"]:
            logger.warning("smh: M = n = %d (the budget or rank allows at least as many "
                           "variables as values: nothing is saved on the covered layers)",
                           spec["n"])
        bank = HashBank.from_spec(spec)
        order = [tuple(x) for x in spec["layers"]]
        scales = [plan.layers[ref.name]["he_std"] for ref in layers]
        if config.init == "random":
            bank.init_random(torch.Generator().manual_seed(request.seed))
        else:
            bank.init_svd(tiled_matrix(layers, bank.n, scales))
        device = layers[0].module.weight.device
        bank.to(device)
        hashed = []
        for ref, (_, offset, _), scale in zip(layers, order, scales):
            layer = HashedLayer(ref.module, offset, scale, bank_path, ref.out_axis)
            layer.to(device)
            set_module(model, ref.name, layer)
            hashed.append(layer)
        set_module(model, bank_path, bank)
        for layer in hashed:
            layer.link(model)
        logger.info("smh: %d values (%d layers) tiled into %d x %d; M = %d, %d variables "
                    "(%.1fx fewer than the covered values)", bank.n_values, len(layers),
                    bank.n, bank.n, bank.rank, bank.variables(),
                    bank.n_values / bank.variables())


def bank_notes(spec: dict[str, Any]) -> Notes:
    """M, n and the variables, and the expansion the bank is saved with (from its spec):
    per call (each layer computes its rows of U @ V in every forward; extra memory up to
    the largest layer's rows x n) or once (the whole U @ V, n x n, kept for inference)."""
    n, rank, cache = int(spec["n"]), int(spec["rank"]), bool(spec["cache"])
    layers = spec["layers"]
    value_bytes = 4  # U and V compute in float32, whatever their storage dtype
    variables = 2 * n * rank
    n_values = layers[-1][1] + layers[-1][2]
    rows = max((offset + size - 1) // n + 1 - offset // n for _, offset, size in layers)
    per_call, once = rows * n * value_bytes, n * n * value_bytes
    lines = [f"smh: M = {rank}, n = {n}: {variables} variables "
             f"({spec['dtype']}) for {n_values} values in {len(layers)} layers "
             f"(x{n_values / variables:.1f} fewer)"]
    if cache:
        lines.append(f"smh expansion: once (cache=True): the first inference call after "
                     f"loading expands U @ V ({n} x {n}) and keeps it, "
                     f"{format_bytes(once)} of memory; per call would need "
                     f"{format_bytes(per_call)} at most")
    else:
        lines.append(f"smh expansion: per call (cache=False): each layer expands its rows "
                     f"of U @ V in every forward, {format_bytes(per_call)} of extra memory in "
                     f"inference at most ({rows} x {n}); once would keep "
                     f"{format_bytes(once)}")
    facts = {"n": n, "M": rank, "variables": variables, "values": n_values,
             "expansion": "once" if cache else "per call",
             "expansion_bytes": once if cache else per_call}
    return Notes(lines, facts)


def bank_of(model: nn.Module) -> HashBank:
    """The model's SMH bank (first one found); ConfigError if it has none."""
    for module in model.modules():
        if isinstance(module, HashBank):
            return module
    raise ConfigError("this model has no SMH bank")


register_method(SMHMethod())
