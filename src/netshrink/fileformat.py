"""The .nsk file: a safetensors payload plus a versioned JSON manifest, no pickle.

Layout. The file is a valid safetensors file. Its tensors are a few flat "blobs", one per
storage encoding: `codes` (uint8: every code tensor bit-packed at its own width, each
byte-aligned), and one blob per plain dtype (`float16`, `float32`, `int64`, ...). The
manifest (JSON, zlib-compressed, base64, in the safetensors metadata under "netshrink")
says where each logical tensor lies in its blob:

    {"format": "netshrink", "version": 1, "arch": {...} | null, "info": {...},
     "layers": {name: {"spec": {...}, "tensors": {t: [encoding, shape, offset]}}},
     "dense":  [[name, dtype, shape, offset] | [name, "=", earlier_name], ...]}

So the file size is exactly the accounted size (`size.model_bits`) plus the safetensors
header (which holds the manifest) plus its 8-byte length. Loading parses and checks all
of it; anything wrong raises `FormatError`. Writes are atomic and deterministic.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .atomic import atomic_write
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .errors import ConfigError, FormatError
from .layers import CompressedLayer, StoredModule, set_module, stored_modules
from .size import Encoding, dense_state, dtype_name, with_aliases

FORMAT_NAME = "netshrink"
FORMAT_VERSION = 1
CODES_BLOB = "codes"
_MAX_HEADER = 100 * 2**20


# ---------------------------------------------------------------------------------------
# save


class _BlobWriter:
    """Appends tensors to per-encoding flat blobs and remembers offsets."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, tensor: torch.Tensor, enc: Encoding) -> int:
        if enc.packed:
            data, blob = pack_bits(tensor, enc.bits), CODES_BLOB
        else:
            data, blob = tensor.detach().to("cpu", enc.torch_dtype).reshape(-1), enc.name
        offset = self.sizes.get(blob, 0)
        self.parts.setdefault(blob, []).append(data)
        self.sizes[blob] = offset + data.numel()
        return offset

    def blobs(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts).contiguous() for name, parts in self.parts.items()}


def build_manifest(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and blobs that `save` writes (exposed for tests and tools)."""
    from .zoo import arch_of

    writer = _BlobWriter()
    layers: dict[str, Any] = {}
    comp = dict(stored_modules(model))
    for name, layer in comp.items():
        tensors = {}
        for tname, (t, enc) in layer.stored().items():
            tensors[tname] = [enc.name, list(t.shape), writer.add(t, enc)]
        layers[name] = {"spec": layer.spec(), "tensors": tensors}
    dense: list[list[Any]] = []
    for name, t, alias in with_aliases(dense_state(model, comp)):
        if alias is not None:
            dense.append([name, "=", alias])
            continue
        enc = Encoding.of(t.dtype)
        dense.append([name, enc.name, list(t.shape), writer.add(t, enc)])
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": arch_of(model),
                "info": getattr(model, "netshrink_info", None), "layers": layers,
                "dense": dense}
    return manifest, writer.blobs()


def encode_manifest(manifest: dict[str, Any]) -> str:
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def decode_manifest(text: str) -> dict[str, Any]:
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(base64.b64decode(text, validate=True), _MAX_HEADER)
        if inflater.unconsumed_tail:
            raise FormatError(f"manifest inflates past {_MAX_HEADER} bytes")
        obj = json.loads(data)
    except (ValueError, zlib.error) as e:
        raise FormatError(f"manifest is not valid compressed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError("manifest is not a JSON object")
    return obj


def to_bytes(model: nn.Module) -> bytes:
    """The exact bytes `save` writes."""
    manifest, blobs = build_manifest(model)
    return st_save(blobs, metadata={FORMAT_NAME: encode_manifest(manifest)})


def save(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write `model` (compressed or not) to a .nsk file atomically; return its size."""
    data = to_bytes(model)
    atomic_write(Path(path), data)
    return len(data)


# ---------------------------------------------------------------------------------------
# load


def read_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header; return (header JSON, header length)."""
    if len(raw) < 8:
        raise FormatError(f"file too short ({len(raw)} bytes) to be a .nsk file")
    n = int.from_bytes(raw[:8], "little")
    if n > min(len(raw) - 8, _MAX_HEADER):
        raise FormatError(f"header length {n} exceeds the file ({len(raw)} bytes): truncated?")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    return header, n


def read_manifest(raw: bytes) -> dict[str, Any]:
    """Parse and check the manifest of a .nsk file's bytes."""
    header, _ = read_header(raw)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(FORMAT_NAME), str):
        raise FormatError("not a netshrink file: no netshrink manifest in the metadata")
    manifest = decode_manifest(meta[FORMAT_NAME])
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"unknown format {manifest.get('format')!r}")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported .nsk format version {version!r}; this netshrink reads "
                          f"version {FORMAT_VERSION}")
    for key, kind in (("layers", dict), ("dense", list)):
        if not isinstance(manifest.get(key), kind):
            raise FormatError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    return manifest


