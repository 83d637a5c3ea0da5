"""Bit-packing of unsigned integer codes at any width from 1 to 16 bits.

Codes are laid out little-endian: bit j of code i is bit (i * bits + j) of the stream, and
stream bit n is bit (n % 8) of byte n // 8. The stream is padded with zero bits to a whole
byte, so n codes take exactly ceil(n * bits / 8) bytes. Work is done in chunks of
2^20 codes, so memory stays bounded for large layers.
"""

from __future__ import annotations

import numpy as np
import torch

from .encoding import MAX_CODE_BITS

_CHUNK = 1 << 20  # codes per chunk; a multiple of 8, so chunks end on byte boundaries


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"bit width must be an integer in 1..{MAX_CODE_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in [0, 2^bits)) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) to pack at {bits} bits; "
            f"got range [{flat.min()}, {flat.max()}]"
        )
    shifts = np.arange(bits, dtype=np.uint32)
    out = []
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK].astype(np.uint32)
        stream = ((chunk[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        out.append(np.packbits(stream, bitorder="little"))
    data = np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(data)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` codes as a flat int64 tensor.

    Raises ValueError when `data` has not exactly ceil(count * bits / 8) bytes.
    """
    _check_bits(bits)
    raw = data.detach().reshape(-1).cpu().numpy()
    if raw.dtype != np.uint8 or raw.size != packed_nbytes(count, bits):
        raise ValueError(
            f"{count} codes at {bits} bits need {packed_nbytes(count, bits)} bytes of uint8, "
            f"got {raw.size} of {raw.dtype}"
        )
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    out = np.empty(count, dtype=np.int64)
    step_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        stream = np.unpackbits(raw[i * step_bytes:i * step_bytes + packed_nbytes(n, bits)],
                               bitorder="little")[: n * bits]
        out[start:start + n] = (stream.reshape(n, bits).astype(np.uint32) @ weights)
    return torch.from_numpy(out)
