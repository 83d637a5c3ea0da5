import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.bitpack import pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_round_trip_every_width(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=300))
    codes = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(len(values), bits) == (len(values) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, len(values)), codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_each_width_across_chunks(bits):
    g = torch.Generator().manual_seed(bits)
    n = (1 << 20) + 13  # crosses the internal chunk boundary
    codes = torch.randint(0, 2**bits, (n,), generator=g) if bits > 12 else \
        torch.randint(0, 2**bits, (n,), generator=g)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, n), codes)


def test_layout_is_little_endian():
    assert pack_bits(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    assert pack_bits(torch.tensor([3, 1]), 2).tolist() == [0b0111]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


@pytest.mark.parametrize("bad", [torch.tensor([4]), torch.tensor([-1])])
def test_out_of_range_rejected(bad):
    with pytest.raises(ValueError):
        pack_bits(bad, 2)


def test_wrong_length_rejected():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1]), 17)
