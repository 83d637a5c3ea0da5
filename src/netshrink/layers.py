"""Compressed layers: small stored tensors plus a decode, as ordinary nn.Modules.

A `CompressedLayer` (a `StoredModule`) replaces one module whose `forward` uses its own
`weight` Parameter: nn.Linear / Conv / Embedding, but also their subclasses and foreign
kinds (EfficientNet's same-padding convs, GPT-2's transposed `Conv1D`, LoRA-style wrappers).
The original module is kept as `host`, without its weight; the layer runs the host's own
`forward` with the decoded weight (`torch.func.functional_call`; plain nn.Linear and
nn.ConvNd take a direct call, which is measurably cheaper: `benchmarks/layer_call.py`).
So everything a module does besides holding its weight (padding, transposition, bias,
extra adapters) keeps working, and the host's other tensors are stored at their dtype.

Every stored module declares the tensors it stores and their encodings in `stored()`; size
accounting (`size.py`), the file format (`fileformat.py`) and the report all read that one
declaration. `spec()` is the JSON that rebuilds an empty layer around the host taken from
`model_like` (`from_spec`); `load_stored()` then fills it. A `StoredModule` with
`attached = True` is a representation shared by several layers (SMH), added to the model
rather than replacing a layer.

`PalettizedLayer` is the deployable form shared by the palette methods (k-means, DKM after
snapping, PQF): each output row of the weight (see `out_axis_of`) is cut into d-dimensional
subvectors, and each subvector is an index into a per-layer codebook of k codewords,
optionally times a per-output-channel scale (`channel_scales`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .encoding import Encoding, ceil_log2, dtype_name
from .errors import FormatError

LAYER_KINDS: dict[str, type[StoredModule]] = {}

_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


# ---------------------------------------------------------------------------------------
# Layer kinds: which weight axis is the output channel


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 family): a linear layer whose weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def out_axis_of(module: nn.Module) -> int:
    """The axis of `module.weight` that indexes output channels (per-channel scales, PQF
    rows and ALDS's folding all read rows along it):

    | kind                                                    | weight shape        | axis |
    |---------------------------------------------------------|---------------------|------|
    | nn.Linear and subclasses (NonDynamicallyQuantizable...) | (out, in)           | 0    |
    | nn.Conv1d/2d/3d and subclasses (same-padding convs)     | (out, in/g, *k)     | 0    |
    | nn.ConvTranspose1d/2d/3d                                | (in, out/g, *k)     | 1    |
    | transformers' Conv1D (GPT-2)                            | (in, out)           | 1    |
    | nn.Embedding                                            | (tokens, dim)       | 0    |
    | anything else                                           | -                   | 0    |

    For unknown kinds, override per layer: `overrides={"name": {"out_axis": 1}}`.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd) or is_gpt2_conv1d(module):
        return 1
    return 0


def weight_rows(weight: torch.Tensor, out_axis: int) -> torch.Tensor:
    """The weight as (output channels, everything else): row i holds output channel i's
    weights in the order of the remaining axes (C_in-major, then kh, kw for convs)."""
    return weight.movedim(out_axis, 0).reshape(weight.shape[out_axis], -1)


def rows_to_weight(rows: torch.Tensor, shape: tuple[int, ...], out_axis: int) -> torch.Tensor:
    """Inverse of `weight_rows`: back to the weight's own shape."""
    moved = (shape[out_axis],) + tuple(s for i, s in enumerate(shape) if i != out_axis)
    return rows.reshape(moved).movedim(0, out_axis)


