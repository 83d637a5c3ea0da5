"""Targets, bit-exact size accounting and budgets: the one place that says how big things are.

Size is counted in bits of what is stored: every stored tensor's `Encoding`
(`encoding.py`) says how many. `model_bits` sums the declaration of a whole model, which is
exactly what the file writer (`fileformat.py`) writes, so the accounted size is the size on
disk. `Budget` turns a target into the bits the compressed layers may use, with one cost
rule for every target kind and every method.

"KB"/"MB"/"GB" are binary units (KiB/MiB/GiB), as in all four papers.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .encoding import DTYPE_BITS, Encoding, dtype_name
from .errors import ConfigError, InfeasibleTargetError
from .layers import stored_modules

# ---------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Target:
    """A compression target: whole-model bytes, a ratio against fp32, or bits per weight.

    kind "bytes": total stored size of the whole model; "ratio": fp32 size / stored size;
    "bits": average bits of the weight encoding (codes, factors, ...) per compressible
    weight; side information (codebooks, scales) is counted in the reported size.
    """

    kind: str
    value: float
    text: str

    def __str__(self) -> str:
        return self.text


_UNITS = {"b": 1, "": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20,
          "gb": 2**30, "gib": 2**30}


def parse_target(target: str | Target) -> Target:
    """Parse '1.5MB', '800KB', '12345B', 'x20' / '20x', '3bit' / '2.5bits' into a Target."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise ConfigError(f"target must be a string like '1.5MB', 'x20' or '3bit', got {target!r}")
    text = target.strip()
    low = text.lower().replace(" ", "")
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    if m := re.fullmatch(rf"x{number}|{number}x", low):
        value = float(m.group(1) or m.group(2))
        if value < 1:
            raise ConfigError(f"ratio target {text!r} must be at least x1")
        return Target("ratio", value, text)
    if m := re.fullmatch(rf"{number}(?:bit|bits)", low):
        value = float(m.group(1))
        if not 0 < value <= 32:
            raise ConfigError(f"bits target {text!r} must lie in (0, 32]")
        return Target("bits", value, text)
    if m := re.fullmatch(rf"{number}(b|kb|kib|mb|mib|gb|gib)", low):
        value = float(m.group(1)) * _UNITS[m.group(2)]
        if value <= 0:
            raise ConfigError(f"size target {text!r} must be positive")
        return Target("bytes", value, text)
    raise ConfigError(
        f"cannot parse target {text!r}: use a size ('1.5MB', '800KB'), a ratio ('x20') "
        "or bits per weight ('3bit')"
    )


# ---------------------------------------------------------------------------------------
# Accounting


def tensor_bits(tensor: torch.Tensor, encoding: Encoding | None = None) -> int:
    """Stored bits of one tensor (its own dtype unless an encoding is given)."""
    enc = encoding or Encoding.of(tensor.dtype)
    return enc.nbits(tensor.numel())


