import math

import pytest
import torch
from torch import nn

import netshrink
from netshrink.errors import ConfigError
from netshrink.layers import PalettizedLayer, compressed_layers


def test_methods_registry_lists_kmeans():
    assert "kmeans" in netshrink.methods()
    with pytest.raises(ConfigError, match="available"):
        netshrink.compress(nn.Linear(64, 64), method="nope")


@pytest.mark.parametrize("method", netshrink.methods())
def test_every_method_compresses_saves_and_reloads(method, small_net, images, tmp_path):
    """The shared contract every registered method must meet."""
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    small = netshrink.compress(small_net, method=method, target="x4", min_weights=256)
    assert all(torch.equal(before[k], v) for k, v in small_net.state_dict().items())
    assert any(True for _ in compressed_layers(small))
    assert netshrink.model_bits(small) <= netshrink.size.fp32_bits(small_net) / 4
    out = small(images)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    netshrink.save(small, tmp_path / "m.nsk")
    assert torch.equal(netshrink.load(tmp_path / "m.nsk", small_net)(images), out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_per_tensor_palette_has_at_most_2b_values(bits, small_net):
    small = netshrink.compress(small_net, target=f"{bits}bit", per_channel=False, min_weights=256)
    layers = dict(compressed_layers(small))
    assert set(layers) == {"conv", "dw", "pw", "fc"}
    for layer in layers.values():
        assert torch.unique(layer.decode_weight()).numel() <= 2**bits


def test_per_channel_palette_has_at_most_2b_values_per_row(small_net):
    small = netshrink.compress(small_net, target="2bit", min_weights=256)
    for _, layer in compressed_layers(small):
        w = layer.decode_weight().reshape(layer.weight_shape[0], -1)
        assert max(torch.unique(row).numel() for row in w) <= 4
        assert layer.scale is not None


def test_sqnr_rises_with_bits(small_net):
    sq = []
    for bits in (1, 2, 3, 4, 6):
        rep = netshrink.report(netshrink.compress(small_net, target=f"{bits}bit", min_weights=256))
        sq.append(min(r.sqnr_db for r in rep.layers))
    assert all(b > a for a, b in zip(sq, sq[1:])), sq
    assert sq[-1] > 30


def test_sqnr_matches_definition(small_net):
    small = netshrink.compress(small_net, target="3bit", min_weights=256)
    layer = small.conv
    w = small_net.conv.weight.detach()
    noise = float(((w - layer.decode_weight().detach()) ** 2).sum())
    expect = 10 * math.log10(float((w**2).sum()) / noise)
    assert netshrink.report(small).layers[0].name == "conv"
    assert abs(small.netshrink_info["layers"]["conv"]["sqnr_db"] - expect) < 1e-3


def test_size_targets_are_met(small_net):
    for target in ("x5", "6KB", "x4"):
        small = netshrink.compress(small_net, target=target, min_weights=256)
        t = netshrink.parse_target(target)
        limit = t.value * 8 if t.kind == "bytes" else netshrink.size.fp32_bits(small_net) / t.value
        file_bits = 8 * len(netshrink.fileformat.to_bytes(small))
        assert file_bits <= limit


def test_report_lists_skipped_with_reasons(small_net):
    small = netshrink.compress(small_net, target="4bit", min_weights=500)
    rep = netshrink.report(small)
    assert rep.skipped["stem"] == "too small (72 < 500 weights)"
    assert rep.skipped["fc"] == "too small (480 < 500 weights)"
    text = str(rep)
    assert "stem" in text and "SQNR" in text and "fp32 baseline" in text
    file_bytes = rep.compressed_bytes + rep.header_bytes
    assert rep.ratio == pytest.approx(rep.baseline_bytes / file_bytes)


def test_layer_selection_exclusion_and_overrides(small_net):
    small = netshrink.compress(small_net, target="2bit", min_weights=256,
                               overrides={nn.Conv2d: {"bits": 3}, "pw": {"bits": 5}, "dw": None})
    assert isinstance(small.conv, PalettizedLayer) and small.conv.bits == 3
    assert small.pw.bits == 5
    assert isinstance(small.dw, nn.Conv2d)
    rep = netshrink.report(small)
    assert rep.skipped["dw"] == "kept dense by override"

    only = netshrink.compress(small_net, target="4bit", layers="p*", min_weights=0)
    assert [n for n, _ in compressed_layers(only)] == ["pw"]
    assert netshrink.report(only).skipped["conv"] == "not selected"
    ex = netshrink.compress(small_net, target="4bit", exclude=[nn.Linear], min_weights=0)
    assert netshrink.report(ex).skipped["fc"] == "excluded"
    pred = netshrink.compress(small_net, target="4bit", min_weights=0,
                              layers=lambda name, m: m.weight.numel() > 2000)
    assert {n for n, _ in compressed_layers(pred)} == {"conv"}


def test_bad_config_raises(small_net):
    with pytest.raises(ConfigError, match="unknown option"):
        netshrink.compress(small_net, target="4bit", colour="red")
    with pytest.raises(ConfigError):
        netshrink.compress(small_net, target="4bit", bits=0)
    with pytest.raises(ConfigError, match="needs data"):
        netshrink.compress(small_net, target="4bit", finetune=netshrink.Finetune(epochs=1))
    with pytest.raises(ConfigError, match="no layer"):
        netshrink.compress(nn.Sequential(nn.ReLU()), target="4bit")


def test_unsupported_layers_are_skipped_with_reason():
    m = nn.Sequential(nn.Embedding(512, 64, max_norm=1.0), nn.Conv1d(64, 64, 3),
                      nn.ConvTranspose2d(64, 64, 3))
    small = netshrink.compress(m, target="4bit")
    skipped = netshrink.report(small).skipped
    assert set(skipped) == {"0"} and "max_norm" in skipped["0"]
    assert isinstance(small[1], PalettizedLayer) and isinstance(small[2], PalettizedLayer)


def test_finetune_improves_accuracy_of_2bit_model(small_net, toy_loader):
    teacher = small_net
    post = netshrink.compress(teacher, target="1bit", min_weights=256, per_channel=False)
    tuned = netshrink.compress(teacher, target="1bit", min_weights=256, per_channel=False,
                               data=toy_loader,
                               finetune=netshrink.Finetune(epochs=3, lr=3e-3, progress=False,
                                                           distill_weight=1.0))
    x = torch.cat([b[0] for b in toy_loader])
    with torch.no_grad():
        ref = teacher(x)
        err_post = float(((post(x) - ref) ** 2).mean())
        err_tuned = float(((tuned(x) - ref) ** 2).mean())
    assert err_tuned < 0.7 * err_post, (err_tuned, err_post)
    # codes frozen: still a 1-bit palette per layer
    for _, layer in compressed_layers(tuned):
        assert torch.unique(layer.decode_weight()).numel() <= 2


def test_fp16_input_and_to_keep_compressed_form(small_net, images):
    small = netshrink.compress(small_net, target="4bit", min_weights=256)
    half = small.to(torch.float64)
    assert isinstance(half.conv, PalettizedLayer)
    assert half(images.double()).dtype == torch.float64


def test_wide_codes_up_to_16_bits_round_trip(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256))
    small = netshrink.compress(m, target="12bit")
    assert small[0].bits == 12
    assert netshrink.report(small).layers[0].sqnr_db > 50
    netshrink.save(small, tmp_path / "w.nsk")
    x = torch.randn(3, 256)
    assert torch.equal(netshrink.load(tmp_path / "w.nsk", m)(x), small(x))


