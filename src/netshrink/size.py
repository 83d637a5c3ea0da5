"""Targets and bit-exact size accounting: the one place that says how big things are.

Size is counted in bits of what is stored. Every stored tensor has an `Encoding`: a plain
dtype (float16 codebooks, float32 biases and norms, int64 counters) or unsigned integer
codes bit-packed at 1..16 bits. A packed code tensor is written byte-aligned, so it costs
`ceil(numel * bits / 8)` bytes; this module counts exactly that, and the file writer
(`fileformat.py`) writes exactly that, so the accounted size is the size on disk.

"KB"/"MB"/"GB" are binary units (KiB/MiB/GiB) as in all four papers (METHODS.md).
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, InfeasibleTargetError

_FLOAT_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16}
_INT_BITS = {"int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8, "bool": 8}
DTYPE_BITS: dict[str, int] = {**_FLOAT_BITS, **_INT_BITS}
MAX_CODE_BITS = 16


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the name used in manifests and encodings."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Encoding:
    """How one stored tensor is written: a plain dtype, or codes packed at `bits` each.

    String form (used in the file manifest): the dtype name ("float16") or "code<bits>".
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in DTYPE_BITS and not _is_code_name(self.name):
            raise ConfigError(
                f"unknown encoding {self.name!r}: use a dtype ({', '.join(DTYPE_BITS)}) "
                f"or code1..code{MAX_CODE_BITS} for bit-packed codes"
            )

    @staticmethod
    def codes(bits: int) -> Encoding:
        """Unsigned integer codes, bit-packed at `bits` (1..16) bits each."""
        return Encoding(f"code{int(bits)}")

    @staticmethod
    def of(dtype: torch.dtype | str) -> Encoding:
        """A plain dtype encoding ('float16', torch.float32, ...)."""
        return Encoding(dtype if isinstance(dtype, str) else dtype_name(dtype))

    @property
    def packed(self) -> bool:
        return _is_code_name(self.name)

    @property
    def bits(self) -> int:
        """Bits per element."""
        return int(self.name[4:]) if self.packed else DTYPE_BITS[self.name]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The in-memory dtype of a tensor with this encoding (int64 for codes)."""
        return torch.int64 if self.packed else getattr(torch, self.name)

    def nbytes(self, numel: int) -> int:
        """Bytes this tensor occupies in the file (packed codes are byte-aligned)."""
        return (numel * self.bits + 7) // 8

    def nbits(self, numel: int) -> int:
        """Bits this tensor occupies in the file: always 8 * nbytes."""
        return 8 * self.nbytes(numel)


def _is_code_name(name: str) -> bool:
    m = re.fullmatch(r"code(\d+)", name)
    return bool(m) and 1 <= int(m.group(1)) <= MAX_CODE_BITS


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
    from .layers import stored_modules

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
class Budget:
    """What a target means for the layers being compressed.

    baseline_bits: the fp32 model; fixed_bits: everything left uncompressed (norms, biases
    kept dense, skipped layers); n_weights: weights of the layers to compress;
    header_bits: what the file's header and manifest take. A size or ratio target bounds
    the whole file on disk, so the header comes out of the same budget.
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

    def total_bits(self) -> float | None:
        """Bits for the stored tensors (the file less its header), None for bits targets."""
        file_bits = self.file_bits()
        return None if file_bits is None else file_bits - self.header_bits

    def layer_bits(self) -> float:
        """Bits available to the compressed layers' stored tensors.

        For a bits target this is `bits * n_weights` of weight encoding alone.
        """
        total = self.total_bits()
        if total is None:
            return self.target.value * self.n_weights
        if self.file_bits() > self.baseline_bits:
            raise InfeasibleTargetError(
                f"target {self.target} ({format_bytes(self.file_bits() / 8)}) is larger than the "
                f"uncompressed fp32 model ({format_bytes(self.baseline_bits / 8)}): "
                "nothing to compress"
            )
        return total - self.fixed_bits

    def infeasible(self, min_layer_bits: float, what: str) -> InfeasibleTargetError:
        """The error for a target below the smallest size the method can reach."""
        lo = math.ceil((self.fixed_bits + min_layer_bits + self.header_bits) / 8)
        hi = self.baseline_bits // 8
        return InfeasibleTargetError(
            f"target {self.target} cannot be met: the smallest file {what} takes "
            f"{format_bytes(lo)} (x{hi / lo:.1f}), of which {format_bytes(self.fixed_bits / 8)} "
            f"stays uncompressed and {format_bytes(self.header_bits / 8)} is the header; "
            f"feasible sizes lie in [{lo} B, {hi} B] (ratio x1 to x{hi / lo:.1f})"
        )


    def pick(self, options: Sequence[Sequence[Option]], what: str) -> list[int]:
        """`allocate` under this budget's layer bits; when even the smallest options do not
        fit, the target's error: `InfeasibleTargetError` with the feasible range for a size
        or ratio target, `ConfigError` for a bits target. `what` names the smallest options
        ("at the smallest allowed bit widths")."""
        available = self.layer_bits()  # raises for a target above the fp32 model
        try:
            return allocate(options, available)
        except ValueError:
            smallest = sum(min(o.size_bits for o in opts) for opts in options)
            if self.target.kind != "bits":
                raise self.infeasible(smallest, what) from None
            raise ConfigError(f"target {self.target} is below the smallest options, "
                              f"{what} ({smallest / self.n_weights:.3f} bits per weight)"
                              ) from None


