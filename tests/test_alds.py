"""ALDS (`alds`): grouped low-rank layers, the error bounds, the solver and the budget."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink
from netshrink.errors import ConfigError, InfeasibleTargetError
from netshrink.layers import compressed_layers
from netshrink.methods.alds import LowRankLayer, factorize, parameter_count
from netshrink.methods.alds.flops import count_macs
from netshrink.methods.alds.profile import measured_error, profile_layer
from netshrink.methods.alds.solver import solve, solve_alds


class SamePadConv(nn.Conv2d):
    """A conv with its own forward (TF 'same' padding, like EfficientNet-Lite's convs)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class Net(nn.Module):
    """~40k parameters: every kind ALDS factorises, a depthwise conv it skips, BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv = nn.Conv2d(24, 48, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.same = SamePadConv(48, 32, 3)
        self.pw = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64, 60)
        self.head = nn.Linear(60, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x)))
        x = torch.relu(self.pw(self.same(self.dw(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(4, 3, 12, 12)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(12, 10, 3, stride=2, padding=2, dilation=2),
                                  lambda: SamePadConv(12, 10, 3),
                                  lambda: nn.Conv2d(12, 10, 3, padding=1,
                                                    padding_mode="reflect"),
                                  lambda: nn.Linear(12, 10)])
@pytest.mark.parametrize("k", [1, 3, 12])
def test_full_rank_reproduces_the_layer(make, k):
    torch.manual_seed(0)
    dense = make()
    inputs = torch.randn(2, 12, 9, 9) if isinstance(dense, nn.Conv2d) else torch.randn(5, 12)
    want = dense(inputs)
    w = dense.weight.detach().clone()
    jmax = min(w.shape[0], w[0].numel() // k)
    import copy
    layer = LowRankLayer(copy.deepcopy(dense), *factorize(w, k, jmax), k)
    assert _rel(layer(inputs), want) < 1e-4
    assert _rel(layer.decode_weight(), w) < 1e-4
    # the forward really runs a grouped encoder: j*k channels, k groups
    assert layer.encoder.shape[0] == jmax * k and layer.groups == k


def test_k1_bound_equals_measured_error():
    torch.manual_seed(0)
    w = torch.randn(20, 6, 3, 3)
    prof = profile_layer("w", w, 1.0, float(w.numel()))
    for j in (1, 3, 7, prof.tables[1].jcap):
        enc, dec = factorize(w, 1, j)
        approx = (dec @ enc.reshape(j, -1)).reshape(w.shape)
        err = measured_error(w, approx)
        assert prof.tables[1].err("paper")[j - 1] == pytest.approx(err, rel=1e-6)
        assert prof.tables[1].err("code")[j - 1] == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_grouped_error_lies_between_code_and_paper(k):
    torch.manual_seed(k)
    w = torch.randn(16, 6, 3, 3)
    prof = profile_layer("w", w, 1.0, float(w.numel()))
    table = prof.tables[k]
    for j in range(1, table.jcap + 1, 2):
        layer = LowRankLayer(nn.Conv2d(6, 16, 3),
                             *factorize(w, k, j), k)
        err = measured_error(w, layer.decode_weight())
        code, paper = table.err("code")[j - 1], table.err("paper")[j - 1]
        assert code * (1 - 1e-6) <= err <= paper * (1 + 1e-6)
        assert paper == pytest.approx(math.sqrt(k) * code)


def test_report_states_keep_ratio_and_flops_kept(net, x, saved_reports):
    """With keep_ratio the report's target is the keep ratio (not compress's default
    '4bit'), and it states requested and achieved parameter share and FLOPs kept, also
    from the saved file."""
    total = parameter_count(net)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    small = netshrink.compress(net, "alds", keep_ratio=0.5, min_weights=0, data=data)
    kept = parameter_count(small)
    macs, dense = count_macs(small, x[:1]), count_macs(net, x[:1])
    assert macs < dense
    for rep in saved_reports(small, net):
        assert rep.target == "keep_ratio 0.5"
        line = next(n for n in rep.notes if n.startswith("alds keep_ratio 0.5: "))
        assert f"kept {kept} of {total} parameters ({kept / total:.4f})" in line
        assert f"FLOPs kept {macs / dense:.4f} ({macs} of {dense} multiply-adds" in line
        assert rep.facts["params_kept"] == kept and rep.facts["macs_kept"] == macs
    # without data the FLOPs are said to be unmeasured; a size target stays the target
    sized = netshrink.compress(net, "alds", "x2", min_weights=0)
    rep = netshrink.report(sized)
    assert rep.target == "x2" and "FLOPs kept not measured" in rep.notes[0]


def test_keep_ratio_met_within_one_rank_step_and_reported(net, x):
    total = parameter_count(net)
    small = netshrink.compress(net, "alds", keep_ratio=0.5, min_weights=0)
    kept = parameter_count(small)
    layers = dict(compressed_layers(small))
    assert set(layers) == {"stem", "conv", "same", "pw", "fc", "head"}
    assert kept <= 0.5 * total
    # no factorised layer's next rank step fits what is left of the budget
    steps = [m.groups * m.weight_shape[0] + math.prod(m.weight_shape[1:])
             for m in layers.values()]
    assert 0.5 * total - kept < min(steps)
    assert abs(kept / total - 0.5) < 0.005  # the paper's 0.5% tolerance, at this size
    text = str(netshrink.report(small))
    for layer in layers.values():
        assert f"k={layer.groups} groups, rank j={layer.rank}" in text
    assert count_macs(small, x) < count_macs(net, x)  # FLOPs really drop
    with torch.no_grad():
        cos = float(torch.nn.functional.cosine_similarity(
            small(x).flatten(), net(x).flatten(), dim=0))
    assert 0.85 < cos <= 1.0


def test_reload_identical_and_file_size_is_accounted(net, x, tmp_path):
    small = netshrink.compress(net, "alds", target="x2", min_weights=0)
    path = tmp_path / "m.nsk"
    size = netshrink.save(small, path)
    rep = netshrink.report(small)
    assert size == path.stat().st_size == rep.compressed_bytes + rep.header_bytes
    assert size * 8 <= netshrink.size.fp32_bits(net) / 2
    again = netshrink.load(path, net)
    assert torch.equal(again(x), small(x))
    assert [type(m) for _, m in compressed_layers(again)] == [LowRankLayer] * len(
        list(compressed_layers(small)))


def test_fp16_factors_are_counted_and_round_trip(net, x, tmp_path):
    small = netshrink.compress(net, "alds", target="x3", factor_dtype="float16",
                               min_weights=0)
    layer = dict(compressed_layers(small))["conv"]
    assert {e.name for _, e in layer.stored_extra().values()} == {"float16"}
    size = netshrink.save(small, tmp_path / "h.nsk")
    assert size * 8 <= netshrink.size.fp32_bits(net) / 3
    assert torch.equal(netshrink.load(tmp_path / "h.nsk", net)(x), small(x))


def test_layer_that_cannot_shrink_stays_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 64), nn.Linear(64, 64))
    small = netshrink.compress(model, "alds", keep_ratio=0.6, min_weights=0)
    assert type(small[0]) is nn.Linear  # any factorisation of 2x2 is not smaller
    assert isinstance(small[2], LowRankLayer)


def test_impossible_budgets_and_bad_configs(net):
    with pytest.raises(InfeasibleTargetError, match="keep_ratio 0.01 cannot be met"):
        netshrink.compress(net, "alds", keep_ratio=0.01, min_weights=0)
    with pytest.raises(InfeasibleTargetError, match="cannot be met"):
        netshrink.compress(net, "alds", target="2KB", min_weights=0)
    with pytest.raises(InfeasibleTargetError, match="cannot be met"):
        netshrink.compress(net, "alds", target="1bit", min_weights=0)
    for bad in ({"keep_ratio": 1.5}, {"keep_ratio": 0}, {"solver": "pca"},
                {"error": "exact"}, {"iters": -1}, {"factor_dtype": "int8"}):
        with pytest.raises(ConfigError):
            netshrink.compress(net, "alds", min_weights=0, **bad)
    with pytest.raises(ConfigError, match="not both"):
        netshrink.compress(net, "alds", target="x2", keep_ratio=0.5)


def _profiles(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 12, 3, 3), (24, 16, 3, 3), (32, 24, 1, 1), (10, 32)]
    return [profile_layer(str(i), torch.randn(*s, generator=g) * (1 + i), 1.0,
                          float(math.prod(s))) for i, s in enumerate(shapes)]


def test_seeded_solver_is_deterministic_and_beats_k1_baselines():
    profiles = _profiles(0)
    budget = 0.4 * sum(p.dense_size for p in profiles)
    a = solve_alds(profiles, budget, seed=3)
    b = solve_alds(profiles, budget, seed=3)
    assert [(c.k, c.j) for c in a.choices] == [(c.k, c.j) for c in b.choices]
    assert a.size <= budget
    results = {s: solve(s, profiles, budget, "paper") for s in
               ("alds-k1", "svd", "svd-energy")}
    for name, sol in results.items():
        assert sol.size <= budget, name
        assert all(c.k == 1 for c in sol.choices), name
    # minimax over a superset of the k = 1 choices (exact bisection at k = 1)
    assert a.max_error <= results["svd"].max_error + 1e-12
    assert a.max_error <= results["alds-k1"].max_error + 1e-12
    rel = [c.j / p.tables[1].jmax for p, c in zip(profiles, results["svd"].choices)]
    assert max(rel) - min(rel) < 0.15  # one relative rank (up to rounding)
    assert not np.allclose([c.j for c in a.choices], [c.j for c in results["svd"].choices])


def test_same_seed_same_bytes_and_finetune_trains_factors(net):
    before = netshrink.compress(net, "alds", keep_ratio=0.4, min_weights=0, seed=5)
    again = netshrink.compress(net, "alds", keep_ratio=0.4, min_weights=0, seed=5)
    assert netshrink.fileformat.to_bytes(before) == netshrink.fileformat.to_bytes(again)
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))), batch_size=8)
    tuned = netshrink.compress(net, "alds", keep_ratio=0.4, min_weights=0, seed=5, data=data,
                               finetune=netshrink.Finetune(epochs=1, progress=False,
                                                           distill_weight=0.0))
    assert not torch.equal(before.conv.encoder, tuned.conv.encoder)
    assert parameter_count(tuned) == parameter_count(before)
