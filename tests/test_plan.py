"""The plan/apply shape: planning is pure and repeated, apply runs once, the plan's sizes
are the declaration's, and bad input is refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netshrink
from netshrink.layers import PalettizedLayer, compressed_layers
from netshrink.methods import get_method
from netshrink.palette import palette_bits
from netshrink.size import Budget, Option, fp32_bits, parse_target


@pytest.mark.parametrize("method", netshrink.methods())
def test_apply_runs_once_and_builds_what_was_planned(method, small_net, monkeypatch):
    algo = get_method(method)
    calls = {"plan": 0, "apply": 0}
    plans = []
    plan, apply = type(algo).plan, type(algo).apply

    def counting_plan(self, request, survey, budget):
        calls["plan"] += 1
        plans.append(plan(self, request, survey, budget))
        return plans[-1]

    def counting_apply(self, model, p, request):
        calls["apply"] += 1
        return apply(self, model, p, request)

    monkeypatch.setattr(type(algo), "plan", counting_plan)
    monkeypatch.setattr(type(algo), "apply", counting_apply)
    small = netshrink.compress(small_net, method, "x3", min_weights=0,
                               **({"permute_iters": 200} if method == "pqf" else {}))
    assert calls["apply"] == 1 and calls["plan"] >= 1
    built = {name: layer.spec() for name, layer in compressed_layers(small)}
    assert built == {name: spec for name, spec in plans[-1].layers.items()}


@pytest.mark.parametrize("k,d,scale,dtype", [(2, 1, False, "float16"), (16, 1, True, "float16"),
                                             (256, 4, True, "bfloat16"), (8, 9, False, "float32")])
def test_palette_bits_is_the_layer_declaration(k, d, scale, dtype):
    conv = nn.Conv2d(12, 7, 3, bias=False)
    rows, row_len = 7, 12 * 9
    codes = torch.randint(0, k, (rows, row_len // d))
    layer = PalettizedLayer(conv, codes, torch.randn(k, d), torch.ones(rows) if scale else None,
                            dtype)
    declared = sum(enc.nbits(t.numel()) for t, enc in layer.stored().values())
    assert declared == palette_bits(rows * row_len // d, (k - 1).bit_length(), d,
                                    rows if scale else 0, dtype)


def test_budget_charges_code_bits_for_bits_targets_and_everything_otherwise():
    option = Option("b", stored_bits=1000, code_bits=600, distortion=1.0)
    bits = Budget(parse_target("3bit"), baseline_bits=10_000, fixed_bits=500, n_weights=300)
    size = Budget(parse_target("x4"), baseline_bits=10_000, fixed_bits=500, n_weights=300,
                  header_bits=100)
    assert bits.cost_of(option) == 600 and bits.available() == 900
    assert size.cost_of(option) == 1000 and size.available() == 10_000 / 4 - 100 - 500
    with pytest.raises(netshrink.InfeasibleTargetError, match="bits per weight"):
        raise bits.infeasible(1200, "at one bit")


@pytest.mark.parametrize("method", netshrink.methods())
def test_non_finite_tensors_are_named_before_any_work(method, small_net):
    with torch.no_grad():
        small_net.conv.weight[0, 0, 0, 0] = float("nan")
        small_net.pw.bias[3] = float("inf")
        small_net.bn1.running_var[0] = float("nan")
    with pytest.raises(netshrink.NonFiniteError) as err:
        netshrink.compress(small_net, method, "x3", min_weights=0)
    assert all(name in str(err.value) for name in ("conv.weight", "pw.bias",
                                                   "bn1.running_var"))


def test_pqf_keeps_a_stem_conv_dense_but_not_a_first_linear():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    small = netshrink.compress(mlp, "pqf", "x8", permute_iters=100)
    assert {n for n, _ in compressed_layers(small)} >= {"0", "2"}
    convnet = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    small = netshrink.compress(convnet, "pqf", "x8", min_weights=0, permute_iters=100)
    assert {n for n, _ in compressed_layers(small)} == {"2"}
    assert any("0 (stem, as in the paper)" in line for line in netshrink.report(small).notes)


@pytest.mark.parametrize("target", ["x30", "2000B", "0.5bit"])
def test_infeasible_error_names_a_target_that_is_met(target, tmp_path):
    """InfeasibleTargetError.feasible is the tightest target checked by planning at it:
    compressing at it succeeds and the file meets it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    with pytest.raises(netshrink.InfeasibleTargetError) as caught:
        netshrink.compress(model, "kmeans", target, min_weights=256)
    feasible = caught.value.feasible
    assert feasible is not None and feasible != target
    size = netshrink.save(netshrink.compress(model, "kmeans", feasible, min_weights=256),
                          tmp_path / "m.nsk")
    tgt = netshrink.parse_target(feasible)
    if tgt.kind == "bytes":
        assert size <= tgt.value
    elif tgt.kind == "ratio":
        assert size * tgt.value <= fp32_bits(model) / 8