class _BlobReader:
    def __init__(self, blobs: dict[str, torch.Tensor]) -> None:
        self.blobs = blobs

    def get(self, enc_name: Any, shape: Any, offset: Any) -> torch.Tensor:
        try:
            enc = Encoding(str(enc_name))
            shape = [int(s) for s in shape]
            offset = int(offset)
        except (ValueError, TypeError) as e:
            raise FormatError(f"bad tensor entry {[enc_name, shape, offset]}: {e}") from None
        if any(s < 0 for s in shape) or offset < 0:
            raise FormatError(f"negative shape or offset in {[enc_name, shape, offset]}")
        numel = math.prod(shape)
        blob_name = CODES_BLOB if enc.packed else enc.name
        blob = self.blobs.get(blob_name)
        if blob is None:
            raise FormatError(f"blob {blob_name!r} is missing")
        length = packed_nbytes(numel, enc.bits) if enc.packed else numel
        expected = torch.uint8 if enc.packed else enc.torch_dtype
        if blob.dtype != expected or blob.dim() != 1:
            raise FormatError(f"blob {blob_name!r} has dtype {blob.dtype}, expected {expected}")
        if offset + length > blob.numel():
            raise FormatError(f"tensor at {offset}+{length} runs past the end of blob "
                              f"{blob_name!r} ({blob.numel()} elements)")
        piece = blob[offset:offset + length]
        if enc.packed:
            return unpack_bits(piece, enc.bits, numel).reshape(shape)
        return piece.reshape(shape).clone()


