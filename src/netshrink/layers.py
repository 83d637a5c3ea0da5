"""Compressed layers: small stored tensors plus a decode, as ordinary nn.Modules.

A `CompressedLayer` (a `StoredModule`) replaces one Linear / Conv / Embedding module. It
declares the tensors it stores and their encodings in `stored()`; size accounting
(`size.py`), the file format (`fileformat.py`) and the report all read that one
declaration. `spec()` returns the JSON needed to rebuild an empty layer of the same shape
(`from_spec`), into which `load_stored()` puts the saved tensors after validating them.
A `StoredModule` with `attached = True` is a representation shared by several layers
(SMH), added to the model rather than replacing a layer.

`PalettizedLayer` is the deployable form shared by the palette methods (k-means, DKM after
snapping, PQF): each weight row is cut into d-dimensional subvectors (row-major over
C_in, kh, kw, as in PQF, METHODS.md) and each subvector is an index into a per-layer
codebook of k codewords, optionally times a per-output-channel scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FormatError
from .size import Encoding, ceil_log2

LAYER_KINDS: dict[str, type[StoredModule]] = {}

_CONV_ARGS = ("stride", "padding", "dilation", "groups")


@dataclass(frozen=True)
class OpSpec:
    """How a dense layer applies its weight: type, weight shape and JSON-able arguments."""

    type: str
    weight_shape: tuple[int, ...]
    args: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_module(module: nn.Module) -> OpSpec:
        """Describe a supported module; raises TypeError with the reason otherwise."""
        shape = tuple(module.weight.shape) if hasattr(module, "weight") else ()
        if type(module) is nn.Linear:
            return OpSpec("linear", shape)
        if type(module) in (nn.Conv1d, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise TypeError(f"padding_mode={module.padding_mode!r} is not supported")
            if isinstance(module.padding, str):
                raise TypeError(f"padding={module.padding!r} (string) is not supported")
            args = {a: list(getattr(module, a)) if isinstance(getattr(module, a), tuple)
                    else getattr(module, a) for a in _CONV_ARGS}
            return OpSpec("conv1d" if type(module) is nn.Conv1d else "conv2d", shape, args)
        if type(module) is nn.Embedding:
            if module.max_norm is not None:
                raise TypeError("Embedding with max_norm (which rewrites weights) is not supported")
            return OpSpec("embedding", shape, {"padding_idx": module.padding_idx})
        raise TypeError(f"{type(module).__name__} is not a supported layer type")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "weight_shape": list(self.weight_shape), "args": self.args}

    @staticmethod
    def from_json(obj: Any) -> OpSpec:
        try:
            op = OpSpec(str(obj["type"]), tuple(int(s) for s in obj["weight_shape"]),
                        dict(obj.get("args", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"malformed layer op description {obj!r}: {e}") from None
        if op.type not in ("linear", "conv1d", "conv2d", "embedding"):
            raise FormatError(f"unknown layer op type {op.type!r}")
        if any(s <= 0 for s in op.weight_shape) or len(op.weight_shape) < 2:
            raise FormatError(f"invalid weight shape {op.weight_shape}")
        return op

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        """Run the op with a (decoded) weight; the weight follows the input's dtype."""
        if self.type == "embedding":
            return F.embedding(x, weight, self.args.get("padding_idx"))
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        if self.type == "linear":
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.type == "conv1d" else F.conv2d
        a = self.args
        return conv(x, weight, bias, _tup(a["stride"]), _tup(a["padding"]),
                    _tup(a["dilation"]), int(a["groups"]))


