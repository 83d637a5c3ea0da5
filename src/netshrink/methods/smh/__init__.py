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
the original through `compress(..., finetune=Finetune(...))` (METHODS.md SMH "Training").

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

from ...errors import ConfigError, InfeasibleTargetError
from ...graph import LayerRef
from ...layers import compressible, set_module
from ...size import DTYPE_BITS, Budget, Encoding, format_bytes
from .. import Method, Notes, register_method
from .layers import HashBank, HashedLayer, he_fan_out_std, side

__all__ = ["HashBank", "HashedLayer", "SMHConfig", "SMHMethod", "plan_rank", "tiling"]

logger = logging.getLogger(__name__)

_INITS = ("svd", "random")
_ALPHA_BITS = 32


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
    """(n, M) for these layers under the budget (§3.2); InfeasibleTargetError when not
    even M = 1 fits."""
    n_values = sum(size for _, _, size in tiling(layers))
    n = side(n_values)
    var_bits = DTYPE_BITS[config.dtype]
    if config.rank is not None:
        rank = int(config.rank)
    elif config.variables is not None:
        rank = int(config.variables) // (2 * n)
        if rank < 1:
            raise InfeasibleTargetError(
                f"variables={config.variables} is below the smallest SMH budget for these "
                f"layers: 2n = {2 * n} variables (M = 1, n = {n}, N = {n_values} values)")
    elif budget.target.kind == "bits":
        rank = math.floor(budget.target.value * budget.n_weights / (2 * n * var_bits))
        if rank < 1:
            raise ConfigError(
                f"target {budget.target} is below the smallest SMH budget: M = 1 takes "
                f"{2 * n * var_bits / budget.n_weights:.3f} bits per weight (n = {n})")
    else:
        side_bits = _ALPHA_BITS * len(layers) - _bias_bits(layers)
        available = budget.layer_bits() - side_bits
        rank = math.floor(available / (2 * n * var_bits))
        if rank < 1:
            raise budget.infeasible(2 * n * var_bits + side_bits,
                                    f"with SMH at M = 1 (n = {n}, U and V at {config.dtype})")
    if rank > n:
        logger.warning("smh: the budget allows M = %d > n = %d; using M = n (more variables "
                       "than values: nothing is saved on the covered layers)", rank, n)
        rank = n
    return n, rank


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

    def encode(self, model: nn.Module, layers: list[LayerRef], budget: Budget,
               config: SMHConfig, *, data: Any = None, seed: int = 0) -> Notes:
        """Tile the layers into one bank and replace them by hashed layers; returns the
        bank's shape and expansion cost for the report."""
        if hasattr(model, config.bank_name):
            raise ConfigError(f"the model already has an attribute {config.bank_name!r}: "
                              "choose another bank_name")
        n, rank = plan_rank(layers, budget, config)
        order = tiling(layers)
        scales = [he_fan_out_std(tuple(r.module.weight.shape), r.out_axis) for r in layers]
        bank = HashBank(n, rank, order, config.dtype, config.cache)
        if config.init == "random":
            bank.init_random(torch.Generator().manual_seed(seed))
        else:
            bank.init_svd(tiled_matrix(layers, n, scales))
        weight = layers[0].module.weight
        bank.to(weight.device)
        setattr(model, config.bank_name, bank)
        for ref, (_, offset, _), scale in zip(layers, order, scales):
            layer = HashedLayer(ref.module, offset, scale, config.bank_name, ref.out_axis)
            layer.to(weight.device)
            layer.link(model)
            set_module(model, ref.name, layer)
        logger.info("smh: %d values (%d layers) tiled into %d x %d; M = %d, %d variables "
                    "(%.1fx fewer than the covered values)", bank.n_values, len(layers), n,
                    n, rank, bank.variables(), bank.n_values / bank.variables())
        return bank_notes(bank)


def bank_notes(bank: HashBank) -> Notes:
    """M, n and the variables, and the expansion the bank is saved with: per call (each
    layer computes its rows of U @ V in every forward; extra memory up to the largest
    layer's rows x n) or once (the whole U @ V, n x n, kept for inference)."""
    value_bytes = bank.U.element_size()
    rows = max((offset + size - 1) // bank.n + 1 - offset // bank.n
               for _, offset, size in bank.layers)
    per_call, once = rows * bank.n * value_bytes, bank.n * bank.n * value_bytes
    lines = [f"smh: M = {bank.rank}, n = {bank.n}: {bank.variables()} variables "
             f"({bank.dtype}) for {bank.n_values} values in {len(bank.layers)} layers "
             f"(x{bank.n_values / bank.variables():.1f} fewer)"]
    if bank.cache:
        lines.append(f"smh expansion: once (cache=True): the first inference call after "
                     f"loading expands U @ V ({bank.n} x {bank.n}) and keeps it, "
                     f"{format_bytes(once)} of memory; per call would need "
                     f"{format_bytes(per_call)} at most")
    else:
        lines.append(f"smh expansion: per call (cache=False): each layer expands its rows "
                     f"of U @ V in every forward, {format_bytes(per_call)} of extra memory in "
                     f"inference at most ({rows} x {bank.n}); once would keep "
                     f"{format_bytes(once)}")
    facts = {"n": bank.n, "M": bank.rank, "variables": bank.variables(),
             "values": bank.n_values, "expansion": "once" if bank.cache else "per call",
             "expansion_bytes": once if bank.cache else per_call}
    return Notes(lines, facts)


def bank_of(model: nn.Module) -> HashBank:
    """The model's SMH bank (first one found); ConfigError if it has none."""
    for module in model.modules():
        if isinstance(module, HashBank):
            return module
    raise ConfigError("this model has no SMH bank")


register_method(SMHMethod())