def channel_scales(rows: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale max|w|, rounded to its storage dtype, and the rows divided by it.

    Finite by construction: a scale above the dtype's range is clamped to its largest
    value; a row whose scale rounds to zero (all zero, or max |w| below the dtype's
    smallest subnormal, as in EfficientNet-Lite0's dead channels) gets scale 0 and
    normalised values 0, so it decodes to exact zeros. Returns (scale (rows,) fp32 holding
    exactly the stored values, normalised rows fp32).
    """
    rows = rows.float()
    tdtype = getattr(torch, dtype)
    top = torch.finfo(tdtype).max
    scale = rows.abs().amax(1).clamp_max(top).to(tdtype).float()
    live = scale > 0
    normalised = torch.where(live[:, None], rows / torch.where(live, scale, 1.0)[:, None],
                             torch.zeros_like(rows))
    return scale, normalised


def compressible(module: nn.Module) -> str | None:
    """None when `module.weight` can be replaced by a decoded tensor, else why not."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
        return "no weight Parameter of 2 or more dimensions"
    if not weight.is_floating_point():
        return f"weight dtype {dtype_name(weight.dtype)} is not floating point"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "Embedding with max_norm rewrites its weight in forward"
    if hasattr(module, "parametrizations"):
        return "the weight is already parametrized (torch.nn.utils.parametrize)"
    return None


def planned_spec(kind: str, module: nn.Module, out_axis: int, **extra: Any) -> dict[str, Any]:
    """The `spec()` a `CompressedLayer` of `kind` around `module` will have, before it is
    built: what a method's plan records for each layer (`extra` is its `spec_extra`)."""
    weight = module.weight
    return {"kind": kind, "host": type_name(module), "weight_shape": list(weight.shape),
            "weight_dtype": dtype_name(weight.dtype), "out_axis": int(out_axis), **extra}


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are on the meta device: same
    structure, types, shapes, dtypes and tying, no memory. For building what a plan will
    store without touching (or copying) the real weights."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(
                t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def register_layer(cls: type[StoredModule]) -> type[StoredModule]:
    """Class decorator: make a stored module kind loadable from files."""
    LAYER_KINDS[cls.kind] = cls
    return cls


def type_name(module: nn.Module) -> str:
    """'package.module.Class' of a module: what a file records about a layer's host."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


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
    def _build(cls, spec: dict[str, Any], target: nn.Module | None) -> StoredModule:
        """An empty module (right shapes, any values) for `spec`; raises on bad settings.

        `target` is the model's module this one replaces (None for attached modules).
        The loader calls this under `torch.device("meta")`: shapes only, no memory.
        """
        raise NotImplementedError

    @staticmethod
    def from_spec(spec: Any, target: nn.Module | None = None) -> StoredModule:
        """Rebuild an empty module from `spec()` output; FormatError on a bad spec."""
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in LAYER_KINDS:
            raise FormatError(f"unknown compressed layer kind {kind!r} "
                              f"(known: {', '.join(sorted(LAYER_KINDS))})")
        try:
            return LAYER_KINDS[kind]._build(spec, target)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"invalid settings for a {kind} layer: {e}") from None

    def validate(self) -> None:
        """Check loaded values; raise FormatError otherwise. The default rejects any
        non-finite stored float (what `save` and `load` both refuse)."""
        for name, (t, _) in self.stored().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"non-finite values in stored tensor {name!r} of a "
                                  f"{self.kind} layer")

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
    """Base of every compressed layer: the host module without its weight, and a decoder.

    Built from a module that still has its `weight`; the weight is removed from the host
    (its shape, dtype and output axis are kept). `forward` runs the host's own forward with
    the decoded weight cast to the weight's dtype (which follows `.to()`). Attributes the
    layer lacks are read from the host (`layer.bias`, `layer.in_features`), and
    `layer.weight` is the decoded weight, so parents that read `child.weight` (as
    nn.MultiheadAttention does with `out_proj`) keep working.

    Subclasses implement `decode_weight`, `stored_extra`, `spec_extra` and `_allocate`,
    and may override `forward` (e.g. factorised layers that run two smaller ops).
    """

    def __init__(self, module: nn.Module, out_axis: int | None = None) -> None:
        super().__init__()
        weight = module._parameters.get("weight")
        if weight is None:
            raise ValueError(f"{type(module).__name__} has no weight Parameter")
        self.weight_shape: tuple[int, ...] = tuple(weight.shape)
        axis = out_axis_of(module) if out_axis is None else int(out_axis)
        if not 0 <= axis < len(self.weight_shape):
            raise ValueError(f"out_axis {axis} out of range for weight {self.weight_shape}")
        self.out_axis = axis
        # zero-size: only its dtype matters; float buffers follow .to(dtype) / .half()
        self.register_buffer("_dtype_ref", torch.empty(0, dtype=weight.dtype,
                                                       device=weight.device), persistent=False)
        del module._parameters["weight"]
        self.host = module

    # -- what subclasses provide -----------------------------------------------------
    def decode_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (shape `weight_shape`)."""
        raise NotImplementedError

    def stored_extra(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        """The method's own stored tensors and encodings (the host's are added)."""
        raise NotImplementedError

    @classmethod
    def _allocate(cls, module: nn.Module, out_axis: int, extra: dict[str, Any]
                  ) -> CompressedLayer:
        """An empty layer around `module` (which still has a weight) for the settings
        `extra`; raises ValueError on settings that do not fit the weight."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return self._dtype_ref.dtype

    @property
    def n_rows(self) -> int:
        """Output channels (rows along `out_axis`)."""
        return self.weight_shape[self.out_axis]

    @property
    def row_len(self) -> int:
        return math.prod(self.weight_shape) // self.n_rows

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return call_with_weight(self.host, self.decode_weight().to(self.weight_dtype),
                                args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            host = self.__dict__.get("_modules", {}).get("host")
            if host is None or name.startswith("__"):
                raise
        if name == "weight":
            return self.decode_weight().to(self.weight_dtype)
        return getattr(host, name)

    def host_state(self) -> dict[str, torch.Tensor]:
        """The host's own tensors (bias, adapters, ...), outside nested stored modules."""
        nested = tuple(f"{n}." for n, m in self.host.named_modules()
                       if n and isinstance(m, StoredModule))
        return {k: v for k, v in self.host.state_dict(keep_vars=True).items()
                if not k.startswith(nested)}

    def stored(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        out = dict(self.stored_extra())
        for name, t in self.host_state().items():
            out[f"host.{name}"] = (t, Encoding.of(t.dtype))
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "host": type_name(self.host),
                "weight_shape": list(self.weight_shape),
                "weight_dtype": dtype_name(self.weight_dtype), "out_axis": self.out_axis,
                **self.spec_extra()}

    @classmethod
    def _build(cls, spec: dict[str, Any], target: nn.Module | None) -> CompressedLayer:
        if target is None:
            raise FormatError("a compressed layer needs the model's module it replaces")
        module = host_for_load(target)
        if type_name(module) != spec["host"]:
            raise FormatError(f"file layer wraps a {spec['host']}, the model has a "
                              f"{type_name(module)}: wrong architecture?")
        shape = tuple(int(s) for s in spec["weight_shape"])
        if tuple(module.weight.shape) != shape:
            raise FormatError(f"file has weight shape {shape}, the model has "
                              f"{tuple(module.weight.shape)}: wrong architecture?")
        extra = {k: v for k, v in spec.items()
                 if k not in ("kind", "host", "weight_shape", "weight_dtype", "out_axis")}
        return cls._allocate(module, int(spec["out_axis"]), extra)

    def extra_repr(self) -> str:
        return f"{type(self.host).__name__}, weight={self.weight_shape}"


def call_with_weight(host: nn.Module, weight: torch.Tensor, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """Run `host.forward` with `weight` in place of its weight Parameter."""
    forward = type(host).forward
    if len(args) == 1 and not kwargs:
        if forward is nn.Linear.forward:
            return F.linear(args[0], weight, host.bias)
        if forward in _CONV_FORWARDS:
            return host._conv_forward(args[0], weight, host.bias)
    return functional_call(host, {"weight": weight}, args, kwargs)


def host_for_load(target: nn.Module) -> nn.Module:
    """The module a loaded layer wraps: `target` itself, or, when `target` is already a
    compressed layer (model_like was compressed), its host given back a weight Parameter
    of the right shape and dtype on the meta device (its values come from the file)."""
    if not isinstance(target, CompressedLayer):
        return target
    host = copy.deepcopy(target.host)
    host.weight = nn.Parameter(torch.empty(target.weight_shape, dtype=target.weight_dtype,
                                           device="meta"))
    return host


@register_layer
class PalettizedLayer(CompressedLayer):
    """Weight = codebook[codes] (x per-row scale): palettization / product quantization.

    Rows are the weight's output channels (`out_axis_of`), each cut into subvectors of d
    consecutive entries (C_in-major, then kh, kw: PQF's layout, docs/methods/pqf.md#subvectors).
    codes:
    (rows, row_len / d) int32 buffer; codebook: (k, d) trainable (fp32 in memory, stored
    at `codebook_dtype`); scale: optional (rows,) trainable per-output-channel scale.
    Codes are stored bit-packed at ceil(log2 k) bits.
    """

    kind = "palette"

    def __init__(self, module: nn.Module, codes: torch.Tensor, codebook: torch.Tensor,
                 scale: torch.Tensor | None = None, codebook_dtype: str = "float16",
                 out_axis: int | None = None) -> None:
        super().__init__(module, out_axis)
        rows, row_len = self.n_rows, self.row_len
        k, d = codebook.shape
        if row_len % d or tuple(codes.shape) != (rows, row_len // d):
            raise ValueError(f"codes {tuple(codes.shape)} / codebook {tuple(codebook.shape)} "
                             f"do not fit weight {self.weight_shape}")
        if scale is not None and tuple(scale.shape) != (rows,):
            raise ValueError(f"scale must have shape ({rows},), got {tuple(scale.shape)}")
        Encoding.of(codebook_dtype)  # validates the name
        self.codebook_dtype = codebook_dtype
        self.register_buffer("codes", codes.detach().to(torch.int32).clone())
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
        return rows_to_weight(w, self.weight_shape, self.out_axis)

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
    def _allocate(cls, module: nn.Module, out_axis: int, extra: dict[str, Any]
                  ) -> PalettizedLayer:
        k, d = int(extra["k"]), int(extra["d"])
        shape = tuple(module.weight.shape)
        rows = shape[out_axis]
        row_len = math.prod(shape) // rows
        if not 1 <= k <= 2**16 or not 1 <= d <= row_len or row_len % d:
            raise ValueError(f"codebook size k={k}, d={d} does not fit rows of {row_len}")
        return cls(module, torch.zeros(rows, row_len // d, dtype=torch.int32),
                   torch.zeros(k, d), torch.ones(rows) if extra.get("scale") else None,
                   str(extra.get("codebook_dtype", "float16")), out_axis)

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
        super().validate()


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
