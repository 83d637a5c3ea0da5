import os

import pytest
import torch
from torch import nn

import netshrink
from netshrink.errors import ConfigError
from netshrink.fileformat import inspect_file
from netshrink.layers import PalettizedLayer, compressed_layers
from netshrink.methods.dkm import (
    DKMLayer,
    dkm,
    finalize_model,
    naive_dkm,
    protocol_overrides,
    soft_weights,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin contention on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = netshrink.Finetune(epochs=1, max_steps_per_epoch=3, progress=False, lr=1e-3)


@pytest.mark.parametrize("d,bits,stop,unique", [(1, 1, "centroids", False),
                                                (1, 3, "inertia", False),
                                                (2, 2, "centroids", False),
                                                (4, 3, "centroids", False),
                                                (1, 2, "centroids", True)])
def test_lean_gradients_equal_naive_unrolled(d, bits, stop, unique):
    g = torch.Generator().manual_seed(d * 10 + bits)
    x = torch.randn(120, d, generator=g, dtype=torch.float64)
    if unique:  # repeated values, as in 16-bit weights
        x = (x * 4).round() / 4
    c0 = x[torch.randperm(120, generator=g)[:2**bits]].clone()
    up = torch.randn(120, d, generator=g, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    out1, c1, steps = naive_dkm(x1, c0, 0.05, 5, 1e-4, stop)
    (out1 * up).sum().backward()
    x2 = x.clone().requires_grad_()
    out2, c2, steps2 = dkm(x2, c0, 0.05, 5, 1e-4, stop, unique, chunk_elements=64)  # many chunks
    (out2 * up).sum().backward()
    assert steps2 == steps >= 2  # gradients really pass through several iterations
    assert torch.allclose(out1, out2, atol=1e-12) and torch.allclose(c1, c2, atol=1e-12)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-9, atol=1e-9)
    assert x1.grad.abs().max() > 1e-3


def test_sixteen_bit_uniquification_matches_reference():
    x = (torch.randn(400, 1, generator=torch.Generator().manual_seed(0)) * 0.3).bfloat16()
    c0 = x[:8].double()
    up = torch.randn(400, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x1 = x.double().requires_grad_()
    (naive_dkm(x1, c0, 0.01)[0] * up).sum().backward()
    x2 = x.clone().requires_grad_()
    (dkm(x2, c0, 0.01, unique=True)[0].double() * up).sum().backward()
    assert x2.grad.dtype == torch.bfloat16
    assert torch.allclose(x2.grad.double(), x1.grad, rtol=2e-2, atol=2e-2 * x1.grad.abs().max())


@pytest.mark.parametrize("d", [1, 2])
def test_compress_finetune_save_reload(d, small_net, toy_loader, images, tmp_path):
    small = netshrink.compress(small_net, method="dkm", target="2bit", data=toy_loader,
                               finetune=FAST, min_weights=256, cluster_dim=d,
                               overrides={"dw": {"cluster_dim": 1}})
    layers = dict(compressed_layers(small))
    assert set(layers) == {"conv", "dw", "pw", "fc"}
    for name, layer in layers.items():
        assert type(layer) is PalettizedLayer  # snapped into the foundation's layer
        dim = 1 if name == "dw" else d
        assert layer.codebook.shape == (2 ** (2 * dim), dim)
        rows = layer.decode_weight().reshape(layer.n_rows, -1)
        vectors = (rows / layer.scale[:, None]).reshape(-1, dim)
        assert torch.unique(vectors, dim=0).shape[0] <= 2 ** (2 * dim)
    path = tmp_path / "m.nsk"
    written = netshrink.save(small, path)
    assert os.path.getsize(path) == written
    assert written == netshrink.model_bits(small) // 8 + inspect_file(path)["header_bytes"]
    out = small(images)
    assert torch.equal(netshrink.load(path, small_net)(images), out)


def test_conv_and_linear_vectors_and_training_moves_weights(small_net, toy_loader):
    prepared = netshrink.compress(small_net, method="dkm", target="1bit", min_weights=256,
                                  cluster_dim=4, overrides={"dw": None}, finalize=False,
                                  per_channel=False)
    layers = dict(compressed_layers(prepared))
    assert all(isinstance(m, DKMLayer) for m in layers.values())
    assert {type(m.host) for m in layers.values()} == {nn.Conv2d, nn.Linear}
    assert layers["conv"].codebook.shape == (16, 4)
    before = {n: m.latent.detach().clone() for n, m in layers.items()}
    centroids = {n: m.codebook.detach().clone() for n, m in layers.items()}
    netshrink.train.fit(prepared, toy_loader, FAST, teacher=small_net)
    for n, m in layers.items():
        assert not torch.equal(m.latent, before[n]), n  # gradients reach the weights
        assert not torch.equal(m.codebook, centroids[n]), n  # centroids updated in forward
    x = torch.randn(4, 1, 12, 12)
    hard = prepared(x)
    with soft_weights(prepared):
        soft = prepared(x)
    assert not torch.allclose(hard, soft)
    assert torch.equal(prepared(x), hard)  # measuring the soft model changed nothing
    finalize_model(prepared)
    # finalize is the evaluation-mode snap, up to the fp16 rounding of the LUT
    assert torch.allclose(prepared(x), hard, rtol=1e-2, atol=1e-3)
    for m in dict(compressed_layers(prepared)).values():
        assert torch.unique(m.decode_weight().reshape(-1, 4), dim=0).shape[0] <= 16


def test_size_target_allocates_bits_and_is_met(small_net):
    small = netshrink.compress(small_net, method="dkm", target="x4", min_weights=256,
                               cluster_dim=1)
    assert 8 * len(netshrink.fileformat.to_bytes(small)) <= netshrink.size.fp32_bits(small_net) / 4
    bits = {n: m.bits for n, m in compressed_layers(small)}
    assert all(1 <= b <= 8 for b in bits.values())


def test_protocols(small_net):
    t1 = protocol_overrides(small_net, "table1")
    assert t1["overrides"] == {"stem": None, "fc": None}
    small = netshrink.compress(small_net, method="dkm", target="2bit", **t1)
    assert {n for n, _ in compressed_layers(small)} == {"conv", "pw"}  # dw: < 1024 weights
    f4 = protocol_overrides(small_net, "fig4")
    small = netshrink.compress(small_net, method="dkm", target="2bit", **f4)
    bits = {n: m.bits for n, m in compressed_layers(small)}
    assert bits == {"stem": 8, "conv": 8, "dw": 8, "pw": 8, "fc": 8}  # all < 10k weights


def test_tau_relative_and_paper(small_net):
    rel = netshrink.compress(small_net, method="dkm", target="2bit", min_weights=256,
                             finalize=False, per_channel=False)
    paper = netshrink.compress(small_net, method="dkm", target="2bit", min_weights=256,
                               finalize=False, per_channel=False, tau="resnet-2bit")
    assert paper.conv.tau == 2e-5
    assert rel.conv.tau != rel.fc.tau  # scale-relative: one per layer


@pytest.mark.parametrize("options,match", [
    ({"bits": 0}, "bits must be an integer in 1..16"),
    ({"bits": 17}, "bits must be an integer in 1..16"),
    ({"cluster_dim": 0}, "cluster_dim"),
    ({"tau": "nope"}, "tau preset"),
    ({"tau": -1.0}, "tau must be > 0"),
    ({"stop": "never"}, "stop must be"),
    ({"unique": True, "cluster_dim": 2}, "needs cluster_dim=1"),
])
def test_bad_configs(options, match, small_net):
    with pytest.raises(ConfigError, match=match):
        netshrink.compress(small_net, method="dkm", target="2bit", **options)


def test_cluster_dim_must_divide_rows(small_net):
    with pytest.raises(ConfigError, match="does not divide"):
        netshrink.compress(small_net, method="dkm", target="2bit", min_weights=256,
                           cluster_dim=2)  # dw has rows of 9
    with pytest.raises(ConfigError, match="bits per vector"):
        netshrink.compress(small_net, method="dkm", target="8bit", min_weights=256,
                           cluster_dim=4, overrides={"dw": None})


def test_sixteen_bit_model_uses_uniquification():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8)).to(torch.bfloat16)
    prepared = netshrink.compress(model, method="dkm", target="3bit", finalize=False)
    layers = dict(compressed_layers(prepared))
    assert all(m.unique and m.latent.dtype == torch.bfloat16 for m in layers.values())
    prepared.train()
    prepared(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().sum().backward()
    assert all(m.latent.grad is not None and m.latent.grad.abs().sum() > 0
               for m in layers.values())
    finalize_model(prepared)
    for m in dict(compressed_layers(prepared)).values():
        w = (m.decode_weight().float() / m.scale[:, None]).reshape(-1)
        assert torch.unique(w).numel() <= 8


def test_report_states_tau_rule_range_and_iterations(small_net, saved_reports):
    """The snapped layers no longer carry tau: the report (and the saved file) keep the
    rule, the layers' tau range and the soft k-means iteration rule."""
    kw = dict(min_weights=0, seed=0)
    soft = netshrink.compress(small_net, "dkm", "2bit", finalize=False, **kw)
    taus = [m.tau for _, m in compressed_layers(soft)]
    small = netshrink.compress(small_net, "dkm", "2bit", **kw)
    for rep in saved_reports(small, small_net):
        line = next(n for n in rep.notes if n.startswith("dkm: "))
        assert "tau = 0.1 x each layer's initial k-means distortion" in line
        assert f"layer taus {min(taus):.3g} .. {max(taus):.3g}" in line
        assert "up to 5 iterations per training step (stop 'centroids'" in line
        assert rep.facts["tau_max"] == pytest.approx(max(taus))
    paper = netshrink.compress(small_net, "dkm", "2bit", tau="resnet-2bit", **kw)
    note = netshrink.report(paper).notes[0]
    assert note.startswith("dkm: tau = resnet-2bit (2e-05); layer taus 2e-05 .. 2e-05")
