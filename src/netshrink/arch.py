"""Named architectures, so that a .nsk file can say what to rebuild and `load` needs no
`model_like`.

A provider module registers a factory under a name when it is imported; the experiment
zoo does this for its models (``import netshrink_lab.zoo``), and any package can do the same:

    register_arch("mynet", mynet)        # the provider is mynet.__module__
    model = create_arch("mynet", width=2)

`create_arch` binds the arguments to the factory's signature and records all of them,
defaults included, as JSON values on the model (``model.netshrink_arch``:
``{"name", "kwargs"}``); `arch_of` reads that record back. `netshrink.save` writes it into
the file together with the provider module (`arch_record`). `netshrink.load` without
`model_like` rebuilds the model only from a registered name: it never imports a module a
file names, and for a name nobody registered it raises ConfigError saying which module to
import first.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError

__all__ = [
    "ARCH_ATTR",
    "ArchEntry",
    "ArchFamily",
    "arch_entry",
    "arch_of",
    "arch_record",
    "create_arch",
    "family_of",
    "register_arch",
    "register_family",
    "registered_archs",
    "unregistered_message",
]

ARCH_ATTR = "netshrink_arch"
"""The attribute `create_arch` sets on the models it builds."""

LEGACY_MODULE = "netshrink_lab.zoo"
"""Where the architectures of files without a "module" in their arch record come from:
before the registry, only the zoo (then ``netshrink.zoo``) named architectures."""

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class ArchEntry:
    """A registered architecture: its name, the factory and the module that registered it."""

    name: str
    factory: Callable[..., nn.Module]
    module: str


@dataclass(frozen=True)
class ArchFamily:
    """A family of architectures named "PREFIX:REST": ``factory(REST, **kwargs)`` builds
    one. ``rebuild=False``: `load` never builds it from a file's record (user code)."""

    prefix: str
    factory: Callable[..., nn.Module]
    module: str
    rebuild: bool = True


_REGISTRY: dict[str, ArchEntry] = {}
_FAMILIES: dict[str, ArchFamily] = {}
_PREFIX = re.compile(r"[a-z][a-z0-9_-]*")


def register_family(prefix: str, factory: Callable[..., nn.Module], *,
                    module: str | None = None, rebuild: bool = True) -> None:
    """Register a family: every name "prefix:REST" is built by ``factory(REST, **kwargs)``.
    Registering a prefix again from the same module replaces it; from another, ConfigError."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"a family prefix must be a lower-case word, got {prefix!r}")
    module = _provider(f"family {prefix!r}", factory, module, _FAMILIES.get(prefix))
    _FAMILIES[prefix] = ArchFamily(prefix, factory, module, rebuild)


def _provider(what: str, factory: Callable[..., nn.Module], module: str | None,
              registered: ArchEntry | ArchFamily | None) -> str:
    """The module that provides `what` (``factory.__module__`` unless given), checked to be
    a dotted module name and not to take over what another module registered."""
    module = module if module is not None else getattr(factory, "__module__", None)
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
        raise ConfigError(f"{what}: module must be a dotted module name, got {module!r}")
    if registered is not None and registered.module != module:
        raise ConfigError(f"{what} is already registered by {registered.module}")
    return module


def family_of(name: str) -> tuple[ArchFamily, str] | None:
    """(family, REST) of a "PREFIX:REST" name whose prefix is a registered family."""
    prefix, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    family = _FAMILIES.get(prefix) if sep else None
    return (family, rest) if family is not None and rest else None


def register_arch(name: str, factory: Callable[..., nn.Module], *,
                  module: str | None = None) -> None:
    """Register ``factory`` (keyword arguments -> nn.Module) under ``name``.

    ``module`` is the provider named in saved files and error messages; it defaults to
    ``factory.__module__``. Registering a name again from the same module replaces the
    entry (a reloaded module); from another module it raises ConfigError."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an architecture name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"the factory of architecture {name!r} is not callable: {factory!r}")
    module = _provider(f"architecture {name!r}", factory, module, _REGISTRY.get(name))
    _REGISTRY[name] = ArchEntry(name, factory, module)


