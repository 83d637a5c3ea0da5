"""Channel groups of a model torch.fx cannot trace as a whole, from its traceable parts.

A Hugging Face transformer does not trace (keyword-only wrappers, tuple arguments,
data-dependent branches); its children with at least two weight layers are traced one by
one (recursively where a child fails too) with `groups._Walker`, their inputs and outputs
blocked like a model's, so permuting the channels found inside a part leaves the part's
function, hence the model's, unchanged (groups.py's docstring).
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import torch
from torch import nn

from .groups import Analysis, Group, _failure, _parameter_owners, _Tracer, _Walker

logger = logging.getLogger(__name__)


def _sentence(reason: str) -> str:
    """The first sentence of a failure (torch.fx's hints run on for lines)."""
    head, dot, _ = reason.partition(". ")
    return head + ("." if dot else "")


def _weight_layers(module: nn.Module) -> int:
    """Modules under `module` (itself included) that own a weight of dim >= 2."""
    return sum(1 for m in module.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2)


def analyse_parts(model: nn.Module, reason: str) -> Analysis:
    """Groups of an untraceable model from its traceable parts (module docstring): depth
    first over children in module order, a child with two or more weight layers is traced
    on its own, or, where that fails, its children are. A module reachable under two names
    is skipped (its channels are not followed)."""
    owners = _parameter_owners(model)
    names: dict[int, int] = Counter(id(m) for _, m in model.named_modules(
        remove_duplicate=False))
    groups: list[Group] = []
    blocked: list[str] = []
    parts: list[str] = []
    failed: list[tuple[str, nn.Module, str]] = []  # (name, module, why) of untraced ones
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, parent = stack.pop()
        todo = []
        for child_name, child in parent.named_children():
            name = prefix + child_name
            if _weight_layers(child) < 2:
                continue  # one weight layer has no channels of its own to couple
            if names[id(child)] > 1:
                blocked.append(f"{name}: module reachable under {names[id(child)]} names")
                continue
            try:
                graph = _Tracer().trace(child)
            except Exception as e:  # noqa: BLE001
                failed.append((name, child, _failure(e)))
                todo.append((name + ".", child))
                continue
            part = _Walker(child, prefix=name + ".", owners=owners).run(graph)
            parts.append(name)
            groups += part.groups
            blocked += part.blocked
        stack.extend(reversed(todo))  # depth first, in module order
    if not parts:
        return Analysis([], [], traced=False, reason=reason)
    # modules whose own weight layers (direct children) no traced part covers
    uncovered = [(name, _sentence(why)) for name, module, why in failed
                 if any(_weight_layers(c) == 1 for c in module.children())]
    head = (f"{type(model).__name__} as a whole: torch.fx cannot trace it ({reason}); "
            f"channel groups are taken from {len(parts)} traced parts ("
            + ", ".join(_collapse(parts)) + "), whose inputs and outputs keep their order")
    lines = [head] + [f"{n}: not traceable ({why})" for n, why in _collapse_pairs(uncovered)]
    lines += [f"{n}: {why}" for n, why in _collapse_pairs(
        [tuple(b.split(": ", 1)) if ": " in b else (b, "") for b in blocked])]
    logger.info("permutation: %d channel groups from %d traced parts of %s", len(groups),
                len(parts), type(model).__name__)
    return Analysis(groups, lines, traced=True, reason=reason, parts=parts)


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _collapse(names: list[str]) -> list[str]:
    """Names with their numeric indices (model.layers.3.mlp) folded into patterns
    (model.layers.*.mlp), with a count where several fold into one; first-seen order."""
    counts = Counter(_pattern(n) for n in names)
    return [p + (f" (x{c})" if c > 1 else "") for p, c in counts.items()]


def _collapse_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, reason) pairs folded like `_collapse`, per reason."""
    counts = Counter((_pattern(n), why) for n, why in pairs)
    return [(p + (f" (x{c})" if c > 1 else ""), why) for (p, why), c in counts.items()]
