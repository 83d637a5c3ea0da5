import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import netshrink
from netshrink.errors import FormatError
from netshrink.fileformat import (
    decode_manifest,
    encode_manifest,
    inspect_file,
    read_header,
    to_bytes,
)
from netshrink.layers import PalettizedLayer


@pytest.fixture
def compressed(small_net):
    return netshrink.compress(small_net, target="3bit", min_weights=256)


def test_round_trip_bit_identical(compressed, small_net, images, tmp_path):
    path = tmp_path / "m.nsk"
    netshrink.save(compressed, path)
    loaded = netshrink.load(path, small_net)
    assert torch.equal(loaded(images), compressed(images))
    size = netshrink.report(compressed).compressed_bytes
    assert netshrink.report(loaded).compressed_bytes == size
    assert not list(tmp_path.glob("*.tmp"))


def test_load_into_compressed_model_like(compressed, images, tmp_path):
    netshrink.save(compressed, tmp_path / "m.nsk")
    assert torch.equal(netshrink.load(tmp_path / "m.nsk", compressed)(images), compressed(images))


def test_load_into_meta_model(compressed, small_net, images, tmp_path):
    path = tmp_path / "m.nsk"
    netshrink.save(compressed, path)
    with torch.device("meta"):
        like = type(small_net)()
    loaded = netshrink.load(path, like)
    assert torch.equal(loaded(images), compressed(images))


def test_file_size_equals_accounting_plus_header(compressed, tmp_path):
    path = tmp_path / "m.nsk"
    written = netshrink.save(compressed, path)
    size = os.path.getsize(path)
    assert size == written
    info = inspect_file(path)
    accounted = netshrink.model_bits(compressed) // 8
    assert size == accounted + info["header_bytes"]
    assert info["header_bytes"] <= max(0.01 * size, 8192)


def test_same_seed_same_bytes(small_net):
    a = to_bytes(netshrink.compress(small_net, target="x4", seed=3, min_weights=256))
    b = to_bytes(netshrink.compress(small_net, target="x4", seed=3, min_weights=256))
    assert a == b


def test_uncompressed_model_round_trip(small_net, images, tmp_path):
    netshrink.save(small_net, tmp_path / "plain.nsk")
    assert torch.equal(netshrink.load(tmp_path / "plain.nsk", small_net)(images), small_net(images))


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.relu(self.body(self.emb(t))))

    torch.manual_seed(0)
    m = Tied()
    s = netshrink.compress(m, target="4bit", min_weights=512)
    skipped = netshrink.report(s).skipped
    assert "tied" in skipped["emb"] and "tied" in skipped["head"]
    netshrink.save(s, tmp_path / "t.nsk")
    manifest = inspect_file(tmp_path / "t.nsk")["manifest"]
    assert ["head.weight", "=", "emb.weight"] in manifest["dense"]
    loaded = netshrink.load(tmp_path / "t.nsk", Tied())
    assert loaded.head.weight is loaded.emb.weight
    t = torch.arange(10)
    assert torch.equal(loaded(t), s(t))


# ------------------------------------------------------------------ damaged files


def _rewrite(raw: bytes, edit) -> bytes:
    """Hand-edit the manifest of a .nsk file, keeping the payload."""
    header, n = read_header(raw)
    manifest = decode_manifest(header["__metadata__"]["netshrink"])
    edit(manifest)
    header["__metadata__"]["netshrink"] = encode_manifest(manifest)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _first_layer(m):
    return next(iter(m["layers"].values()))


def _k3_model():
    """A palettized layer with k=3 codewords at 2 bits: code 3 is out of range."""
    layer = PalettizedLayer(nn.Linear(8, 4, bias=False), torch.zeros(4, 8, dtype=torch.int64),
                            torch.randn(3, 1))
    return nn.Sequential(layer), nn.Sequential(nn.Linear(8, 4, bias=False))


def _damage_codes_out_of_range(raw: bytes) -> bytes:
    header, n = read_header(raw)
    start, end = header["codes"]["data_offsets"]
    body = bytearray(raw)
    body[8 + n + start:8 + n + end] = b"\xff" * (end - start)
    return bytes(body)


