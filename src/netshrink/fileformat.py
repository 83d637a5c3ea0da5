"""The .nsk file: a safetensors payload plus a versioned JSON manifest, no pickle.

Layout. The file is a valid safetensors file. Its tensors are a few flat "blobs", one per
storage encoding: `codes` (uint8: every code tensor bit-packed at its own width, each
byte-aligned), and one blob per plain dtype (`float16`, `float32`, `int64`, ...). The
manifest (JSON, zlib-compressed, base64, in the safetensors metadata under "netshrink")
says where each logical tensor lies in its blob:

    {"format": "netshrink", "version": 1, "arch": {"name", "kwargs", "module"} | null,
     "info": {...},
     "layers": {name: {"spec": {...}, "tensors": {t: [encoding, shape, offset]}}},
     "dense":  [[name, dtype, shape, offset] | [name, "=", earlier_name], ...]}

"arch" is the model's `netshrink.arch` record plus the module that registered it ("module";
files written before the registry lack it, and readers that predate it ignore it).

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

from .arch import arch_entry, arch_record, create_arch, family_of, unregistered_message
from .atomic import atomic_write
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .encoding import Encoding
from .errors import ConfigError, FormatError
from .layers import LAYER_KINDS, CompressedLayer, StoredModule, set_module, stored_modules
from .size import dense_state, with_aliases

FORMAT_NAME = "netshrink"
FORMAT_VERSION = 1
CODES_BLOB = "codes"
_MAX_HEADER = 100 * 2**20


# ---------------------------------------------------------------------------------------
# save


class _BlobWriter:
    """Appends tensors to per-encoding flat blobs and remembers offsets.

    A dry writer only counts (no packing, no copies): `blobs()` then returns uninitialised
    blobs of the right sizes, enough to measure the header exactly.
    """

    def __init__(self, dry: bool = False) -> None:
        self.dry = dry
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, tensor: torch.Tensor, enc: Encoding) -> int:
        blob = CODES_BLOB if enc.packed else enc.name
        offset = self.sizes.get(blob, 0)
        if self.dry:
            length = enc.nbytes(tensor.numel()) if enc.packed else tensor.numel()
        else:
            if enc.packed:
                data = pack_bits(tensor, enc.bits)
            else:
                data = tensor.detach().to("cpu", enc.torch_dtype).reshape(-1)
            self.parts.setdefault(blob, []).append(data)
            length = data.numel()
        self.sizes[blob] = offset + length
        return offset

    def blobs(self) -> dict[str, torch.Tensor]:
        if self.dry:
            return {name: torch.empty(n, dtype=torch.uint8 if name == CODES_BLOB
                                      else Encoding(name).torch_dtype)
                    for name, n in self.sizes.items()}
        return {name: torch.cat(parts).contiguous() for name, parts in self.parts.items()}


def build_manifest(model: nn.Module, dry: bool = False
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and blobs that `save` writes (exposed for tests and tools); `dry`
    gives the same manifest with placeholder blobs (see `header_bytes`)."""
    writer = _BlobWriter(dry)
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
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": arch_record(model),
                "info": _saved_info(getattr(model, "netshrink_info", None)), "layers": layers,
                "dense": dense}
    return manifest, writer.blobs()


RUN_ONLY_INFO = ("calibration",)
"""`netshrink_info` keys that describe one compress run (timings included) and are not
saved: a file is the same size whether or not the run calibrated (calibrate.py)."""


def _saved_info(info: Any) -> Any:
    if not isinstance(info, dict):
        return info
    return {k: v for k, v in info.items() if k not in RUN_ONLY_INFO}


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


def header_bytes(model: nn.Module) -> int:
    """Bytes of the file that are not stored tensors: the safetensors header (which holds
    the manifest) and its 8-byte length. Measured exactly, without packing any codes."""
    manifest, blobs = build_manifest(model, dry=True)
    data = st_save(blobs, metadata={FORMAT_NAME: encode_manifest(manifest)})
    return len(data) - sum(b.numel() * b.element_size() for b in blobs.values())


def check_savable(model: nn.Module) -> None:
    """Raise FormatError when `load` would reject what `save` is about to write (for
    example non-finite codebook values): a refused save leaves no unloadable file."""
    for name, module in stored_modules(model):
        try:
            module.validate()
        except FormatError as e:
            raise FormatError(f"refusing to save: layer {name!r}: {e}") from None


