"""The calibration stage (calibrate.py, capture.py, gptq.py): input moments, GPTQ codes,
refits, the compress switch and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink
from netshrink import Calibrate, ConfigError, DataError
from netshrink.capture import capture, plan_groups, trial
from netshrink.fileformat import build_manifest, to_bytes
from netshrink.gptq import (
    decode,
    factor,
    gptq_codes,
    output_error,
    refit_codebook,
    refit_scale,
)
from netshrink.kmeans import kmeans
from netshrink.layers import weight_rows
from netshrink.methods.kmeans import palettize


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer (weight (in, out), x @ W via addmm)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


class SamePadConv(nn.Conv2d):
    """EfficientNet-style static same padding applied in forward (a foreign conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 2, 0, 1)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


CASES = [
    ("linear", lambda: nn.Linear(12, 5, bias=False), (7, 3, 12)),
    ("gpt2-conv1d", lambda: Conv1D(5, 12), (7, 3, 12)),
    ("conv", lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), (3, 4, 7, 6)),
    ("conv-reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect",
                                       bias=False), (3, 4, 7, 6)),
    ("conv-grouped-strided", lambda: nn.Conv2d(4, 8, 3, stride=2, groups=2, dilation=1,
                                               bias=False), (3, 4, 9, 8)),
    ("conv-depthwise-same", lambda: nn.Conv2d(4, 4, 3, padding="same", groups=4,
                                              dilation=2, bias=False), (3, 4, 8, 8)),
    ("conv-pointwise", lambda: nn.Conv2d(4, 6, 1, bias=False), (3, 4, 5, 5)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=2, bias=False), (3, 4, 9)),
    ("same-pad-subclass", lambda: SamePadConv(4, 6, 3, bias=False), (3, 4, 7, 6)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_moment_equals_the_explicit_one(name, make, shape):
    """sum over the layer's outputs of y_c^2 equals w_c^T H_g(c) w_c for every output
    channel c (the layer computing with its decoded weight): H is X^T X of exactly the
    vectors the weight multiplies, one per group."""
    torch.manual_seed(0)
    module = make()
    if isinstance(module, Conv1D):
        with torch.no_grad():
            module.bias.zero_()
    layer = palettize(module, 8)
    model = nn.Sequential(layer)
    x = torch.randn(*shape)
    probes = trial(model, {"0": layer}, x[:1])
    hs = capture(model, {"0": layer}, [probes["0"]], [x[:2], x[2:]])
    h = hs["0"]
    with torch.no_grad():
        y = layer(x)
    rows = weight_rows(layer.decode_weight().double(), layer.out_axis)
    y = y.double()
    per_channel = (y.reshape(-1, y.shape[-1]).T if name in ("linear", "gpt2-conv1d")
                   else y.movedim(1, 0).reshape(y.shape[1], -1))
    energy = (per_channel ** 2).sum(1)
    g = h.shape[0]
    per = rows.shape[0] // g
    expected = torch.stack([rows[c] @ h[c // per] @ rows[c] for c in range(rows.shape[0])])
    assert g == (module.groups if isinstance(module, nn.Conv2d) else 1)
    torch.testing.assert_close(expected, energy, rtol=1e-5, atol=1e-6)
    if name == "linear":
        flat = x.reshape(-1, 12).double()
        torch.testing.assert_close(h[0], flat.T @ flat, rtol=1e-5, atol=1e-5)


def _correlated_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 16, 32, generator=g)
    mix = torch.randn(32, 32, generator=g) * 0.3 + torch.eye(32)
    x = torch.randn(512, 32, generator=g) @ mix
    h = (x.T @ x).double()[None]
    values = kmeans(w.reshape(-1), 4, seed=0).centroids[:, 0]
    return w, h, values


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    w, h, values = _correlated_problem()
    rtn = torch.argmin((w[..., None] - values).abs(), -1)
    codes = gptq_codes(w, factor(h), values, None)
    assert output_error(w, decode(values, codes, None), h) < output_error(
        w, decode(values, rtn, None), h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refits_never_increase_the_output_error(seed):
    w, h, values = _correlated_problem(seed)
    scale = w.abs().amax(-1)
    wn_values = values / values.abs().max()
    codes = gptq_codes(w, factor(h), wn_values, scale)
    before = output_error(w, decode(wn_values, codes, scale), h)
    fitted = refit_codebook(w, h, codes, 4, scale)
    after = output_error(w, decode(fitted, codes, scale), h)
    assert after <= before * (1 + 1e-6)
    new_scale = refit_scale(w, h, codes, fitted, scale)
    assert output_error(w, decode(fitted, codes, new_scale), h) <= after * (1 + 1e-6)


def test_weighted_kmeans():
    x = torch.tensor([0.0, 0.1, 1.0, 1.1, 5.0])
    plain = kmeans(x, 2, seed=0)
    same = kmeans(x, 2, seed=0, weights=torch.ones(5))
    torch.testing.assert_close(plain.centroids, same.centroids)
    ignored = kmeans(x, 2, seed=0, init=torch.tensor([[0.0], [1.0]]),
                     weights=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert sorted(ignored.centroids[:, 0].tolist()) == pytest.approx([0.05, 1.05])
    with pytest.raises(ValueError):
        kmeans(x, 2, weights=torch.ones(4))


def _compress(net, loader, calibrate, method="kmeans", **kw):
    return netshrink.compress(net, method, "3bit", data=loader, calibrate=calibrate,
                              min_weights=0, **kw)


def test_calibration_lowers_output_error_and_keeps_the_file_layout(small_net, toy_loader):
    plain = _compress(small_net, toy_loader, False)
    calibrated = _compress(small_net, toy_loader, Calibrate(samples=64))
    record = calibrated.netshrink_info["calibration"]
    assert record["samples"] == 64 and record["source"] == "data"
    assert set(record["layers"]) == {"stem", "conv", "dw", "pw", "fc"}
    assert {e["kept"] for e in record["layers"].values()} <= {"plan", "calibrated"}
    # min_vectors=4: the classifier sees one 48-long vector per sample, 64 < 4 x 48
    fewer = _compress(small_net, toy_loader, Calibrate(samples=64, min_vectors=4))
    assert set(fewer.netshrink_info["calibration"]["layers"]) == {"stem", "conv", "dw", "pw"}
    assert "64 calibration vectors for 48 inputs" in (
        fewer.netshrink_info["calibration"]["not_applicable"]["fc"])
    for errors in record["layers"].values():
        assert errors["after"] <= errors["before"]
    assert record["mean_error_after"] < record["mean_error_before"]
    assert "calibration:" in netshrink.report(calibrated).summary()
    # same plan: the same stored tensors, encodings, shapes and offsets; nothing of the
    # run is saved, and the file is exactly as large
    (m1, b1), (m2, b2) = build_manifest(plain), build_manifest(calibrated)
    assert {k: v.shape for k, v in b1.items()} == {k: v.shape for k, v in b2.items()}
    assert "calibration" not in m2["info"]
    # the manifests differ only in the per-layer SQNR numbers (other values, same form)
    assert set(m1["info"]["layers"]) == set(m2["info"]["layers"])
    m1["info"]["layers"] = m2["info"]["layers"] = None
    assert m1 == m2
    size = len(to_bytes(plain))
    # the header's zlib-compressed digits may move the file by one 8-byte header pad,
    # within the slack planning reserves for them (api._header_slack)
    assert abs(len(to_bytes(calibrated)) - size) <= 8
    assert netshrink.model_bits(plain) == netshrink.model_bits(calibrated)
    x = next(iter(toy_loader))[0]
    with torch.no_grad():
        ref = small_net(x)
        assert F.mse_loss(calibrated(x), ref) < F.mse_loss(plain(x), ref)


def test_auto_rules(small_net, toy_loader):
    def calibrated(model):
        return "calibration" in model.netshrink_info
    assert calibrated(_compress(small_net, toy_loader, "auto"))
    few = _compress(small_net, [(torch.randn(20, 1, 12, 12),)], "auto")
    assert few.netshrink_info["calibration"]["samples"] == 20  # auto takes what there is
    assert not calibrated(_compress(small_net, None, "auto"))
    assert not calibrated(_compress(small_net, toy_loader, False))
    assert not calibrated(_compress(small_net, toy_loader, None))
    assert not calibrated(_compress(small_net, toy_loader, "auto",
                                    finetune=netshrink.Finetune(epochs=1, max_steps_per_epoch=1)))
    assert not calibrated(netshrink.compress(small_net, "alds", "x2", data=toy_loader,
                                             min_weights=0))
    dkm = _compress(small_net, toy_loader, "auto", method="dkm")
    assert calibrated(dkm) and len(dkm.netshrink_info["calibration"]["layers"]) == 5


def test_data_free_calibration_on_a_batchnorm_net(small_net):
    out = _compress(small_net, None, Calibrate(samples=8, input_shape=(1, 12, 12),
                                               synthetic_iters=5))
    record = out.netshrink_info["calibration"]
    assert record["source"] == "synthetic" and record["samples"] == 8
    assert "(synthetic)" in netshrink.report(out).summary()


def test_calibrate_true_needs_data_or_batchnorm():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(ConfigError, match="BatchNorm"):
        _compress(net, None, True)
    with pytest.raises(ConfigError, match="input_shape"):
        _compress(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), None, True)


@pytest.mark.parametrize("bad", [
    dict(samples=0), dict(memory_mb=0), dict(damp=0.0), dict(passes=0), dict(max_layers=0),
    dict(input_shape=(3, 4)),
])
def test_calibrate_options_checked_when_built(bad):
    with pytest.raises(ConfigError):
        Calibrate(**bad)


def test_bad_calibration_data_fails_before_any_work(small_net, monkeypatch):
    from netshrink.methods.kmeans import KMeansMethod

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the calibration data was checked")
    monkeypatch.setattr(KMeansMethod, "apply", no_work)
    monkeypatch.setattr(KMeansMethod, "plan", no_work)
    good = torch.randn(32, 1, 12, 12)
    nan = good.clone()
    nan[3, 0, 0, 0] = float("nan")
    cases = [
        ([(torch.randn(16, 3, 12, 12),)], 16, "do not run through the model"),
        ([(torch.ones(16, 1, 12, 12, dtype=torch.long),)], 16, "dtype int64"),
        ([(good,)], 64, "asked for 64 samples, the data gave 32"),
        ([(nan,)], 16, "NaN"),
        ([(good.clamp(-3, 3) * 1e38,)], 16, "non-finite activations"),
        ([("text", "labels")], 16, "calibration data"),
    ]
    for data, samples, message in cases:
        with pytest.raises(DataError, match=message):
            _compress(small_net, data, Calibrate(samples=samples))
    with pytest.raises(ConfigError):
        _compress(small_net, [(good,)], "sometimes")
    for bad in ({"holdout": 1.0}, {"holdout": -0.1}, {"min_vectors": -1}, {"max_bits": 0}):
        with pytest.raises(ConfigError):
            Calibrate(**bad)


def test_memory_bound_limits_the_layers_captured_at_once(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    data = [(torch.randn(16, 32),)]
    seen: list[int] = []
    import netshrink.calibrate as calibrate_module
    real = calibrate_module.capture

    def counting(model, layers, group, inputs, desc="", counts=None):
        seen.append(len(group))
        return real(model, layers, group, inputs, desc, counts)
    monkeypatch.setattr(calibrate_module, "capture", counting)
    h_mb = 8 * 32 * 32 / 2**20
    out = _compress(net, data, Calibrate(samples=16, memory_mb=2.5 * h_mb, holdout=0))
    assert seen == [2, 2, 2]
    assert out.netshrink_info["calibration"]["max_layers_at_once"] == 2
    seen.clear()
    _compress(net, data, Calibrate(samples=16, max_layers=1, holdout=0))
    assert seen == [1] * 6
    probes = trial(out, dict(out.named_children()), data[0][0][:1])
    assert [len(g) for g in plan_groups(list(probes.values()), 1e-9, None)] == [1] * 6


def test_calibration_followed_by_block_reconstruction(small_net, toy_loader):
    """Calibrate(reconstruct=Reconstruct(...)): the same inputs then reconstruct the
    blocks; the output error falls, the stored bits stay, the report says so."""
    from netshrink import Reconstruct

    gptq = _compress(small_net, toy_loader, Calibrate(samples=64))
    both = _compress(small_net, toy_loader,
                     Calibrate(samples=64, reconstruct=Reconstruct(steps=20, batch_size=16,
                                                                   progress=False)))
    rec = both.netshrink_info["calibration"]["reconstruct"]
    assert rec["samples"] == 64 and rec["output_error_after"] <= rec["output_error_before"]
    assert "block reconstruction:" in netshrink.report(both).summary()
    assert netshrink.model_bits(both) == netshrink.model_bits(gptq)
    x = next(iter(toy_loader))[0]
    with torch.no_grad():
        ref = small_net(x)
        assert F.mse_loss(both(x), ref) <= F.mse_loss(gptq(x), ref) * 1.05
    with pytest.raises(netshrink.ConfigError, match="reconstruct"):
        Calibrate(reconstruct=True)


def test_held_out_samples_keep_the_plan_when_the_fit_does_not_carry_over():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16))
    basis = torch.randn(4, 32)
    fitting = torch.randn(120, 4) @ basis  # the fitting samples span 4 of 32 directions
    held = torch.randn(40, 32)  # the held-out ones span them all
    data = [(torch.cat([fitting, held]),)]
    overfit = _compress(net, data, Calibrate(samples=160, min_vectors=1, holdout=0))
    chosen = _compress(net, data, Calibrate(samples=160, min_vectors=1, holdout=0.25))
    plain = _compress(net, data, False)
    assert overfit.netshrink_info["calibration"]["layers"]["0"]["kept"] == "calibrated"
    record = chosen.netshrink_info["calibration"]["layers"]["0"]
    assert record["kept"] == "plan" and record["after"] == record["before"]
    assert torch.equal(chosen[0].codes, plain[0].codes)
    assert not torch.equal(overfit[0].codes, plain[0].codes)


def test_wide_codes_keep_the_plan_with_max_bits_and_under_auto(small_net, toy_loader):
    def record(calibrate):
        small = netshrink.compress(small_net, "kmeans", "6bit", data=toy_loader,
                                   min_weights=0, calibrate=calibrate)
        return small.netshrink_info["calibration"]
    limited = record(Calibrate(samples=64, max_bits=4))
    assert limited["layers"] == {}
    assert "6-bit codes, above max_bits=4" in limited["not_applicable"]["conv"]
    assert "conv" in record(Calibrate(samples=64))["layers"]  # explicit: every width
    auto = record("auto")  # near-lossless plans (> 4.5 bits per weight) are left alone
    assert auto["layers"] == {} and "6.00 here" in auto["not_applicable"]["conv"]
    assert record(Calibrate(samples=64, max_bits=6))["layers"]
