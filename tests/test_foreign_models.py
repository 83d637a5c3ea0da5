"""Models netshrink did not write: torchvision's resnet18 and mobilenet_v2 (no weights)
compress, save and reload bit-identically; depthwise convs and the classifier are handled."""

import pytest
import torch

import netshrink
from netshrink.compat import torchvision_shim
from netshrink.layers import compressed_layers


def _torchvision():
    """torchvision on this CPU build needs its two operator schemas defined first."""
    torchvision_shim()
    return pytest.importorskip("torchvision")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_round_trip(arch, tmp_path):
    tv = _torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, arch)(num_classes=10).eval()
    small = netshrink.compress(model, target="x8")
    rep = netshrink.report(small)
    assert rep.ratio >= 8
    names = {n for n, _ in compressed_layers(small)}
    assert len(names) > 10
    x = torch.randn(2, 3, 64, 64)
    out = small(x)
    path = tmp_path / f"{arch}.nsk"
    netshrink.save(small, path)
    with torch.device("meta"):
        like = getattr(tv.models, arch)(num_classes=10)
    assert torch.equal(netshrink.load(path, like)(x), out)
    if arch == "mobilenet_v2":  # depthwise convs compressed, with per-channel scales
        dw = [layer for _, layer in compressed_layers(small) if getattr(layer, "groups", 1) > 1]
        assert dw and all(layer.scale is not None for layer in dw)