def _tup(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def register_layer(cls: type[StoredModule]) -> type[StoredModule]:
    """Class decorator: make a stored module kind loadable from files."""
    LAYER_KINDS[cls.kind] = cls
    return cls


class StoredModule(nn.Module):
    """A module that is saved as small stored tensors plus JSON settings.

    Most are `CompressedLayer`s, which replace one dense layer. A module with
    `attached = True` is instead added to the model, for example one representation
    shared by many layers (SMH's whole-network factors). After loading, `link(root)` is
    called on every stored module, so that layers can find such a shared module again.
    Layers should hold it as a plain attribute (`object.__setattr__`), not as a submodule,
    so that it is stored once.
    """

    kind: ClassVar[str] = ""
    attached: ClassVar[bool] = False

    def stored(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        """Every tensor this module stores, with its encoding (the single declaration)."""
        raise NotImplementedError

    def spec_extra(self) -> dict[str, Any]:
        """JSON-able settings needed to rebuild an empty module of the same shape."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.spec_extra()}

    @classmethod
    def _build(cls, spec: dict[str, Any]) -> StoredModule:
        """An empty module (right shapes, any values) for `spec`; raises on bad settings."""
        raise NotImplementedError

    @staticmethod
    def from_spec(spec: Any) -> StoredModule:
        """Rebuild an empty module from `spec()` output; FormatError on a bad spec."""
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in LAYER_KINDS:
            raise FormatError(f"unknown compressed layer kind {kind!r} "
                              f"(known: {', '.join(sorted(LAYER_KINDS))})")
        try:
            return LAYER_KINDS[kind]._build(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"invalid settings for a {kind} layer: {e}") from None

    def validate(self) -> None:
        """Check loaded values (e.g. codes in range); raise FormatError otherwise."""

    def describe(self) -> str:
        """A short human-readable summary for the report."""
        return ""

    def link(self, root: nn.Module) -> None:
        """Called after a whole model is loaded: find shared modules (default: nothing)."""

    def finalize(self) -> None:
        """Make the module exactly what will be saved (e.g. round to storage dtypes)."""
        with torch.no_grad():
            for t, enc in self.stored().values():
                if t.is_floating_point() and not enc.packed:
                    t.copy_(t.to(enc.torch_dtype).to(t.dtype))

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in, checking names, shapes and values (FormatError)."""
        slots = self.stored()
        if set(tensors) != set(slots):
            raise FormatError(f"{self.kind} layer expects tensors {sorted(slots)}, "
                              f"file has {sorted(tensors)}")
        with torch.no_grad():
            for name, (slot, _) in slots.items():
                value = tensors[name]
                if tuple(value.shape) != tuple(slot.shape):
                    raise FormatError(f"tensor {name!r} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(slot.shape)}")
                slot.copy_(value.to(slot.dtype))
        self.validate()


class CompressedLayer(StoredModule):
    """Base of every compressed layer: an op, an optional dense bias, and a weight decoder.

    Subclasses implement `decode_weight`, `stored_extra`, `spec_extra`, `_allocate` and
    may override `forward` (e.g. factorised layers that run two smaller ops).
    """

    def __init__(self, op: OpSpec, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.op = op
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    # -- what subclasses provide -----------------------------------------------------
    def decode_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (shape `op.weight_shape`)."""
        raise NotImplementedError

    def stored_extra(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        """The method's own stored tensors and encodings (bias is added by the base)."""
        raise NotImplementedError

    @classmethod
    def _allocate(cls, op: OpSpec, has_bias: bool, extra: dict[str, Any]) -> CompressedLayer:
        """An empty layer (right shapes, any values) for `spec`; raises on bad settings."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply(x, self.decode_weight(), self.bias)

    def stored(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        out = dict(self.stored_extra())
        if self.bias is not None:
            out["bias"] = (self.bias, Encoding.of(self.bias.dtype))
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op.to_json(), "bias": self.bias is not None,
                **self.spec_extra()}

    @classmethod
    def _build(cls, spec: dict[str, Any]) -> CompressedLayer:
        op = OpSpec.from_json(spec.get("op"))
        extra = {k: v for k, v in spec.items() if k not in ("kind", "op", "bias")}
        return cls._allocate(op, bool(spec.get("bias")), extra)

    def extra_repr(self) -> str:
        return f"{self.op.type}, weight={self.op.weight_shape}"


@register_layer
class PalettizedLayer(CompressedLayer):
    """Weight = codebook[codes] (x per-row scale): palettization / product quantization.

    codes: (rows, row_len / d) int64 buffer, rows = weight.shape[0]; codebook: (k, d)
    trainable (fp32 in memory, stored at `codebook_dtype`); scale: optional (rows,)
    trainable per-output-channel scale. Codes are stored at ceil(log2 k) bits.
    """

    kind = "palette"

    def __init__(self, op: OpSpec, bias: torch.Tensor | None, codes: torch.Tensor,
                 codebook: torch.Tensor, scale: torch.Tensor | None = None,
                 codebook_dtype: str = "float16") -> None:
        super().__init__(op, bias)
        rows, row_len = op.weight_shape[0], math.prod(op.weight_shape[1:])
        k, d = codebook.shape
        if row_len % d or tuple(codes.shape) != (rows, row_len // d):
            raise ValueError(f"codes {tuple(codes.shape)} / codebook {tuple(codebook.shape)} "
                             f"do not fit weight {op.weight_shape}")
        if scale is not None and tuple(scale.shape) != (rows,):
            raise ValueError(f"scale must have shape ({rows},), got {tuple(scale.shape)}")
        Encoding.of(codebook_dtype)  # validates the name
        self.codebook_dtype = codebook_dtype
        self.register_buffer("codes", codes.detach().to(torch.int64).clone())
        self.codebook = nn.Parameter(codebook.detach().float().clone())
        self.scale = nn.Parameter(scale.detach().float().clone()) if scale is not None else None

    @property
    def bits(self) -> int:
        return ceil_log2(self.codebook.shape[0])

    def decode_weight(self) -> torch.Tensor:
        # F.embedding, not codebook[codes]: on the CPU the backward of advanced indexing
        # accumulates with parallel atomics (run-to-run different codebook gradients),
        # the embedding backward does not
        w = F.embedding(self.codes, self.codebook).reshape(self.codes.shape[0], -1)
        if self.scale is not None:
            w = w * self.scale[:, None]
        return w.reshape(self.op.weight_shape)

    def stored_extra(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        out = {"codes": (self.codes, Encoding.codes(self.bits)),
               "codebook": (self.codebook, Encoding.of(self.codebook_dtype))}
        if self.scale is not None:
            out["scale"] = (self.scale, Encoding.of(self.codebook_dtype))
        return out

    def spec_extra(self) -> dict[str, Any]:
        k, d = self.codebook.shape
        return {"k": k, "d": d, "scale": self.scale is not None,
                "codebook_dtype": self.codebook_dtype}

    @classmethod
    def _allocate(cls, op: OpSpec, has_bias: bool, extra: dict[str, Any]) -> PalettizedLayer:
        k, d = int(extra["k"]), int(extra["d"])
        if not 1 <= k <= 2**16 or d < 1:
            raise ValueError(f"codebook size k={k}, d={d} out of range")
        rows, row_len = op.weight_shape[0], math.prod(op.weight_shape[1:])
        if row_len % d:
            raise ValueError(f"d={d} does not divide the row length {row_len}")
        return cls(op, torch.zeros(rows) if has_bias else None,
                   torch.zeros(rows, row_len // d, dtype=torch.int64), torch.zeros(k, d),
                   torch.ones(rows) if extra.get("scale") else None,
                   str(extra.get("codebook_dtype", "float16")))

    def describe(self) -> str:
        k, d = self.codebook.shape
        used = int(torch.unique(self.codes).numel())
        return (f"{self.bits}-bit codes, k={k} d={d}, {used}/{k} codewords used"
                + (", per-channel scale" if self.scale is not None else ""))

    def validate(self) -> None:
        k = self.codebook.shape[0]
        if self.codes.numel() and (int(self.codes.min()) < 0 or int(self.codes.max()) >= k):
            raise FormatError(f"codes out of range: found {int(self.codes.max())}, "
                              f"codebook has {k} entries")
        if not all(torch.isfinite(t).all() for t, enc in self.stored().values()
                   if t.is_floating_point()):
            raise FormatError("non-finite values in a palettized layer")


def stored_modules(model: nn.Module) -> Iterator[tuple[str, StoredModule]]:
    """(qualified name, module) of every stored module: what `save` writes."""
    for name, module in model.named_modules():
        if isinstance(module, StoredModule):
            yield name, module


def compressed_layers(model: nn.Module) -> Iterator[tuple[str, CompressedLayer]]:
    """(qualified name, layer) of every compressed layer, outermost first."""
    for name, module in stored_modules(model):
        if isinstance(module, CompressedLayer):
            yield name, module


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