def test_codebook_gradients_are_deterministic():
    """Fine-tuning must give the same bytes every run: the codebook gradient (a sum over
    every weight using a codeword) must not depend on thread scheduling."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (64, 576), generator=g)
    grad_out = torch.randn(64, 576, generator=g)
    grads = set()
    for _ in range(10):
        layer = PalettizedLayer(nn.Linear(576, 64, bias=False), codes,
                                torch.linspace(-1, 1, 4)[:, None], torch.ones(64))
        (layer.decode_weight() * grad_out).sum().backward()
        grads.add(tuple(layer.codebook.grad.flatten().tolist()))
    assert len(grads) == 1


def test_method_notes_reach_info_report_and_file(small_net, saved_reports, monkeypatch):
    """A method's `Notes` from apply land in netshrink_info, the report and the saved
    manifest; a method without notes adds no keys (files as before)."""
    plain = netshrink.compress(small_net, "kmeans", "4bit", min_weights=0)
    assert "notes" not in plain.netshrink_info and "facts" not in plain.netshrink_info
    for rep in saved_reports(plain, small_net):
        assert rep.notes == [] and rep.facts == {} and rep.target == "4bit"

    from netshrink.methods import Notes
    method = netshrink.get_method("kmeans")
    apply = method.apply

    def noted(*args, **kwargs):
        apply(*args, **kwargs)
        return Notes(["kmeans: a test note"], {"answer": 42}, target="my budget")

    monkeypatch.setattr(method, "apply", noted)
    small = netshrink.compress(small_net, "kmeans", "x4", min_weights=0)
    assert small.netshrink_info["notes"] == ["kmeans: a test note"]
    for rep in saved_reports(small, small_net):
        assert rep.notes == ["kmeans: a test note"] and rep.facts == {"answer": 42}
        assert rep.target == "my budget" and "note: kmeans: a test note" in rep.summary()