def arch_entry(name: str) -> ArchEntry | None:
    """The registry entry of ``name`` (a registered name, or a member of a family that may
    be rebuilt), or None when no imported module registered it."""
    entry = _REGISTRY.get(name)
    if entry is None and (found := family_of(name)) is not None and found[0].rebuild:
        family, rest = found
        entry = ArchEntry(name, functools.partial(family.factory, rest), family.module)
    return entry


def registered_archs() -> list[str]:
    """Sorted names of the registered architectures."""
    return sorted(_REGISTRY)


def _plain(value: Any) -> Any:
    """Turn numpy/torch scalars into plain Python numbers so the record is JSON-clean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def create_arch(name: str, **kwargs: Any) -> nn.Module:
    """Build registered architecture ``name`` and record ``{"name", "kwargs"}`` on it.

    The record holds every argument, defaults included, so ``create_arch(**arch_of(model))``
    rebuilds the same architecture. An unregistered name, arguments the factory does not
    take or arguments that are not JSON values raise ConfigError."""
    entry = arch_entry(name)
    if entry is None:
        known = ", ".join(registered_archs()) or "none"
        raise ConfigError(f"unknown architecture {name!r}; registered: {known}")
    signature = inspect.signature(entry.factory)
    params = signature.parameters
    nested = kwargs.get("kwargs")
    flat = "kwargs" not in params or params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    if flat and isinstance(nested, dict) and set(kwargs) <= {"name", "kwargs"}:
        # the create_arch(**record) form
        kwargs = {**{k: v for k, v in kwargs.items() if k != "kwargs"}, **nested}
    try:
        bound = signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"bad arguments for architecture {name!r}: {exc}; accepted: {', '.join(params)}"
        ) from exc
    bound.apply_defaults()
    resolved = {}
    for k, v in bound.arguments.items():
        if params[k].kind is inspect.Parameter.VAR_KEYWORD:  # a family's **kwargs
            resolved.update({kk: _plain(vv) for kk, vv in v.items()})
        else:
            resolved[k] = _plain(v)
    try:
        json.dumps(resolved)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"arguments for architecture {name!r} must be JSON values: {exc}"
                          ) from exc
    model = entry.factory(**resolved)
    setattr(model, ARCH_ATTR, {"name": name, "kwargs": resolved})
    return model


def arch_of(model: nn.Module) -> dict | None:
    """A copy of the ``{"name", "kwargs"}`` record `create_arch` left on ``model``, or None."""
    arch = getattr(model, ARCH_ATTR, None)
    return copy.deepcopy(arch) if isinstance(arch, dict) else None


def arch_record(model: nn.Module) -> dict | None:
    """What a saved file stores: `arch_of(model)` plus ``"module"``, the module that
    registered the name (absent when the name is not registered in this process)."""
    arch = arch_of(model)
    if arch is None:
        return None
    name = arch.get("name")
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    found = family_of(name) if entry is None else None
    if entry is not None:
        arch["module"] = entry.module
    elif found is not None:
        arch["module"] = found[0].module
    return arch


def unregistered_message(record: dict) -> str:
    """The error for a file whose architecture is not registered: which module to import
    (the file's "module", or the zoo for files written before it was recorded)."""
    name = record.get("name")
    found = family_of(name) if isinstance(name, str) else None
    if found is not None and not found[0].rebuild:
        spec = found[1]
        args = "".join(f" --model-arg {k}={json.dumps(v)}"
                       for k, v in dict(record.get("kwargs") or {}).items())
        return (f"this file's model was built by {spec}; netshrink does not run code that a "
                f"file names: pass --model {spec}{args} (command line) or "
                f"model_like=netshrink.load_model({spec!r}, ...) (Python)")
    module = record.get("module", LEGACY_MODULE)
    if isinstance(module, str) and _MODULE_NAME.fullmatch(module):
        how = f"it is registered by {module}: import {module} first, or pass model_like"
    else:
        how = "import the module that registers it first, or pass model_like"
    return (f"this file's architecture {name!r} is not registered in this process; {how} "
            f"(an instance of the original model)")
