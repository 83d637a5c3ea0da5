"""Blocks of a model, as block-wise reconstruction (`reconstruct.py`) sees them.

BRECQ (Li et al., ICLR 2021, §3.2) reconstructs a network one *block* at a time: a residual
bottleneck or a transformer layer, the granularity that keeps the cross-layer dependencies
inside a block and drops those between blocks. This module
- finds the blocks (`find_blocks`): the children of a ModuleList / Sequential whose class
  repeats there (EfficientNet's `_blocks.N`, torchvision ResNet's `layerK.N`, a zoo
  ResNet-20's stages, HF `...layers.N` / `encoder.layer.N`), outermost first; without any,
  the top-level children that hold parameters;
- traces one forward pass (`trace`): the blocks' execution order, their positional and
  keyword arguments on that first call (attention masks, position embeddings,
  drop-connect rates: reused for every batch), whether each block's input is the previous
  block's output (then activations can be chained block to block without re-running the
  model), and which parameter-owning "units" run before the first block (the stem),
  after the last one (the head) or in between;
- runs the parts that are not modules: the stem (the model stopped at the first block's
  input, `run_stem`) and the head (the model with every block short-circuited to a given
  output, `run_head`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import StoredModule


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the rest is not needed)."""


def primary(out: Any) -> Tensor:
    """The tensor a block or model output stands for: itself, the first element of a tuple
    or list, `logits` (or the first tensor value) of a dict-like HF output."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out and isinstance(out["logits"], Tensor):
            return out["logits"]
        for value in out.values():
            if isinstance(value, Tensor):
                return value
    raise ConfigError(f"cannot find the output tensor in a {type(out).__name__}")


def with_primary(template: Any, value: Tensor) -> Any:
    """`template` (a block's output on the traced call) with `value` as its tensor."""
    if isinstance(template, Tensor):
        return value
    if isinstance(template, tuple):
        return (value, *template[1:])
    if isinstance(template, list):
        return [value, *template[1:]]
    raise ConfigError(f"cannot rebuild a block output of type {type(template).__name__}")


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks (outermost first), else its top-level children
    that hold parameters. A block is a child of a ModuleList / Sequential whose class occurs
    at least twice among that container's children and that has submodules itself."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, StoredModule) or any(
                name == b or name.startswith(b + ".") for b in found):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        counts = Counter(type(c) for _, c in children)
        for child_name, child in children:
            if (counts[type(child)] >= 2 and not isinstance(child, StoredModule)
                    and any(True for _ in child.children())):
                found.append(f"{name}.{child_name}" if name else child_name)
    if found:
        return found
    return [n for n, c in model.named_children() if any(True for _ in c.parameters())]


def units(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter-owning units: non-attached stored modules (whose stored tensors are
    trained as one) and modules with parameters of their own outside stored modules."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, StoredModule):
            inside.append(name)
            if not module.attached:
                out[name] = module
        elif any(True for _ in module.parameters(recurse=False)):
            out[name] = module
    return out


def owner(name: str, blocks: list[str]) -> str | None:
    """The block that contains module `name`, if any."""
    for b in blocks:
        if name == b or name.startswith(b + "."):
            return b
    return None


@dataclass
class Trace:
    """What one traced forward pass (the first batch) says about the blocks."""

    order: list[str]                             # blocks in execution order
    extras: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]  # args[1:], kwargs
    templates: dict[str, Any]                    # each block's output (first batch)
    in_bytes: dict[str, int]                     # primary input bytes per sample
    out_bytes: dict[str, int]                    # primary output bytes per sample
    chained: bool                                # block i+1's input is block i's output
    stem: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    between: list[str] = field(default_factory=list)
    output: Any = None                           # the model's output on the batch


def _per_sample(t: Tensor) -> int:
    return t.element_size() * t[0].numel() if t.dim() else t.element_size()


