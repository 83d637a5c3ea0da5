"""SMH's stored form: one shared bank (U, V) and per-layer views of it.

Structured multi-hashing (Eban et al., CVPR 2020, §3.1 Eq. 2-4;
docs/methods/smh.md#representation): the
N covered values (every chosen layer's weight, then its bias, in creation order) are laid
row-major into a virtual n x n matrix, n = ceil(sqrt(N)); that matrix is U @ V with U
(n x M) and V (M x n). Value j is <U[j // n], V[:, j % n]>, so each value depends on 2M
variables. Layer l owns the contiguous slice [offset_l, offset_l + size_l) and multiplies
it by s_l = he_l * alpha_l: `he_l` the layer's He fan-out init std (§3.3-3.4, official
code) and `alpha_l` a learnable scalar initialised to 1.

`HashBank` is an attached `StoredModule` (stored once, whatever the number of layers);
`HashedLayer` is a `CompressedLayer` that holds the bank as a plain attribute (found again
by `link` after loading) and regenerates its slice from the rows of U it touches,
`U[r0:r1] @ V`, in every forward (gradients reach U, V and alpha). With `cache=True` the
bank keeps the whole product U @ V while no gradient is needed (inference): one n x n
float tensor, about the size of the dense weights, recomputed when U or V change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...encoding import Encoding
from ...errors import FormatError
from ...layers import (
    _CONV_FORWARDS,
    CompressedLayer,
    StoredModule,
    planned_spec,
    register_layer,
)

BANK_KIND = "smh-bank"
LAYER_KIND = "smh"


def he_fan_out_std(shape: tuple[int, ...], out_axis: int) -> float:
    """The prescribed per-layer scale (docs/methods/smh.md#initialisation-and-scale; §3.3-3.4,
    official code): convs
    sqrt(2 / (kh * kw * out)), dense layers 1 / sqrt(out)."""
    out = shape[out_axis]
    kernel = math.prod(shape[2:]) if len(shape) > 2 else 1
    if len(shape) > 2:
        return math.sqrt(2.0 / (kernel * out))
    return 1.0 / math.sqrt(out)


def side(n_values: int) -> int:
    """n = ceil(sqrt(N)): the side of the virtual square matrix."""
    return math.isqrt(n_values - 1) + 1 if n_values > 1 else 1


@register_layer
class HashBank(StoredModule):
    """U (n x M) and V (M x n), stored once at `dtype`; `layers` is the tiling order
    ([name, offset, size] per layer), recorded in the file."""

    kind = BANK_KIND
    attached = True

    def __init__(self, n: int, rank: int, layers: list[tuple[str, int, int]],
                 dtype: str = "float32", cache: bool = False) -> None:
        super().__init__()
        if n < 1 or rank < 1:
            raise ValueError(f"bank needs n >= 1 and M >= 1, got n={n}, M={rank}")
        end = 0
        for name, offset, size in layers:
            if offset != end or size < 1:
                raise ValueError(f"layer {name!r} at offset {offset} (size {size}) is not "
                                 f"contiguous after offset {end}")
            end = offset + size
        if end > n * n:
            raise ValueError(f"{end} tiled values do not fit an {n} x {n} matrix")
        Encoding.of(dtype)
        self.n, self.rank, self.dtype = int(n), int(rank), dtype
        self.layers = [(str(a), int(b), int(c)) for a, b, c in layers]
        self.cache = bool(cache)
        self.U = nn.Parameter(torch.zeros(n, rank))
        self.V = nn.Parameter(torch.zeros(rank, n))
        self._cached: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @property
    def n_values(self) -> int:
        """N: the values tiled into the matrix (the rest of n^2 is unused)."""
        return self.layers[-1][1] + self.layers[-1][2] if self.layers else 0

    def variables(self) -> int:
        """Trainable hash variables 2 M n (the paper's count)."""
        return self.U.numel() + self.V.numel()

    def init_random(self, generator: torch.Generator | None = None) -> None:
        """U, V i.i.d. N(0, M^(-1/2)) (std M^(-1/4)): each virtual value has unit variance."""
        std = self.rank ** -0.25
        with torch.no_grad():
            for p in (self.U, self.V):
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def init_svd(self, matrix: torch.Tensor) -> None:
        """The best rank-M fit of `matrix` (n x n): truncated SVD, sqrt(S) split evenly
        (docs/methods/smh.md#training, start from a pretrained model)."""
        m = self.rank
        a = matrix.double()
        if m >= self.n // 4:
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            u, s, vh = u[:, :m], s[:m], vh[:m]
        else:  # randomized range finder with 4 power iterations: O(n^2 m) for m << n,
            # within rounding of the exact truncated SVD on the matrices tried
            g = torch.Generator().manual_seed(0)
            q = min(self.n, m + 16)
            omega = torch.randn(self.n, q, dtype=a.dtype, generator=g)
            y = a @ omega
            for _ in range(4):
                y, _ = torch.linalg.qr(a @ (a.T @ torch.linalg.qr(y)[0]))
            basis, _ = torch.linalg.qr(y)
            ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
            u, s, vh = (basis @ ub)[:, :m], s[:m], vh[:m]
        root = s.clamp_min(0).sqrt()
        with torch.no_grad():
            self.U.copy_((u * root).float())
            self.V.copy_((root[:, None] * vh).float())

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1-1 of the virtual matrix, (r1 - r0) x n. From the cache in
        inference when `cache` is on, else computed from U[r0:r1] and V."""
        needs_grad = torch.is_grad_enabled() and (self.U.requires_grad or self.V.requires_grad)
        if self.cache and not needs_grad:
            return self.full()[r0:r1]
        return self.U[r0:r1] @ self.V

    def full(self) -> torch.Tensor:
        """The whole product U @ V, cached until U or V change (versions, device, dtype)."""
        key = (self.U._version, self.V._version, self.U.data_ptr(), self.V.data_ptr(),
               self.U.dtype, self.U.device)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self.U @ self.V)
        return self._cached[1]

    def clear_cache(self) -> None:
        self._cached = None

    def set_cache(self, on: bool) -> None:
        """Expand U @ V once for inference (True) or regenerate per call (False); the
        choice is saved with the bank."""
        self.cache = bool(on)
        self.clear_cache()

    def values(self, offset: int, size: int) -> torch.Tensor:
        """Virtual values [offset, offset + size) as a flat tensor (touches only their
        rows of U)."""
        r0, r1 = offset // self.n, (offset + size - 1) // self.n + 1
        start = offset - r0 * self.n
        return self.block(r0, r1).reshape(-1)[start:start + size]

    def stored(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        enc = Encoding.of(self.dtype)
        return {"U": (self.U, enc), "V": (self.V, enc)}

    def spec_extra(self) -> dict[str, Any]:
        return {"n": self.n, "rank": self.rank, "dtype": self.dtype, "cache": self.cache,
                "layers": [list(x) for x in self.layers]}

    @staticmethod
    def plan_spec(n: int, rank: int, layers: list[tuple[str, int, int]], dtype: str,
                  cache: bool) -> dict[str, Any]:
        """The spec of a bank (what a plan records and `_build` reads)."""
        return {"kind": BANK_KIND, "n": int(n), "rank": int(rank), "dtype": dtype,
                "cache": bool(cache), "layers": [list(x) for x in layers]}

    @classmethod
    def _build(cls, spec: dict[str, Any], target: nn.Module | None) -> HashBank:
        layers = [(str(a), int(b), int(c)) for a, b, c in spec["layers"]]
        return cls(int(spec["n"]), int(spec["rank"]), layers, str(spec["dtype"]),
                   bool(spec.get("cache", False)))

    def describe(self) -> str:
        return (f"shared U {self.n}x{self.rank} + V {self.rank}x{self.n} "
                f"({self.variables()} variables, {len(self.layers)} layers, "
                f"{'cached' if self.cache else 'per-call'} expansion)")

    def extra_repr(self) -> str:
        return f"n={self.n}, M={self.rank}, layers={len(self.layers)}"


@register_layer
class HashedLayer(CompressedLayer):
    """A layer whose weight (and bias, if any) is a slice of the bank's U @ V times
    he_std * alpha. Stores only alpha (fp32) and the host's other tensors."""

    kind = LAYER_KIND
    ALPHA = Encoding.of("float32")
    """How alpha is stored (the planner counts it with this too)."""

    def __init__(self, module: nn.Module, offset: int, he_std: float, bank: str,
                 out_axis: int | None = None) -> None:
        bias = module._parameters.get("bias")
        super().__init__(module, out_axis)
        self.bias_shape: tuple[int, ...] | None = None
        if bias is not None:
            self.bias_shape = tuple(bias.shape)
            del self.host._parameters["bias"]
            self.host.register_parameter("bias", None)
        self.offset, self.he_std, self.bank_name = int(offset), float(he_std), str(bank)
        self.alpha = nn.Parameter(torch.ones(()))

    @property
    def size(self) -> int:
        """Values this layer owns in the tiling: weight, then bias."""
        return math.prod(self.weight_shape) + (math.prod(self.bias_shape)
                                               if self.bias_shape else 0)

    def link(self, root: nn.Module) -> None:
        try:
            bank = root.get_submodule(self.bank_name)
        except AttributeError:
            raise FormatError(f"SMH layer needs the bank {self.bank_name!r}, "
                              "which the model lacks") from None
        if not isinstance(bank, HashBank):
            raise FormatError(f"{self.bank_name!r} is a {type(bank).__name__}, not an SMH bank")
        if self.offset + self.size > bank.n_values or not any(
                off == self.offset and size == self.size for _, off, size in bank.layers):
            raise FormatError(f"SMH layer slice [{self.offset}, {self.offset + self.size}) is "
                              f"not in the bank's tiling order")
        object.__setattr__(self, "bank", bank)

    def _flat(self) -> torch.Tensor:
        bank = self.__dict__.get("bank")
        if bank is None:
            raise RuntimeError("SMH layer is not linked to its bank (call link(model))")
        return bank.values(self.offset, self.size) * (self.he_std * self.alpha)

    def decode_weight(self) -> torch.Tensor:
        return self._flat()[:math.prod(self.weight_shape)].reshape(self.weight_shape)

    def decode_bias(self) -> torch.Tensor | None:
        if self.bias_shape is None:
            return None
        return self._flat()[math.prod(self.weight_shape):].reshape(self.bias_shape)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        flat = self._flat().to(self.weight_dtype)
        n_w = math.prod(self.weight_shape)
        weight = flat[:n_w].reshape(self.weight_shape)
        bias = flat[n_w:].reshape(self.bias_shape) if self.bias_shape is not None else None
        host, fwd = self.host, type(self.host).forward
        if len(args) == 1 and not kwargs:
            if fwd is nn.Linear.forward:
                return F.linear(args[0], weight, bias)
            if fwd in _CONV_FORWARDS:
                return host._conv_forward(args[0], weight, bias)
        tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return functional_call(host, tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "bias" and self.__dict__.get("bias_shape") is not None:
            return self.decode_bias().to(self.weight_dtype)
        return super().__getattr__(name)

    def stored_extra(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        return {"alpha": (self.alpha, self.ALPHA)}

    @classmethod
    def plan_spec(cls, module: nn.Module, offset: int, he_std: float, bank: str,
                  out_axis: int) -> dict[str, Any]:
        """The spec of the hashed layer that will replace `module`."""
        bias = module._parameters.get("bias")
        return planned_spec(cls.kind, module, out_axis, offset=int(offset),
                            he_std=float(he_std), bank=str(bank),
                            bias_shape=None if bias is None else list(bias.shape))

    def spec_extra(self) -> dict[str, Any]:
        return {"offset": self.offset, "he_std": self.he_std, "bank": self.bank_name,
                "bias_shape": None if self.bias_shape is None else list(self.bias_shape)}

    @classmethod
    def _allocate(cls, module: nn.Module, out_axis: int, extra: dict[str, Any]
                  ) -> HashedLayer:
        want = extra.get("bias_shape")
        has = module._parameters.get("bias")
        if want is not None and has is None and "bias" in module._parameters:
            # model_like was itself compressed: its host lost the bias to the bank
            module.bias = nn.Parameter(torch.empty(want, device="meta"))
            has = module.bias
        if (want is None) != (has is None) or (want is not None and
                                               list(has.shape) != list(want)):
            raise ValueError(f"file has bias {want}, the model's layer has "
                             f"{None if has is None else list(has.shape)}")
        he = float(extra["he_std"])
        if not math.isfinite(he) or he <= 0:
            raise ValueError(f"he_std must be positive, got {he}")
        return cls(module, int(extra["offset"]), he, str(extra["bank"]), out_axis)

    def describe(self) -> str:
        return (f"SMH slice [{self.offset}, {self.offset + self.size}) x "
                f"{self.he_std:.3g} * alpha {float(self.alpha.detach()):.3f}")
