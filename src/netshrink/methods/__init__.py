"""The method registry: every compression method is one `Method` subclass in this folder.

A method says which layers it can compress (`supports`), turns the chosen layers into
compressed layers under a budget (`encode`), may hook into the shared fine-tuning loop
(`hooks`), and makes the final, deployable form (`finalize`). Tests loop over `methods()`.

What a method wants the report to say about one compress call (its choices, fallbacks,
costs) it returns from `prepare` / `encode` as `Notes`; `compress` stores them in the
model's `netshrink_info`, so they are saved in the file and shown by `netshrink.report`
and `netshrink inspect`. The registry holds one shared instance per method, so a method
keeps no per-call state on itself (a content-keyed cache of expensive results is fine).
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


class Method:
    """Base class of a compression method; subclasses set `name` and `config_cls`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    summary: ClassVar[str] = ""

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

    def prepare(self, model: nn.Module, layers: list[LayerRef], budget: Budget, config: Any,
                *, data: Any = None, seed: int = 0) -> Notes | None:
        """Change the model without changing its function before it is encoded (e.g. PQF's
        channel permutation); the per-layer statistics (SQNR) compare against the weights
        after this step. May return `Notes` for the report. Nothing by default."""

    def encode(self, model: nn.Module, layers: list[LayerRef], budget: Budget, config: Any,
               *, data: Any = None, seed: int = 0) -> Notes | None:
        """Replace the chosen layers of `model` (in place) with compressed layers; may return
        `Notes` for the report (None: nothing to add)."""
        raise NotImplementedError

    def hooks(self, model: nn.Module, config: Any) -> list[Any]:
        """Per-step hooks (netshrink.train.StepHook) for fine-tuning; none by default."""
        return []

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