def save(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write `model` (compressed or not) to a .nsk file atomically; return its size.

    Validates every stored module first (the checks `load` makes), so a file that would
    not load is never written."""
    check_savable(model)
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
    """Reads logical tensors out of the file's blobs; `locate` checks an entry against the
    bytes present without reading or allocating anything."""

    def __init__(self, blobs: dict[str, torch.Tensor]) -> None:
        self.blobs = blobs

    def locate(self, desc: Any) -> tuple[Encoding, tuple[int, ...], int, int]:
        """(encoding, shape, offset, length in blob elements) of a tensor entry, after
        checking that it lies inside its blob; FormatError otherwise."""
        if not isinstance(desc, list) or len(desc) != 3:
            raise FormatError(f"malformed tensor entry {desc!r}")
        enc_name, shape, offset = desc
        try:
            enc = Encoding(str(enc_name))
            shape = tuple(int(s) for s in shape)
            offset = int(offset)
        except (ValueError, TypeError, ConfigError) as e:
            raise FormatError(f"bad tensor entry {desc}: {e}") from None
        if any(s < 0 for s in shape) or offset < 0:
            raise FormatError(f"negative shape or offset in {desc}")
        blob_name = CODES_BLOB if enc.packed else enc.name
        blob = self.blobs.get(blob_name)
        if blob is None:
            raise FormatError(f"blob {blob_name!r} is missing")
        expected = torch.uint8 if enc.packed else enc.torch_dtype
        if blob.dtype != expected or blob.dim() != 1:
            raise FormatError(f"blob {blob_name!r} has dtype {blob.dtype}, expected {expected}")
        numel = math.prod(shape)
        length = packed_nbytes(numel, enc.bits) if enc.packed else numel
        if offset + length > blob.numel():
            raise FormatError(f"tensor {desc} runs past the end of blob {blob_name!r} "
                              f"({blob.numel()} elements)")
        return enc, shape, offset, length

    def get(self, desc: Any) -> torch.Tensor:
        enc, shape, offset, length = self.locate(desc)
        blob = self.blobs[CODES_BLOB if enc.packed else enc.name]
        piece = blob[offset:offset + length]
        if enc.packed:
            return unpack_bits(piece, enc.bits, math.prod(shape)).reshape(shape)
        return piece.reshape(shape).clone()


def from_bytes(raw: bytes, model_like: nn.Module | None = None) -> nn.Module:
    """Rebuild a model from .nsk bytes; see `load`. Raises only FormatError for a damaged
    or mismatched file."""
    manifest = read_manifest(raw)
    reader = read_payload(raw, manifest)
    try:
        return _rebuild(manifest, reader, model_like, len(raw))
    except (FormatError, ConfigError):
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError) as e:
        raise FormatError(f"cannot rebuild the model from this file: {e}") from None


def read_payload(raw: bytes, manifest: dict[str, Any]) -> _BlobReader:
    """Parse the safetensors payload and check that every tensor the manifest lists lies
    inside its blob (the checks that need no model); FormatError otherwise. `load` and
    `inspect_file` both call it, so a file inspect calls fine has all of its bytes."""
    try:
        blobs = st_load(raw)
    except Exception as e:  # safetensors raises its own error types for damaged payloads
        raise FormatError(f"damaged safetensors payload: {e}") from None
    reader = _BlobReader(blobs)
    for name, entry in manifest["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise FormatError(f"malformed layer entry {name!r}")
        for desc in entry["tensors"].values():
            reader.locate(desc)
    for entry in manifest["dense"]:
        if isinstance(entry, list) and len(entry) == 4:
            reader.locate(entry[1:])
    return reader


def _rebuild(manifest: dict[str, Any], reader: _BlobReader, model_like: nn.Module | None,
             file_bytes: int = 0) -> nn.Module:
    """Structure first, memory last: every layer is built on the meta device and every
    shape checked against the file's bytes and the model before anything is allocated."""
    model = _instantiate(manifest, model_like, file_bytes)
    notes: list[str] = []
    pending: list[tuple[StoredModule, dict[str, Any]]] = []
    for name, entry in manifest["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise FormatError(f"malformed layer entry {name!r}")
        target = _target_module(model, name, entry.get("spec"))
        with torch.device("meta"):
            layer = StoredModule.from_spec(entry.get("spec"), target)
        slots = layer.stored()
        if set(slots) != set(entry["tensors"]):
            raise FormatError(f"layer {name!r}: file has tensors {sorted(entry['tensors'])}, "
                              f"a {layer.kind} layer stores {sorted(slots)}")
        for tname, desc in entry["tensors"].items():
            enc, shape, _, _ = reader.locate(desc)
            slot, slot_enc = slots[tname]
            if shape != tuple(slot.shape):
                raise FormatError(f"tensor {name}.{tname}: file has shape {list(shape)}, "
                                  f"the layer needs {list(slot.shape)}")
            _note_cast(notes, f"{name}.{tname}", enc, slot_enc)
        set_module(model, name, layer)
        pending.append((layer, entry["tensors"]))
    dense = _check_dense(model, manifest["dense"], reader, notes)
    _materialize(model)
    for layer, tensors in pending:
        layer.load_stored({t: reader.get(desc) for t, desc in tensors.items()})
    _load_dense(model, dense, reader)
    for _, module in stored_modules(model):
        module.link(model)
    info = manifest.get("info")
    if isinstance(info, dict):
        if notes:
            info = {**info, "notes": list(info.get("notes", [])) + notes}
        model.netshrink_info = info
    return model.eval()


def _note_cast(notes: list[str], name: str, stored: Encoding, slot: Encoding) -> None:
    """Record that a float tensor is cast to model_like's dtype on load."""
    if not stored.packed and not slot.packed and stored.name != slot.name:
        notes.append(f"{name}: stored as {stored.name}, cast to {slot.name} (model_like)")


def _lost_buffers(model: nn.Module) -> list[str]:
    """Meta buffers that no file stores (non-persistent, e.g. rotary frequencies)."""
    persistent = set(model.state_dict())
    return [n for n, b in model.named_buffers() if b.is_meta and n not in persistent]


def _instantiate(manifest: dict[str, Any], model_like: nn.Module | None,
                 file_bytes: int = 0) -> nn.Module:
    """An empty copy of the architecture: the registered architecture the file names, built
    on the meta device (so no architecture argument can allocate memory), or a copy of
    model_like. A module the file names is never imported (see `netshrink.arch`).
    An architecture with non-persistent buffers (which its constructor computes and no
    file stores) is built again for real, but only when its size is plausible for the file
    (at most 32 weights per file byte), so a hand-edited argument cannot exhaust memory."""
    if model_like is None:
        arch = manifest.get("arch")
        if not arch:
            raise ConfigError("this file does not name a registered architecture: pass "
                              "model_like, an instance of the original model")
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
            raise FormatError(f"malformed architecture record {arch!r}")
        if arch_entry(arch["name"]) is None:
            raise ConfigError(unregistered_message(arch))
        try:
            with torch.device("meta"):
                model = create_arch(arch["name"], **dict(arch.get("kwargs", {})))
            if not _lost_buffers(model):
                return model
            numel = sum(t.numel() for t in model.state_dict().values())
            if numel > 32 * file_bytes:
                raise FormatError(f"architecture {arch['name']!r} has {numel} weights, "
                                  f"implausible for a file of {file_bytes} bytes")
            return create_arch(arch["name"], **dict(arch.get("kwargs", {})))
        except ConfigError as e:
            if family_of(arch["name"]) is not None:
                raise  # e.g. the hf: directory is gone; the message says what to pass
            raise FormatError(f"file names an unknown architecture {arch!r}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"file names an unknown architecture {arch!r}: {e}") from None
    model = copy.deepcopy(model_like)
    lost = _lost_buffers(model)
    if lost:
        raise ConfigError(f"model_like is on the meta device but has non-persistent buffers "
                          f"({', '.join(lost[:3])}) that no file stores: pass a real instance")
    return model


def _target_module(model: nn.Module, name: str, spec: Any) -> nn.Module | None:
    """The module a compressed layer replaces, or None for an attached module (which must
    go to a free name under an existing parent)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    cls = LAYER_KINDS.get(kind)
    if cls is None:
        raise FormatError(f"unknown compressed layer kind {kind!r} "
                          f"(known: {', '.join(sorted(LAYER_KINDS))})")
    parent, _, child = name.rpartition(".")
    if cls.attached or not issubclass(cls, CompressedLayer):
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            raise FormatError(f"file attaches {name!r} under a module the model lacks") from None
        if not child or (hasattr(owner, child) and not isinstance(getattr(owner, child),
                                                                   StoredModule)):
            raise FormatError(f"file attaches {name!r}, which the model already has")
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"file has a compressed layer {name!r} that the model lacks") from None
    if not isinstance(module, CompressedLayer) and not isinstance(
            getattr(module, "weight", None), nn.Parameter):
        raise FormatError(f"file has a compressed layer {name!r}, the model's "
                          f"{type(module).__name__} has no weight: wrong architecture?")
    return module


def _check_dense(model: nn.Module, entries: list[Any], reader: _BlobReader,
                 notes: list[str]) -> list[tuple[str, Any]]:
    """Check the dense entries against the model's uncompressed tensors (names, shapes,
    bytes present); float tensors of another float dtype are cast, with a note."""
    checked: list[tuple[str, Any]] = []
    names: set[str] = set()
    expected = dict(dense_state(model))
    for entry in entries:
        if not isinstance(entry, list) or len(entry) not in (3, 4) or not isinstance(
                entry[0], str):
            raise FormatError(f"malformed dense entry {entry!r}")
        name = entry[0]
        if entry[1] == "=" and len(entry) == 3:
            if entry[2] not in names:
                raise FormatError(f"dense entry {name!r} aliases unknown {entry[2]!r}")
            checked.append((name, entry[2]))
        elif len(entry) == 4:
            enc, shape, _, _ = reader.locate(entry[1:])
            ref = expected.get(name)
            if ref is not None:
                ref_enc = Encoding.of(ref.dtype)
                floats = enc.torch_dtype.is_floating_point and ref.is_floating_point()
                if shape != tuple(ref.shape) or (enc != ref_enc and not floats):
                    raise FormatError(f"tensor {name!r}: file has {enc.name}{list(shape)}, "
                                      f"model has {ref_enc.name}{list(ref.shape)}")
                _note_cast(notes, name, enc, ref_enc)
            checked.append((name, entry[1:]))
        else:
            raise FormatError(f"malformed dense entry {entry!r}")
        names.add(name)
    if names != set(expected):
        missing = sorted(set(expected) - names)[:5]
        extra = sorted(names - set(expected))[:5]
        raise FormatError(f"file does not match the model: missing {missing}, unexpected {extra}")
    return checked


def _materialize(model: nn.Module) -> None:
    """Give every meta parameter and buffer real (uninitialised) CPU memory; tensors that
    are shared stay shared. Only what the checked file will fill is still on meta here."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device="cpu")
                    done[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(
                        t, nn.Parameter) else new
                table[key] = done[id(t)]


def _load_dense(model: nn.Module, entries: list[tuple[str, Any]], reader: _BlobReader) -> None:
    state: dict[str, torch.Tensor] = {}
    for name, desc in entries:
        state[name] = state[desc] if isinstance(desc, str) else reader.get(desc)
    expected = dict(dense_state(model))
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False)


def load(path: str | os.PathLike[str], model_like: nn.Module | None = None) -> nn.Module:
    """Load a .nsk file into a copy of `model_like` (any instance of the original
    architecture, weights ignored, may be on the meta device), or into the registered
    architecture the file names (`netshrink.arch`; for zoo models, import netshrink_lab.zoo
    first). Outputs are bit-identical to the module that was saved."""
    return from_bytes(_read(path), model_like)


def _read(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a .nsk file; a missing file or a directory raises FormatError."""
    p = Path(path)
    if p.is_dir():
        raise FormatError(f"{path} is a directory, not a .nsk file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from None


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a .nsk file plus its size and header length (no model needed).
    Checks the payload as `load` does short of rebuilding the model (`read_payload`): a
    truncated or damaged file raises FormatError, as does a missing file or a directory."""
    raw = _read(path)
    manifest = read_manifest(raw)
    read_payload(raw, manifest)
    _, header_len = read_header(raw)
    return {"file_bytes": len(raw), "header_bytes": header_len + 8, "manifest": manifest}
