"""How each stored tensor is written, and how many bits that takes: the bottom layer.

Every tensor netshrink stores has an `Encoding`: a plain dtype (float16 codebooks, float32
biases and norms, int64 counters) or unsigned integer codes bit-packed at 1..16 bits. A
packed code tensor is written byte-aligned, so it costs `ceil(numel * bits / 8)` bytes.
Compressed layers declare their tensors with these encodings (`layers.py`), size accounting
sums them (`size.py`) and the file writer writes exactly that (`fileformat.py`). This module
imports nothing else of netshrink, so every other module may import it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError

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


def ceil_log2(k: int) -> int:
    """Bits needed to index k entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))