def trace(model: nn.Module, blocks: list[str], x: Tensor) -> Trace:
    """Run `model(x)` once (no grad) with hooks on the blocks and units; see `Trace`.
    ConfigError when a block does not run, runs more than once, or takes no tensor."""
    mods = {b: model.get_submodule(b) for b in blocks}
    step = [0]
    calls: dict[str, list[int]] = {b: [] for b in blocks}
    ends: dict[str, int] = {}
    first_call: dict[str, int] = {}
    inputs: dict[str, Any] = {}
    extras: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    outputs: dict[str, Any] = {}
    handles = []

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step[0] += 1
            calls[name].append(step[0])
            if not args or not isinstance(args[0], Tensor):
                raise ConfigError(f"block {name!r} takes no positional tensor input; "
                                  "choose other blocks (Reconstruct.blocks)")
            inputs[name], extras[name] = args[0], (tuple(args[1:]), dict(kwargs))
        return hook

    def post(name: str):
        def hook(_m: nn.Module, _a: Any, _k: Any, out: Any) -> None:
            step[0] += 1
            ends[name] = step[0]
            outputs[name] = out
        return hook

    def unit_pre(name: str):
        def hook(_m: nn.Module, _a: Any) -> None:
            step[0] += 1
            first_call.setdefault(name, step[0])
        return hook

    for b, m in mods.items():
        handles.append(m.register_forward_pre_hook(pre(b), with_kwargs=True))
        handles.append(m.register_forward_hook(post(b), with_kwargs=True))
    for u, m in units(model).items():
        if owner(u, blocks) is None:
            handles.append(m.register_forward_pre_hook(unit_pre(u)))
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for h in handles:
            h.remove()
    for b in blocks:
        if len(calls[b]) != 1:
            raise ConfigError(f"block {b!r} ran {len(calls[b])} times in one forward pass "
                              "(each block must run exactly once); set Reconstruct.blocks")
    order = sorted(blocks, key=lambda b: calls[b][0])
    chained = all(inputs[b] is primary(outputs[a]) for a, b in zip(order, order[1:]))
    start, end = calls[order[0]][0], ends[order[-1]]
    result = Trace(order, extras, outputs, {b: _per_sample(inputs[b]) for b in order},
                   {b: _per_sample(primary(outputs[b])) for b in order}, chained,
                   output=output)
    for u, s in sorted(first_call.items(), key=lambda kv: kv[1]):
        (result.stem if s < start else result.head if s > end else result.between).append(u)
    return result


@contextlib.contextmanager
def _hooked(module: nn.Module, hook: Any, kind: str) -> Iterator[None]:
    handle = (module.register_forward_pre_hook(hook, with_kwargs=True) if kind == "pre"
              else module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        handle.remove()


def block_input(model: nn.Module, block: str, x: Tensor
                ) -> tuple[Tensor, tuple[Any, ...], dict[str, Any]]:
    """(primary input, other args, kwargs) of `block` when `model` runs on `x`; the model
    stops there. Gradients flow if enabled (the stem is trained through this)."""
    return _run_until(model, block, x, "pre",
                      lambda args, kwargs, _out: (args[0], tuple(args[1:]), dict(kwargs)))


def block_output(model: nn.Module, block: str, x: Tensor) -> Tensor:
    """The primary output of `block` when `model` runs on `x`; the model stops there."""
    return _run_until(model, block, x, "post", lambda _args, _kwargs, out: primary(out))


def _run_until(model: nn.Module, block: str, x: Tensor, kind: str, take: Any) -> Any:
    """Run `model` on `x` until `block` is called ("pre") or returns ("post"), and return
    `take(args, kwargs, output)` there; the rest of the model does not run."""
    got: list[Any] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             out: Any = None) -> None:
        got.append(take(args, kwargs, out))
        raise _Stop

    with _hooked(model.get_submodule(block), hook, kind):
        try:
            model(x)
        except _Stop:
            pass
    if not got:
        raise ConfigError(f"block {block!r} did not run")
    return got[0]


def run_head(model: nn.Module, blocks: list[str], value: Any, x: Tensor) -> Tensor:
    """The model's output when every block returns `value` (the last block's output, in
    its own structure): the head computed from a given last-block output. The stem still
    runs on `x` (its result is unused)."""
    mods = [model.get_submodule(b) for b in blocks]
    for m in mods:
        m.forward = lambda *_a, **_k: value  # instance attribute shadows the method
    try:
        return primary(model(x))
    finally:
        for m in mods:
            del m.forward
