"""The stored-module contract, including a representation shared by several layers and
attached to the model (what SMH needs): saved once, linked again after loading."""

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import netshrink
from netshrink.errors import FormatError
from netshrink.fileformat import inspect_file
from netshrink.layers import (
    CompressedLayer,
    StoredModule,
    register_layer,
    set_module,
    stored_modules,
)
from netshrink.size import Encoding


@register_layer
class SharedTable(StoredModule):
    """Test-only: one fp16-stored vector that several layers slice their weights from."""

    kind = "test-table"
    attached = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(size))

    def stored(self):
        return {"table": (self.table, Encoding.of("float16"))}

    def spec_extra(self):
        return {"size": self.table.numel()}

    @classmethod
    def _build(cls, spec: dict[str, Any], target):
        return cls(int(spec["size"]))


@register_layer
class SlicedLayer(CompressedLayer):
    """Test-only: weight = table[offset : offset + n], reshaped."""

    kind = "test-sliced"

    def __init__(self, module, offset: int, hub_name: str = "hub") -> None:
        super().__init__(module)
        self.offset, self.hub_name = offset, hub_name

    def decode_weight(self):
        n = math.prod(self.weight_shape)
        return self.hub.table[self.offset:self.offset + n].reshape(self.weight_shape)

    def stored_extra(self):
        return {}

    def spec_extra(self):
        return {"offset": self.offset, "hub": self.hub_name}

    @classmethod
    def _allocate(cls, module, out_axis, extra):
        return cls(module, int(extra["offset"]), str(extra["hub"]))

    def link(self, root):
        object.__setattr__(self, "hub", root.get_submodule(self.hub_name))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _shared_model():
    torch.manual_seed(0)
    dense = TwoLayers()
    model = copy.deepcopy(dense)
    hub = SharedTable(8 * 16 + 16 * 4)
    with torch.no_grad():
        hub.table.normal_()
    model.hub = hub
    offset = 0
    for name in ("a", "b"):
        old = model.get_submodule(name)
        n = old.weight.numel()
        layer = SlicedLayer(old, offset)
        layer.link(model)
        set_module(model, name, layer)
        offset += n
    model.netshrink_info = None
    netshrink.get_method("kmeans").finalize(model, None)
    return model, dense


def test_shared_module_saved_once_and_relinked(tmp_path):
    model, dense = _shared_model()
    x = torch.randn(5, 8)
    # the hub is counted once, at fp16; the layers store only their biases
    assert netshrink.model_bits(model) == 192 * 16 + (16 + 4) * 32
    size = netshrink.save(model, tmp_path / "s.nsk")
    assert size == netshrink.model_bits(model) // 8 + inspect_file(tmp_path / "s.nsk")[
        "header_bytes"]
    loaded = netshrink.load(tmp_path / "s.nsk", dense)
    assert torch.equal(loaded(x), model(x))
    assert loaded.a.hub is loaded.hub and loaded.b.hub is loaded.hub
    # deep copies and dtype moves keep the sharing
    twin = copy.deepcopy(loaded).double()
    assert twin.a.hub is twin.hub
    assert torch.allclose(twin(x.double()).float(), model(x), atol=1e-6)
    rep = netshrink.report(loaded)
    assert [r.name for r in rep.layers] == ["a", "b", "hub"]
    assert "shared" in str(rep)
    assert [n for n, _ in stored_modules(loaded)] == ["a", "b", "hub"]


def test_attached_module_cannot_overwrite_a_model_module(tmp_path):
    model, dense = _shared_model()
    netshrink.save(model, tmp_path / "s.nsk")
    clash = copy.deepcopy(dense)
    clash.hub = nn.Linear(2, 2)
    with pytest.raises(FormatError, match="already has"):
        netshrink.load(tmp_path / "s.nsk", clash)


def test_compress_does_not_touch_layers_inside_stored_modules():
    model, _ = _shared_model()
    model.extra = nn.Linear(64, 64)
    small = netshrink.compress(model, target="4bit")
    kinds = {n: m.kind for n, m in stored_modules(small)}
    assert kinds == {"a": "test-sliced", "b": "test-sliced", "hub": "test-table",
                     "extra": "palette"}