def _set(path, value):
    def edit(m):
        obj = m
        for key in path[:-1]:
            obj = obj[key] if not callable(key) else key(obj)
        obj[path[-1]] = value
    return edit


DAMAGES = {
    "empty": lambda raw: b"",
    "truncated_header": lambda raw: raw[:40],
    "truncated_payload": lambda raw: raw[:-16],
    "huge_header_length": lambda raw: struct.pack("<Q", 2**40) + raw[8:],
    "header_not_json": lambda raw: raw[:8] + b"\x00garbage" + raw[16:],
    "not_netshrink": lambda raw: st_save({"x": torch.zeros(3)}),
    "manifest_not_base64": lambda raw: _rewrite_meta(raw, "!!not base64!!"),
    "unknown_version": lambda raw: _rewrite(raw, _set(["version"], 99)),
    "unknown_layer_kind": lambda raw: _rewrite(raw, _set([_first_layer, "spec", "kind"], "evil")),
    "wrong_tensor_shape": lambda raw: _rewrite(
        raw, _set([_first_layer, "tensors", "codebook", 1], [5, 1])),
    "offset_past_end": lambda raw: _rewrite(
        raw, _set([_first_layer, "tensors", "codebook", 2], 10**9)),
    "bad_encoding": lambda raw: _rewrite(
        raw, _set([_first_layer, "tensors", "codes", 0], "code99")),
    "missing_dense_tensor": lambda raw: _rewrite(raw, lambda m: m["dense"].pop()),
    "dense_wrong_dtype": lambda raw: _rewrite(raw, lambda m: m["dense"][0].__setitem__(1, "int64")),
    "layer_shape_mismatch": lambda raw: _rewrite(
        raw, _set([_first_layer, "spec", "weight_shape"], [999, 8, 3, 3])),
    "layers_not_dict": lambda raw: _rewrite(raw, _set(["layers"], [1, 2])),
    "pickle_file": lambda raw: _pickle_bytes(),
}


def _rewrite_meta(raw: bytes, text: str) -> bytes:
    header, n = read_header(raw)
    header["__metadata__"]["netshrink"] = text
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + raw[8 + n:]


def _pickle_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_files_raise_format_error(damage, compressed, small_net, tmp_path):
    raw = to_bytes(compressed)
    path = tmp_path / "bad.nsk"
    path.write_bytes(DAMAGES[damage](raw))
    with pytest.raises(FormatError):
        netshrink.load(path, small_net)


def test_out_of_range_codes_raise_format_error(tmp_path):
    model, like = _k3_model()
    raw = to_bytes(model)
    path = tmp_path / "k3.nsk"
    path.write_bytes(raw)
    netshrink.load(path, like)  # intact file loads
    path.write_bytes(_damage_codes_out_of_range(raw))
    with pytest.raises(FormatError, match="out of range"):
        netshrink.load(path, like)


def test_wrong_architecture_raises_format_error(compressed, tmp_path):
    path = tmp_path / "m.nsk"
    netshrink.save(compressed, path)
    with pytest.raises(FormatError):
        netshrink.load(path, nn.Sequential(nn.Linear(3, 3)))


def test_missing_file_raises_format_error(tmp_path):
    with pytest.raises(FormatError):
        netshrink.load(tmp_path / "nope.nsk", nn.Linear(2, 2))


@pytest.mark.parametrize("target", ["1bit", "x20"])
def test_header_overhead_on_resnet20(target, tmp_path):
    from netshrink_lab import zoo

    torch.manual_seed(0)
    small = netshrink.compress(zoo.create("resnet20"), target=target)
    size = netshrink.save(small, tmp_path / "r20.nsk")
    header = inspect_file(tmp_path / "r20.nsk")["header_bytes"]
    assert size == netshrink.model_bits(small) // 8 + header
    assert header <= max(0.01 * size, 8192), (header, size)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(netshrink.load(tmp_path / "r20.nsk")(x), small(x))


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    """Files are written through a 0600 temp file: the result must not keep that mode."""
    from netshrink.atomic import atomic_write

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic = tmp_path / "atomic.bin"
    atomic_write(atomic, b"x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    os.chmod(atomic, 0o640)
    atomic_write(atomic, b"y")  # an existing file keeps its mode
    assert atomic.stat().st_mode & 0o777 == 0o640
