"""Per-layer input second moments H = sum x x^T, captured with forward hooks.

The x of a layer is what its weight multiplies: the rows of the input for nn.Linear and
GPT-2's `Conv1D` (x @ W with W (in, out)), the receptive fields for Conv1d/Conv2d
(`F.unfold`, in the weight's (C_in, kh, kw) order, after any padding the layer applies,
whatever its padding mode or a same-padding subclass does), one H per group for grouped
and depthwise convolutions (shared by the group's output channels). To get exactly that
input whatever the layer's `forward` does, the hook runs the host's forward once more with
a probe weight under a `TorchFunctionMode` that records the call which receives the probe
(`F.linear`, `torch.addmm`, `F.conv1d`, `F.conv2d`). Other kinds (embeddings, transposed
or 3-D convolutions) are "not applicable".

`capture` accumulates H (float64, summed over calibration samples) for a group of layers
in one pass over the calibration inputs; `plan_groups` cuts the layers, in the order the
model runs them, into groups whose H fit `memory_mb` (GPTQ's sequential capture: the
caller encodes a group before capturing the next one from the partly encoded model). A
pass stops early, once the group's last layer has run, when every layer runs once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from .errors import DataError
from .layers import CompressedLayer, call_with_weight

_CONVS = {torch.conv1d: 1, torch.conv2d: 2}
_PLAIN_CONVS = {nn.Conv1d.forward: 1, nn.Conv2d.forward: 2}
_UNFOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class OpCall:
    """How a layer's weight met its input: kind 'linear' or 'conv' (with the conv's
    settings, 2-D form), the input tensor, and the weight's row layout."""

    kind: str
    x: torch.Tensor
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