def with_aliases(named_tensors: Iterable[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """Each (name, tensor) with the name of the earlier tensor whose data it shares (tied
    weights), or None for the first holder: what is stored once and what is an alias."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in named_tensors:
        key = storage_key(t)
        yield name, t, first.get(key)
        first.setdefault(key, name)


def dense_bits(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Stored bits of plain tensors at their dtype; tensors sharing storage count once."""
    return sum(tensor_bits(t) for _, t, alias in with_aliases(named_tensors) if alias is None)


def storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Identity of a tensor's data (tied weights share it)."""
    if t.device.type == "meta":
        return (id(t), 0, tuple(t.shape))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def model_bits(model: nn.Module) -> int:
    """Stored bits of a (possibly compressed) model: what `netshrink.save` writes.

    Stored modules (compressed layers, shared representations) count what they declare
    in `stored()`; every other state-dict tensor counts at its dtype, shared tensors once.
    """
    comp = dict(stored_modules(model))
    total = sum(tensor_bits(t, enc) for layer in comp.values() for t, enc in
                layer.stored().values())
    total += dense_bits(dense_state(model, comp))
    return total


def dense_state(model: nn.Module, compressed: dict[str, nn.Module] | None = None
                ) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries that lie outside stored modules, in state-dict order."""
    from .layers import stored_modules

    comp = compressed if compressed is not None else dict(stored_modules(model))
    prefixes = tuple(name + "." for name in comp)
    return [(k, v) for k, v in model.state_dict(keep_vars=True).items()
            if not k.startswith(prefixes)]


def fp32_bits(model: nn.Module) -> int:
    """Bits of the model stored plainly with every floating tensor at fp32 (the baseline)."""
    return sum(t.numel() * (32 if t.is_floating_point() else DTYPE_BITS[dtype_name(t.dtype)])
               for _, t, alias in with_aliases(model.state_dict(keep_vars=True).items())
               if alias is None)


def format_bytes(n_bytes: float) -> str:
    """Human-readable binary size: '1.54 MiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


# ---------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Option:
    """One way to store one layer, as a planner offers it to `Budget.pick`.

    label: what the planner needs back (bits, a (d, k) choice, ...); stored_bits: every
    bit the layer stores except what the budget counts as fixed (its bias and other host
    tensors); code_bits: the weight encoding alone (codes, factors, hash variables),
    without side information (codebooks, scales); distortion: the planner's estimate of
    the squared weight error, in any unit shared by all options of one plan.
    """

    label: Any
    stored_bits: float
    code_bits: float
    distortion: float


@dataclass(frozen=True)
class Budget:
    """What a target means for the layers being compressed: the one cost rule.

    baseline_bits: the fp32 model; fixed_bits: everything left uncompressed (norms, biases
    kept dense, skipped layers); n_weights: weights of the layers to compress;
    header_bits: what the file's header and manifest take.

    - A size or ratio target bounds the whole file on disk: the compressed layers may store
      `file - header - fixed` bits, and an option costs everything it stores.
    - A bits target ("3bit") is the weight encoding per compressible weight: the layers
      may use `bits * n_weights`, and an option costs its code bits alone (codebooks and
      scales are side information, shown in the report but not charged).
    """

    target: Target
    baseline_bits: int
    fixed_bits: int
    n_weights: int
    header_bits: int = 0

    def file_bits(self) -> float | None:
        """The whole file's bit budget for size/ratio targets (None for a bits target)."""
        if self.target.kind == "bytes":
            return self.target.value * 8
        if self.target.kind == "ratio":
            return self.baseline_bits / self.target.value
        return None

    def available(self) -> float:
        """Bits the compressed layers may use, in the unit `cost` charges.

        Raises InfeasibleTargetError for a size or ratio target above the fp32 model.
        """
        file_bits = self.file_bits()
        if file_bits is None:
            return self.target.value * self.n_weights
        if file_bits > self.baseline_bits:
            raise InfeasibleTargetError(
                f"target {self.target} ({format_bytes(file_bits / 8)}) is larger than the "
                f"uncompressed fp32 model ({format_bytes(self.baseline_bits / 8)}): "
                "nothing to compress"
            )
        return file_bits - self.header_bits - self.fixed_bits

    def cost(self, stored_bits: float, code_bits: float) -> float:
        """What one option (or a whole plan) is charged: code bits for a bits target,
        everything stored otherwise (see the class docstring)."""
        return code_bits if self.target.kind == "bits" else stored_bits

    def cost_of(self, option: Option) -> float:
        return self.cost(option.stored_bits, option.code_bits)

    def infeasible(self, smallest: float, what: str) -> InfeasibleTargetError:
        """The error for a target below the smallest cost the method can reach
        (`smallest`, in `cost` units), with the feasible range. `what` names the smallest
        choice ("at the smallest allowed bit widths")."""
        if self.target.kind == "bits":
            per_weight = math.ceil(1000 * smallest / max(self.n_weights, 1)) / 1000
            return InfeasibleTargetError(
                f"target {self.target} cannot be met: the smallest options, {what}, take "
                f"{smallest / max(self.n_weights, 1):.3f} bits per weight",
                feasible=f"{per_weight}bit")
        lo = math.ceil((self.fixed_bits + smallest + self.header_bits) / 8)
        hi = self.baseline_bits // 8
        feasible = (f"{lo}B" if self.target.kind == "bytes"
                    else f"x{math.floor(100 * hi / lo) / 100}")
        return InfeasibleTargetError(
            f"target {self.target} cannot be met: the smallest file {what} takes "
            f"{format_bytes(lo)} (x{hi / lo:.1f}), of which {format_bytes(self.fixed_bits / 8)} "
            f"stays uncompressed and {format_bytes(self.header_bits / 8)} is the header; "
            f"feasible sizes lie in [{lo} B, {hi} B] (ratio x1 to x{hi / lo:.1f})",
            feasible=feasible)

    def pick(self, options: Sequence[Sequence[Option]], what: str) -> list[int]:
        """One option per layer: least total distortion with total cost <= `available()`
        (`allocate`); when even the smallest options do not fit, `infeasible`."""
        available = self.available()  # raises for a target above the fp32 model
        costs = [[(self.cost_of(o), o.distortion) for o in opts] for opts in options]
        try:
            return allocate(costs, available)
        except ValueError:
            smallest = sum(min(c for c, _ in layer) for layer in costs)
            raise self.infeasible(smallest, what) from None


def allocate(options: Sequence[Sequence[tuple[float, float]]], budget_bits: float
             ) -> list[int]:
    """Choose one (size, distortion) option per layer: least total distortion with total
    size <= budget; returns the index of each layer's choice.

    Greedy marginal analysis (multiple-choice knapsack, Lagrangian-style): start from every
    layer's smallest option and repeatedly take the upgrade with the largest distortion drop
    per extra bit that still fits. Optimal when distortion is convex in size, as it is for
    rate-distortion curves like D(b) ~ 2^(-2b). Raises ValueError if even the smallest
    options exceed the budget.
    """
    order = [sorted(range(len(opts)), key=lambda i: opts[i][0]) for opts in options]
    choice = [0] * len(options)
    used = sum(opts[o[0]][0] for opts, o in zip(options, order))
    if used > budget_bits:
        raise ValueError(f"smallest options need {used} bits > budget {budget_bits}")
    heap: list[tuple[float, int, int]] = []

    def push(layer: int) -> None:
        opts, pos = options[layer], choice[layer]
        size, distortion = opts[order[layer][pos]]
        best: tuple[float, int] | None = None
        for nxt in range(pos + 1, len(opts)):  # steepest next step (handles non-convexity)
            cand_size, cand_distortion = opts[order[layer][nxt]]
            gain = distortion - cand_distortion
            if gain <= 0:
                continue
            slope = gain / max(cand_size - size, 1e-12)
            if best is None or slope > best[0]:
                best = (slope, nxt)
        if best is not None:
            heapq.heappush(heap, (-best[0], layer, best[1]))

    for layer in range(len(options)):
        push(layer)
    while heap:
        _, layer, nxt = heapq.heappop(heap)
        opts = options[layer]
        extra = opts[order[layer][nxt]][0] - opts[order[layer][choice[layer]]][0]
        if used + extra <= budget_bits:
            used += extra
            choice[layer] = nxt
            push(layer)
    return [order[layer][c] for layer, c in enumerate(choice)]
