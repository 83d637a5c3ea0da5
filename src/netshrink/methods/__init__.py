"""The method registry, and the one shape every compression method has.

A method is a `Method` subclass registered under its name; tests loop over `methods()`.
`compress` drives every method through the same steps:

1. `supports(module)`: which layers it can compress (the others stay dense, with the
   reason in the report).
2. `survey(request)`: budget-independent measurements of the chosen layers, made once
   (ALDS's singular values, PQF's subvector statistics and channel groups). Optional.
3. `plan(request, survey, budget)`: cheap and pure. Per chosen layer, the stored form it
   will get (the `spec` of its compressed layer; absent: the layer stays dense), any shared
   stored module (SMH's bank), and the report's notes. `compress` builds what the plan
   will store on the meta device, counts its bits and its file header exactly, and plans
   again with the measured header until the file fits the target.
4. `prepare(model, plan, request)`: a function-preserving change before encoding (PQF's
   channel permutation); the report's SQNR compares against the weights after it.
5. `apply(model, plan, request)`: build the planned layers in place. Once.
6. fine-tuning (the shared loop), then `finalize(model, config)`: the deployable form.

Notes: what a method wants the report to say about one call (its choices, fallbacks,
costs) is `Notes`, saved in the file's manifest. The plan's notes are known at planning;
numbers only known after `prepare`/`apply` (PQF's log-det drop, DKM's temperatures) are
returned by those steps, and the plan carries a same-shaped placeholder (`Plan.expected`)
so that the header is measured before anything is applied. The registry holds one shared
instance per method: a method keeps no per-call state on itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..graph import LayerRef
from ..layers import stored_modules
from ..size import Budget

_REGISTRY: dict[str, Method] = {}


@dataclass
class Notes:
    """What one compress call reports beyond the per-layer rows.

    lines: human-readable sentences (`Report.notes`, one "note:" line each); facts: the
    same facts as a small JSON-able dict for programs (`netshrink_info["facts"]`);
    target: the budget actually used when the method's own option replaced compress's
    target (ALDS `keep_ratio`), shown as the report's target. All are saved in the file's
    manifest, whose size counts against the target: keep them short, and keep out
    anything that differs between identical runs (timings).
    """

    lines: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    target: str | None = None

    def add(self, other: Notes | None) -> Notes:
        """Append another `Notes` (None: nothing) in place; returns self."""
        if other is not None:
            self.lines.extend(other.lines)
            self.facts.update(other.facts)
            self.target = other.target or self.target
        return self


@dataclass
class Request:
    """What one compress call asks a method to do: the model being compressed (a copy of
    the user's), the chosen layers with their per-layer options, the method's config,
    the data given to compress (may be None) and the seed."""

    model: nn.Module
    layers: list[LayerRef]
    config: Any
    data: Any = None
    seed: int = 0


@dataclass
class Plan:
    """A method's plan for one call: exactly what will be stored.

    layers: chosen layer name -> the `spec()` its compressed layer will have (a chosen
    layer that is absent stays dense, as the plan decided); attached: name -> spec of a
    stored module shared by several layers, added to the model under that dotted name;
    notes: the report's notes known at planning; expected: placeholders for the notes that
    `prepare`/`apply` return (same shape, other numbers), used only to size the header;
    detail: whatever `apply` needs besides the specs (the method's own choices).
    """

    layers: dict[str, dict[str, Any]]
    attached: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: Notes = field(default_factory=Notes)
    expected: Notes = field(default_factory=Notes)
    detail: Any = None


class Method:
    """Base class of a compression method; subclasses set `name`, `config_cls`, `summary`
    and implement `supports`, `plan` and `apply` (see the module docstring)."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    summary: ClassVar[str] = ""
    calibrates: ClassVar[bool] = False
    """Whether `compress(calibrate="auto")` runs the calibration stage (calibrate.py) on
    this method's layers when data is given: true where they are scalar palettes."""

    def make_config(self, config: Any = None, **options: Any) -> Any:
        """The method's frozen config from an instance and/or keyword options."""
        if config is not None and not isinstance(config, self.config_cls):
            raise ConfigError(f"{self.name} expects a {self.config_cls.__name__}, "
                              f"got {type(config).__name__}")
        base = config if config is not None else self.config_cls()
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown option(s) for method {self.name!r}: "
                              f"{', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(base, **options) if options else base

    def supports(self, module: nn.Module) -> str | None:
        """None if this method can compress the module, else the reason it cannot."""
        raise NotImplementedError

    def survey(self, request: Request) -> Any:
        """Budget-independent measurements of the chosen layers, made once per call and
        handed to every `plan`. Nothing by default."""
        return None

    def plan(self, request: Request, survey: Any, budget: Budget) -> Plan:
        """The stored form of every chosen layer under `budget` (cheap, no side effects);
        raises InfeasibleTargetError / ConfigError when the target cannot be met."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, plan: Plan, request: Request) -> Notes | None:
        """Change `model` without changing its function before it is encoded; may return
        `Notes` (announced in `plan.expected`). Nothing by default."""

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> Notes | None:
        """Replace the planned layers of `model` (in place) by their compressed layers,
        exactly as `plan.layers` / `plan.attached` specify; may return `Notes`."""
        raise NotImplementedError

    def finalize(self, model: nn.Module, config: Any) -> None:
        """Make every stored module exactly what will be saved."""
        for _, layer in stored_modules(model):
            layer.finalize()


def register_method(method: Method) -> Method:
    """Add a method instance to the registry under its name."""
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods())}")
    return _REGISTRY[name]


def methods() -> list[str]:
    """Names of all registered methods."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from . import (  # noqa: F401  (each registers itself)
        alds,
        dkm,
        kmeans,
        pqf,
        smh,
    )