def palette_bits(n_codes: int, bits: int, d: int, scale_rows: int, dtype: str) -> int:
    """Stored bits of a palette (`layers.PalettizedLayer`, bias not included): `n_codes`
    codes packed at `bits` bits, a (2^bits, d) codebook and `scale_rows` per-channel scales
    (0 for none), codebook and scales in `dtype`."""
    enc = Encoding.of(dtype)
    return Encoding.codes(bits).nbits(n_codes) + enc.nbits(2**bits * d) + enc.nbits(scale_rows)


@dataclass(frozen=True)
class Option:
    """One way to encode one layer: its label (e.g. bits), stored size and distortion."""

    label: int
    size_bits: float
    distortion: float


def allocate(options: Sequence[Sequence[Option]], budget_bits: float) -> list[int]:
    """Choose one option per layer: least total distortion with total size <= budget.

    Greedy marginal analysis (multiple-choice knapsack, Lagrangian-style): start from every
    layer's smallest option and repeatedly take the upgrade with the largest distortion drop
    per extra bit that still fits. Optimal when distortion is convex in size, as it is for
    rate-distortion curves like D(b) ~ 2^(-2b). Raises ValueError if even the smallest
    options exceed the budget (callers turn that into an InfeasibleTargetError).
    """
    order = [sorted(range(len(opts)), key=lambda i: opts[i].size_bits) for opts in options]
    choice = [0] * len(options)
    used = sum(opts[o[0]].size_bits for opts, o in zip(options, order))
    if used > budget_bits:
        raise ValueError(f"smallest options need {used} bits > budget {budget_bits}")
    heap: list[tuple[float, int, int]] = []

    def push(layer: int) -> None:
        opts, pos = options[layer], choice[layer]
        cur = opts[order[layer][pos]]
        best: tuple[float, int] | None = None
        for nxt in range(pos + 1, len(opts)):  # steepest next step (handles non-convexity)
            cand = opts[order[layer][nxt]]
            extra = cand.size_bits - cur.size_bits
            gain = cur.distortion - cand.distortion
            if gain <= 0:
                continue
            slope = gain / max(extra, 1e-12)
            if best is None or slope > best[0]:
                best = (slope, nxt)
        if best is not None:
            heapq.heappush(heap, (-best[0], layer, best[1]))

    for layer in range(len(options)):
        push(layer)
    while heap:
        _, layer, nxt = heapq.heappop(heap)
        opts = options[layer]
        extra = opts[order[layer][nxt]].size_bits - opts[order[layer][choice[layer]]].size_bits
        if used + extra <= budget_bits:
            used += extra
            choice[layer] = nxt
            push(layer)
    return [order[layer][c] for layer, c in enumerate(choice)]


def ceil_log2(k: int) -> int:
    """Bits needed to index k entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))
