import pytest
import torch
from torch import nn

import netshrink
from netshrink.errors import ConfigError, InfeasibleTargetError
from netshrink.size import (
    Budget,
    Encoding,
    allocate,
    dense_bits,
    fp32_bits,
    model_bits,
    parse_target,
)


@pytest.mark.parametrize("text,kind,value", [
    ("1.5MB", "bytes", 1.5 * 2**20), ("800KB", "bytes", 800 * 1024), ("800 KiB", "bytes", 819200),
    ("12345B", "bytes", 12345), ("2GB", "bytes", 2 * 2**30), ("x20", "ratio", 20),
    ("20x", "ratio", 20), ("X7.5", "ratio", 7.5), ("3bit", "bits", 3), ("2.5bits", "bits", 2.5),
    (" 4 bit ", "bits", 4),
])
def test_parse_target(text, kind, value):
    t = parse_target(text)
    assert (t.kind, t.value) == (kind, value)


@pytest.mark.parametrize("bad", ["", "fast", "x0.5", "0bit", "33bit", "-1MB", "1.5TB", "x", 3])
def test_parse_target_rejects(bad):
    with pytest.raises(ConfigError):
        parse_target(bad)


def test_encoding_bits_and_bytes():
    assert Encoding.codes(3).nbytes(10) == 4  # 30 bits -> 4 bytes
    assert Encoding.codes(16).nbytes(3) == 6
    assert Encoding.of(torch.float16).nbits(5) == 80
    assert Encoding.of("int64").nbytes(2) == 16
    assert Encoding.codes(4).torch_dtype == torch.int64
    with pytest.raises(ConfigError):
        Encoding("code17")
    with pytest.raises(ConfigError):
        Encoding("float8")


def test_dense_bits_counts_shared_storage_once():
    a = torch.zeros(10)
    assert dense_bits([("a", a), ("b", a)]) == 320
    assert dense_bits([("a", a), ("b", a.clone())]) == 640


def test_fp32_bits_and_model_bits_of_plain_model():
    m = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4))
    # 44 linear + 4 weight + 4 bias + 4 mean + 4 var floats, one int64 counter
    assert fp32_bits(m) == (44 + 16) * 32 + 64
    assert model_bits(m) == fp32_bits(m)
    assert model_bits(m.half()) == (44 + 16) * 16 + 64
    assert fp32_bits(m.half()) == (44 + 16) * 32 + 64


def test_model_bits_of_palettized_model_counts_every_stored_tensor():
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    s = netshrink.compress(m, target="3bit", per_channel=True)
    # first layer: codes 2048*3 bits, codebook 8 fp16, scale 32 fp16, bias 32 fp32
    first = 2048 * 3 + 8 * 16 + 32 * 16 + 32 * 32
    second = (32 * 8 + 8) * 32  # too small: dense fp32 weight + bias
    assert model_bits(s) == first + second


def test_allocate_prefers_cheap_distortion_drops_and_respects_budget():
    def opts(n, var):
        return [(b * n, n * var * 2.0 ** (-2 * b)) for b in range(1, 9)]
    options = [opts(1000, 1.0), opts(1000, 0.01)]
    pick = allocate(options, 6000)
    bits = [p + 1 for p in pick]
    assert sum(b * 1000 for b in bits) <= 6000
    assert bits[0] > bits[1]  # the high-variance layer gets more bits
    with pytest.raises(ValueError):
        allocate(options, 1999)


def test_budget_infeasible_messages_give_range():
    b = Budget(parse_target("x1000"), baseline_bits=8000, fixed_bits=2000, n_weights=100)
    err = b.infeasible(500, "at 1 bit")
    assert isinstance(err, InfeasibleTargetError)
    assert "feasible sizes lie in [313 B, 1000 B]" in str(err)
    with pytest.raises(InfeasibleTargetError, match="larger than the uncompressed"):
        Budget(parse_target("2KB"), 8000, 2000, 100).available()


def test_compress_infeasible_targets(small_net):
    with pytest.raises(InfeasibleTargetError, match="feasible sizes lie in"):
        netshrink.compress(small_net, target="x1000")
    with pytest.raises(InfeasibleTargetError, match="larger than"):
        netshrink.compress(small_net, target="10MB")
    with pytest.raises(InfeasibleTargetError, match="feasible"):
        netshrink.compress(small_net, target="100B")