class _Finder(TorchFunctionMode):
    """Records the first torch call that receives `probe` as its weight."""

    def __init__(self, probe: torch.Tensor) -> None:
        super().__init__()
        self.probe = probe
        self.found: OpCall | None = None
        self.other = False

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.found is None and not self.other:
            self._match(func, args, kwargs)
        return func(*args, **kwargs)

    def _match(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        uses = [i for i, a in enumerate(args) if a is self.probe] + [
            k for k, v in kwargs.items() if v is self.probe]
        if not uses:
            return
        if func is F.linear and uses == [1]:
            self.found = OpCall("linear", args[0])
        elif func is torch.addmm and uses == [2] and not kwargs:
            self.found = OpCall("linear", args[1])
        elif func in _CONVS and uses == [1]:
            dims = _CONVS[func]
            names = ("bias", "stride", "padding", "dilation", "groups")
            given = dict(zip(names, args[2:])) | kwargs
            self.found = _conv_call(args[0], self.probe, dims, given)
        else:
            self.other = True


def _pair(v: Any, dims: int, fill: int) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    return (fill, *v) if dims == 1 else (v[0], v[1])


def _conv_call(x: torch.Tensor, weight: torch.Tensor, dims: int, given: dict[str, Any]
               ) -> OpCall:
    padding = given.get("padding", 0)
    if dims == 1:
        x = x.unsqueeze(-2)
    kernel = (1, weight.shape[-1]) if dims == 1 else (weight.shape[-2], weight.shape[-1])
    if not isinstance(padding, str):
        padding = _pair(padding, dims, 0)
    return OpCall("conv", x, kernel, _pair(given.get("stride", 1), dims, 1), padding,
                  _pair(given.get("dilation", 1), dims, 1), int(given.get("groups", 1)))


def op_call(layer: CompressedLayer, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> OpCall | None:
    """How the layer's weight meets its input in one call (None: not as a linear or
    1-D/2-D convolution weight). Plain nn.Linear and zero-padded nn.Conv1d/2d are read
    from their settings; any other host runs once more with a probe weight."""
    host = layer.host
    forward = type(host).forward
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        if forward is nn.Linear.forward:
            return OpCall("linear", args[0])
        if forward in _PLAIN_CONVS and host.padding_mode == "zeros":
            dims = _PLAIN_CONVS[forward]
            return _conv_call(args[0], layer.decode_weight(), dims,
                              {"stride": host.stride, "padding": host.padding,
                               "dilation": host.dilation, "groups": host.groups})
    probe = layer.decode_weight().to(layer.weight_dtype)
    finder = _Finder(probe)
    with finder, torch.no_grad():
        call_with_weight(host, probe, args, kwargs)
    return None if finder.other else finder.found


def shape_of(call: OpCall, weight_shape: Sequence[int], out_axis: int) -> tuple[int, int]:
    """(groups G, columns n) of the H of a call: n is the weight's row length."""
    rows = weight_shape[out_axis]
    n = math.prod(weight_shape) // rows
    return (call.groups if call.kind == "conv" else 1), n


def gram(call: OpCall) -> torch.Tensor:
    """sum over the call's input vectors x of x x^T, per group: (G, n, n) float64."""
    x = call.x.detach()
    x = x.float() if x.dtype != torch.float64 else x
    if call.kind == "linear":
        flat = x.reshape(-1, x.shape[-1])
        return (flat.T @ flat).double()[None]
    if isinstance(call.padding, str):
        pad = (0, 0) if call.padding == "valid" else None
        if pad is None:  # 'same' (stride 1): the total padding dilation (k - 1), left half
            sizes = [d * (k - 1) for d, k in zip(call.dilation, call.kernel)]
            x = F.pad(x, (sizes[1] // 2, sizes[1] - sizes[1] // 2,
                          sizes[0] // 2, sizes[0] - sizes[0] // 2))
            pad = (0, 0)
    else:
        pad = call.padding
    n_img, channels = x.shape[0], x.shape[1]
    g = call.groups
    per = channels // g * call.kernel[0] * call.kernel[1]
    out = torch.zeros(g, per, per, dtype=torch.float64, device=x.device)
    pointwise = call.kernel == (1, 1) and call.stride == (1, 1) and tuple(pad) == (0, 0)
    size = math.prod(x.shape[1:]) * call.kernel[0] * call.kernel[1] * 4
    step = max(1, _UNFOLD_BYTES // max(size, 1))
    for a in range(0, n_img, step):
        part = x[a:a + step]
        if pointwise:
            cols = part.reshape(part.shape[0], channels, -1)
        else:
            cols = F.unfold(part, call.kernel, call.dilation, pad, call.stride)
        cols = cols.reshape(cols.shape[0], g, per, -1).permute(1, 2, 0, 3).reshape(g, per, -1)
        out += (cols @ cols.transpose(1, 2)).double()
    return out


def vectors(call: OpCall) -> int:
    """How many input vectors x the call's weight multiplies (rows for a linear layer,
    batch x output positions for a conv): the samples behind one call's H."""
    x = call.x
    if call.kind == "linear":
        return x.numel() // max(1, x.shape[-1])
    if isinstance(call.padding, str):
        if call.padding == "same":
            return x.shape[0] * math.prod(x.shape[2:])
        pad: Sequence[int] = (0, 0)
    else:
        pad = call.padding
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
        x.shape[2:], pad, call.dilation, call.kernel, call.stride)]
    return x.shape[0] * math.prod(max(0, o) for o in out)


@dataclass
class Probe:
    """A layer seen in the trial pass: its place in the run order, calls per forward,
    and the (G, n) of its H; `reason` when H cannot be captured."""

    name: str
    order: int
    calls: int
    groups: int
    columns: int
    reason: str | None = None

    @property
    def h_bytes(self) -> int:
        return 8 * self.groups * self.columns * self.columns


class _Stop(Exception):
    """Raised by a hook to end a capture pass once the group's last layer has run."""


def trial(model: nn.Module, layers: dict[str, CompressedLayer], x: torch.Tensor
          ) -> dict[str, Probe]:
    """Run one input through the model, recording for each layer how its weight meets
    its input (`Probe`); layers the forward does not reach are absent."""
    seen: dict[str, Probe] = {}
    handles = []

    def hook(name: str, layer: CompressedLayer) -> Callable[..., None]:
        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in seen:
                seen[name].calls += 1
                return
            call = op_call(layer, args, kwargs)
            if call is None:
                seen[name] = Probe(name, len(seen), 1, 0, 0, "its weight is not used as a "
                                   "linear or 1-D/2-D convolution weight")
                return
            g, n = shape_of(call, layer.weight_shape, layer.out_axis)
            seen[name] = Probe(name, len(seen), 1, g, n)
        return pre

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(hook(name, layer), with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def plan_groups(probes: Sequence[Probe], memory_mb: float, max_layers: int | None
                ) -> list[list[Probe]]:
    """The layers in run order, cut into groups whose H together take at most
    `memory_mb` (a layer larger than that alone is a group of its own) and at most
    `max_layers` layers."""
    groups: list[list[Probe]] = []
    used = 0
    limit = memory_mb * 2**20
    for p in sorted(probes, key=lambda p: p.order):
        full = groups and (used + p.h_bytes > limit or (
            max_layers is not None and len(groups[-1]) >= max_layers))
        if not groups or full:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += p.h_bytes
    return groups


def capture(model: nn.Module, layers: dict[str, CompressedLayer], group: Sequence[Probe],
            inputs: Sequence[torch.Tensor], desc: str = "capture",
            counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """H (G, n, n) float64 of each layer of `group`, summed over `inputs` (batches) run
    through `model` (no gradients; the caller sets eval mode). `counts`, when given,
    receives the number of input vectors behind each H (`vectors`)."""
    hs = {p.name: torch.zeros(p.groups, p.columns, p.columns, dtype=torch.float64,
                              device=layers[p.name]._dtype_ref.device) for p in group}
    if counts is not None:
        counts.update({p.name: 0 for p in group})
    handles = []
    early = all(p.calls == 1 for p in group)
    shared: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    last = max(group, key=lambda p: p.order).name

    def hook(name: str, layer: CompressedLayer) -> Callable[..., Any]:
        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = op_call(layer, args, kwargs)
            if call is None:
                return
            # layers fed the same input tensor the same way (q, k, v) share its moment;
            # the cache holds the tensor itself, so its address cannot be reused meanwhile
            key = (call.x.data_ptr(), call.kind, call.kernel, call.stride, call.padding,
                   call.dilation, call.groups)
            hit = shared.get(key)
            if hit is not None and hit[0] is call.x:
                h = hit[1]
            else:
                h = gram(call)
                shared[key] = (call.x, h)
            if not bool(torch.isfinite(h).all()):
                raise DataError(f"non-finite activations at the input of {name!r} on the "
                                "calibration data")
            hs[name] += h
            if counts is not None:
                counts[name] += vectors(call)
            if early and name == last:
                raise _Stop
        return pre

    for p in group:
        handles.append(layers[p.name].register_forward_pre_hook(
            hook(p.name, layers[p.name]), with_kwargs=True))
    try:
        with torch.no_grad():
            for x in tqdm(inputs, desc=desc, unit="batch", disable=None, leave=False):
                shared.clear()
                try:
                    model(x)
                except _Stop:
                    pass
                shared.clear()
    finally:
        for h in handles:
            h.remove()
    return hs
