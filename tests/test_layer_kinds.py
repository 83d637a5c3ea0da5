"""Layer subclasses and foreign kinds are compressed, not skipped, and run their own forward
with the decoded weight: outputs equal the dense module given that weight (< 1e-5)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink
from netshrink.compat import torchvision_shim
from netshrink.layers import CompressedLayer, compressed_layers, out_axis_of


class SamePadConv(nn.Conv2d):
    """TensorFlow 'SAME' padding computed in forward (as timm's Conv2dSame does)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class LoRALinear(nn.Linear):
    """A LoRA-style wrapper: frozen base weight plus a trainable low-rank update."""

    def __init__(self, n_in, n_out, rank=4):
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(n_out, rank) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


class Wrapped(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def _efficientnet_conv():
    mod = pytest.importorskip("efficientnet_lite_pytorch.utils")
    return mod.Conv2dStaticSamePadding(16, 32, 3, stride=2, image_size=15, bias=False)


def _timm_conv():
    torchvision_shim()
    layers = pytest.importorskip("timm.layers")
    return layers.Conv2dSame(16, 32, 3, stride=2)


def _gpt2_conv1d():
    torchvision_shim()
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs, weight (64, 48)


KINDS = {
    "same_pad_conv": (lambda: SamePadConv(16, 32, 3, stride=2), (2, 16, 15, 15), 0),
    "efficientnet_static_same": (_efficientnet_conv, (2, 16, 15, 15), 0),
    "timm_conv2d_same": (_timm_conv, (2, 16, 15, 15), 0),
    "gpt2_conv1d": (_gpt2_conv1d, (3, 5, 64), 1),
    "lora_linear": (lambda: LoRALinear(64, 32), (3, 64), 0),
    "conv_transpose": (lambda: nn.ConvTranspose2d(32, 16, 3, stride=2), (2, 32, 6, 6), 1),
    "conv1d_reflect": (lambda: nn.Conv1d(16, 32, 3, padding=1, padding_mode="reflect"),
                       (2, 16, 20), 0),
    "embedding": (lambda: nn.Embedding(100, 32, padding_idx=0), None, 0),
}


def _dense_with(module, weight):
    ref = copy.deepcopy(module)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("per_channel", [True, False])
def test_kind_compressed_and_matches_dense(kind, per_channel, tmp_path):
    make, shape, axis = KINDS[kind]
    torch.manual_seed(0)
    dense = Wrapped(make())
    assert out_axis_of(dense.layer) == axis
    small = netshrink.compress(dense, target="3bit", min_weights=0, per_channel=per_channel,
                               strict=True)
    layer = small.layer
    assert isinstance(layer, CompressedLayer)
    assert all("unsupported" not in r for r in netshrink.report(small).skipped.values())
    if per_channel:
        assert layer.scale.shape == (dense.layer.weight.shape[axis],)
    x = torch.randint(0, 100, (3, 7)) if shape is None else torch.randn(*shape)
    ref = _dense_with(dense.layer, layer.decode_weight())
    with torch.no_grad():
        assert (small(x) - ref(x)).abs().max() < 1e-5
    netshrink.save(small, tmp_path / "k.nsk")
    assert torch.equal(netshrink.load(tmp_path / "k.nsk", dense)(x), small(x))


def test_multihead_attention_out_proj_compressed():
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(64, 4, batch_first=True)
    small = netshrink.compress(dense, target="4bit", min_weights=0)
    out_proj = small.out_proj
    assert isinstance(out_proj, CompressedLayer)
    assert "only parameters named 'weight'" in netshrink.report(small).skipped["in_proj_weight"]
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.out_proj.weight.copy_(out_proj.decode_weight())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got, _ = small(x, x, x)
        want, _ = ref(x, x, x)
    assert (got - want).abs().max() < 1e-5


def test_transformer_encoder_layer(tmp_path):
    torch.manual_seed(0)
    dense = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True,
                                       dropout=0.0).eval()
    small = netshrink.compress(dense, target="4bit", min_weights=0)
    names = {n for n, _ in compressed_layers(small)}
    assert names == {"self_attn.out_proj", "linear1", "linear2"}
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name in names:
            ref.get_submodule(name).weight.copy_(small.get_submodule(name).decode_weight())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert (small(x) - ref(x)).abs().max() < 1e-5
    netshrink.save(small, tmp_path / "t.nsk")
    assert torch.equal(netshrink.load(tmp_path / "t.nsk", dense)(x), small(x))


def test_unknown_kind_takes_out_axis_override():
    class ColumnLinear(nn.Module):
        """Weight stored (in, out), like GPT-2's Conv1D, under another name."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 24))

        def forward(self, x):
            return x @ self.weight

    torch.manual_seed(0)
    dense = Wrapped(ColumnLinear())
    assert out_axis_of(dense.layer) == 0
    small = netshrink.compress(dense, target="4bit", min_weights=0,
                               overrides={"layer": {"out_axis": 1}})
    assert small.layer.scale.shape == (24,)
    x = torch.randn(3, 64)
    assert (small(x) - x @ small.layer.decode_weight()).abs().max() < 1e-5
    with pytest.raises(netshrink.ConfigError, match="out_axis"):
        netshrink.compress(dense, target="4bit", min_weights=0,
                           overrides={"layer": {"out_axis": 2}})


def test_attributes_read_through_to_the_host():
    torch.manual_seed(0)
    small = netshrink.compress(nn.Sequential(nn.Linear(64, 32)), target="4bit")
    layer = small[0]
    assert layer.in_features == 64 and layer.bias is layer.host.bias
    assert torch.equal(layer.weight, layer.decode_weight())
    assert not hasattr(layer.host, "weight") or not isinstance(layer.host.weight, nn.Parameter)
