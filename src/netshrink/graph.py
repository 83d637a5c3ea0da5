"""Which layers of a model get compressed, and why the others do not.

Every module with a `weight` Parameter of dim >= 2 is considered, whatever its class
(subclasses and foreign kinds included: the compressed layer runs the module's own
forward). Other parameters of dim >= 2 (e.g. nn.MultiheadAttention's packed
`in_proj_weight`) are kept dense and listed with that reason. A layer is compressed when its
type is supported by the method, it is selected (`layers=`), not excluded, has at least
`min_weights` weights, and its weight is not shared with another module (tied weights stay
dense, stored once). Each layer left out gets a reason that the report shows.

Per-layer overrides (as in coremltools: by module type, then by name pattern, the more
specific winning) give method options for matching layers; `None` keeps a layer dense. A
layer below `min_weights` is still compressed when an override gives it options.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .layers import out_axis_of, stored_modules

Selector = str | type | Callable[[str, nn.Module], bool]
Selection = Selector | Sequence[Selector] | None


@dataclass
class LayerRef:
    """A layer chosen for compression: its dotted name, module, and per-layer options."""

    name: str
    module: nn.Module
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return self.module.weight.numel()

    @property
    def out_axis(self) -> int:
        """The weight's output-channel axis: the `out_axis` override, else by layer kind."""
        return int(self.options.get("out_axis", out_axis_of(self.module)))

    def option(self, config: Any, key: str) -> Any:
        """A method option for this layer: the per-layer override, else the config's."""
        return self.options.get(key, getattr(config, key))


def _matches(sel: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    if isinstance(sel, type):
        return isinstance(module, sel)
    if callable(sel):
        return bool(sel(name, module))
    raise ConfigError(f"layer selector must be a name pattern, a module type or a "
                      f"callable(name, module), got {sel!r}")


def _any_match(selection: Selection, name: str, module: nn.Module) -> bool:
    if selection is None:
        return False
    sels = selection if isinstance(selection, (list, tuple)) else [selection]
    return any(_matches(s, name, module) for s in sels)


def override_for(overrides: Mapping[Any, Any] | None, name: str, module: nn.Module) -> Any:
    """Merged options for a layer: type entries first, then name patterns (which win).

    Returns None when a matching entry says to keep the layer dense, else a dict.
    """
    merged: dict[str, Any] = {}
    if not overrides:
        return merged
    keys = sorted(overrides, key=lambda k: 0 if isinstance(k, type) else 1)
    for key in keys:
        if _matches(key, name, module):
            value = overrides[key]
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise ConfigError(f"override for {key!r} must be a dict of options or None")
            merged.update(value)
    return merged


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own a weight of dim >= 2 (norm layers, with 1-D weights, are not),
    outside any already-compressed (stored) module."""
    done = {name for name, _ in stored_modules(model)}
    inside = tuple(name + "." for name in done)
    out = []
    for name, module in model.named_modules():
        if name in done or name.startswith(inside):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and name:
            out.append((name, module))
    return out


def weight_count(model: nn.Module) -> int:
    """Weights of a model: floating parameters of dim >= 2 outside stored modules, shared
    ones once (what `compressed share` is a share of)."""
    seen: set[int] = set()
    total = 0
    for _, p in other_weights(model, include_weight=True):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def other_weights(model: nn.Module, include_weight: bool = False
                  ) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of floating parameters of dim >= 2 outside stored
    modules that are not a module's `weight` (all of them with include_weight)."""
    done = tuple(name + "." for name, _ in stored_modules(model))
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(done) or p.dim() < 2 or not p.is_floating_point():
            continue
        if include_weight or name.rpartition(".")[2] != "weight":
            out.append((name, p))
    return out


def select_layers(
    model: nn.Module,
    supports: Callable[[nn.Module], str | None],
    *,
    layers: Selection = None,
    exclude: Selection = None,
    min_weights: int = 1024,
    overrides: Mapping[Any, Any] | None = None,
) -> tuple[list[LayerRef], dict[str, str]]:
    """Split the model's weight layers into those to compress and those kept (reason).

    supports(module) returns None when the method can compress the module, else why not.
    Other parameters of dim >= 2 are listed under their own qualified name.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    chosen: list[LayerRef] = []
    skipped: dict[str, str] = {}
    for name, module in weight_layers(model):
        if layers is not None and not _any_match(layers, name, module):
            skipped[name] = "not selected"
            continue
        if _any_match(exclude, name, module):
            skipped[name] = "excluded"
            continue
        reason = supports(module)
        if reason is not None:
            skipped[name] = f"unsupported: {reason}"
            continue
        tied = [o for o in owners[id(module.weight)] if o != name]
        if tied:
            skipped[name] = f"weight tied with {', '.join(tied)} (kept dense, stored once)"
            continue
        options = override_for(overrides, name, module)
        if options is None:
            skipped[name] = "kept dense by override"
            continue
        if module.weight.numel() < min_weights and not options:
            skipped[name] = f"too small ({module.weight.numel()} < {min_weights} weights)"
            continue
        if "out_axis" in options and not (
                isinstance(options["out_axis"], int)
                and 0 <= options["out_axis"] < module.weight.dim()):
            raise ConfigError(f"layer {name}: out_axis must be an axis of its weight "
                              f"{tuple(module.weight.shape)}, got {options['out_axis']!r}")
        chosen.append(LayerRef(name, module, options))
    hosts = {ref.name for ref in chosen}
    for pname, _ in other_weights(model):
        owner = pname.rpartition(".")[0]
        if owner in hosts:
            skipped[pname] = (f"kept dense: a parameter of compressed layer {owner} "
                              "besides its weight")
        else:
            skipped[pname] = ("unsupported: only parameters named 'weight' are compressed "
                              "(kept dense)")
    return chosen, skipped