def from_bytes(raw: bytes, model_like: nn.Module | None = None) -> nn.Module:
    """Rebuild a model from .nsk bytes; see `load`."""
    manifest = read_manifest(raw)
    try:
        blobs = st_load(raw)
    except Exception as e:  # safetensors raises its own error types for damaged payloads
        raise FormatError(f"damaged safetensors payload: {e}") from None
    reader = _BlobReader(blobs)
    model = _instantiate(manifest, model_like)
    for name, entry in manifest["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise FormatError(f"malformed layer entry {name!r}")
        layer = StoredModule.from_spec(entry.get("spec"))
        _check_target_module(model, name, layer)
        tensors = {}
        for tname, desc in entry["tensors"].items():
            if not isinstance(desc, list) or len(desc) != 3:
                raise FormatError(f"malformed tensor entry {name}.{tname}")
            tensors[tname] = reader.get(*desc)
        layer.load_stored(tensors)
        set_module(model, name, layer)
    _load_dense(model, manifest["dense"], reader)
    for _, module in stored_modules(model):
        module.link(model)
    info = manifest.get("info")
    if info is not None:
        model.netshrink_info = info
    return model.eval()


def _instantiate(manifest: dict[str, Any], model_like: nn.Module | None) -> nn.Module:
    if model_like is None:
        arch = manifest.get("arch")
        if not arch:
            raise ConfigError("this file does not name a zoo architecture: pass model_like, "
                              "an instance of the original model")
        from . import zoo

        try:
            return zoo.create(arch["name"], **arch.get("kwargs", {}))
        except (ConfigError, KeyError, TypeError) as e:
            raise FormatError(f"file names an unknown architecture {arch!r}: {e}") from None
    if any(t.device.type == "meta" for t in model_like.state_dict().values()) or any(
            p.device.type == "meta" for p in model_like.parameters()):
        persistent = set(model_like.state_dict())
        lost = [n for n, _ in model_like.named_buffers() if n not in persistent]
        if lost:
            raise ConfigError(f"model_like is on the meta device but has non-persistent buffers "
                              f"({', '.join(lost[:3])}) that no file stores: pass a real instance")
        return copy.deepcopy(model_like).to_empty(device="cpu")
    return copy.deepcopy(model_like)


def _check_target_module(model: nn.Module, name: str, layer: StoredModule) -> None:
    """A layer must replace a module of the same weight shape; an attached module must
    go to a free name under an existing parent."""
    parent, _, child = name.rpartition(".")
    if layer.attached or not isinstance(layer, CompressedLayer):
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            raise FormatError(f"file attaches {name!r} under a module the model lacks") from None
        if not child or (hasattr(owner, child) and not isinstance(getattr(owner, child),
                                                                   StoredModule)):
            raise FormatError(f"file attaches {name!r}, which the model already has")
        return
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"file has a compressed layer {name!r} that the model lacks") from None
    if isinstance(module, CompressedLayer):  # model_like may itself be compressed
        shape = module.op.weight_shape
    else:
        shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
    if shape != layer.op.weight_shape:
        raise FormatError(f"layer {name!r}: file has weight shape {layer.op.weight_shape}, "
                          f"model has {shape}: wrong architecture?")


def _load_dense(model: nn.Module, entries: list[Any], reader: _BlobReader) -> None:
    state: dict[str, torch.Tensor] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) not in (3, 4) or not isinstance(
                entry[0], str):
            raise FormatError(f"malformed dense entry {entry!r}")
        if entry[1] == "=":
            if entry[2] not in state:
                raise FormatError(f"dense entry {entry[0]!r} aliases unknown {entry[2]!r}")
            state[entry[0]] = state[entry[2]]
        elif len(entry) == 4:
            state[entry[0]] = reader.get(entry[1], entry[2], entry[3])
        else:
            raise FormatError(f"malformed dense entry {entry!r}")
    expected = {k: v for k, v in dense_state(model)}
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:5]
        extra = sorted(set(state) - set(expected))[:5]
        raise FormatError(f"file does not match the model: missing {missing}, unexpected {extra}")
    for k, v in state.items():
        ref = expected[k]
        if tuple(v.shape) != tuple(ref.shape) or dtype_name(v.dtype) != dtype_name(ref.dtype):
            raise FormatError(f"tensor {k!r}: file has {dtype_name(v.dtype)}{list(v.shape)}, "
                              f"model has {dtype_name(ref.dtype)}{list(ref.shape)}")
    model.load_state_dict(state, strict=False)


def load(path: str | os.PathLike[str], model_like: nn.Module | None = None) -> nn.Module:
    """Load a .nsk file into a copy of `model_like` (any instance of the original
    architecture, weights ignored, may be on the meta device), or into the zoo model the
    file names. Outputs are bit-identical to the module that was saved."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e}") from None
    return from_bytes(raw, model_like)


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a .nsk file plus its size and header length (no model needed)."""
    raw = Path(path).read_bytes()
    manifest = read_manifest(raw)
    _, header_len = read_header(raw)
    return {"file_bytes": len(raw), "header_bytes": header_len + 8, "manifest": manifest}
