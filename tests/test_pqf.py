"""PQF: permutation keeps the function, the search only improves its objective, SR-C is no
worse than plain k-means, compress / save / load round trips, planner and config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import netshrink
import netshrink.compat
import netshrink_lab.pretrained
from netshrink.errors import ConfigError, InfeasibleTargetError
from netshrink.fileformat import header_bytes
from netshrink.kmeans import kmeans
from netshrink.layers import PalettizedLayer, channel_scales, compressed_layers, weight_rows
from netshrink.methods import get_method
from netshrink.methods.pqf import Choice, official_finetune, paper_size_bits, plan_of
from netshrink.methods.pqf.groups import analyse
from netshrink.methods.pqf.permute import ReaderState, permute_model, scorable, search
from netshrink.size import format_bytes
from netshrink_lab import zoo


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, loaded machine this is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dims(model: nn.Module, max_row: int = 10**9) -> dict[str, int]:
    """The "large" preset's d for every conv / linear whose rows it divides (rows of at
    most `max_row` entries: fewer scored readers keep the big torchvision nets quick)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            k2 = m.weight[0, 0].numel() if m.weight.dim() > 2 else 1
            d = 2 * k2 if k2 > 1 else 8
            if m.weight[0].numel() % d == 0 and m.weight[0].numel() <= max_row:
                out[name] = d
    return out


def _check_same_function(model: nn.Module, x: torch.Tensor, iters: int,
                         max_row: int = 10**9, relative: bool = False) -> None:
    """Max abs output difference < 1e-5 in float32 (relative to the largest output with
    `relative`: summation order alone moves EfficientNet's logits by ~1e-5); also in
    float64, < 1e-10 (a wrong permutation changes outputs by O(1))."""
    model.eval()
    with torch.no_grad():
        before64 = model.double()(x.double())
    model.float()
    with torch.no_grad():
        before = model(x)
    w_before = {k: v.clone() for k, v in model.state_dict().items()}
    report = permute_model(model, _dims(model, max_row), iters=iters, seed=0)
    with torch.no_grad():
        after = model(x)
    assert report.traced and report.groups
    scale = before.abs().max().item() if relative else 1.0
    assert (after - before).abs().max().item() < 1e-5 * scale
    with torch.no_grad():
        after64 = model.double()(x.double())
    assert (after64 - before64).abs().max().item() < 1e-10
    # the permutation really did something (else the check above proves nothing)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, w_before[k])]
    assert changed
    assert all(g.final <= g.identity for g in report.groups)


def _torchvision():
    netshrink.compat.torchvision_shim()
    return pytest.importorskip("torchvision")


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_small"])
def test_permutation_keeps_function_zoo(name):
    torch.manual_seed(0)
    model = zoo.create(name)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    _check_same_function(model, x, iters=200)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_permutation_keeps_function_torchvision(name):
    tv = _torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _check_same_function(model, x, iters=20, max_row=1152)


def test_permutation_keeps_function_pretrained_efficientnet():
    try:
        model = netshrink_lab.pretrained.efficientnet_lite0()
    except netshrink.errors.DataError as e:
        pytest.skip(str(e))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _check_same_function(model, x, iters=100, relative=True)


def test_groups_of_resnet20_follow_residual_streams():
    groups = analyse(zoo.create("resnet20")).groups
    # stage 1 stream: stem writer, 3 block conv2 writers, their readers; the option-A
    # shortcut pads it with zeros into the first 16 channels of the stage 2 and 3 streams,
    # so those channels (offset 0) are the same group; channels 16.. of stage 2 another
    stream = next(g for g in groups if any(m.name == "conv1" for m in g.members))
    writers = {(m.name, m.offset) for m in stream.members if m.role == "writer"}
    assert {("conv1", 0), ("layer1.0.conv2", 0), ("layer1.2.conv2", 0), ("layer2.0.conv2", 0),
            ("layer3.2.conv2", 0)} <= writers
    readers = {(m.name, m.offset) for m in stream.members if m.role == "reader"}
    assert {("layer1.0.conv1", 0), ("layer2.0.conv1", 0), ("layer3.0.conv1", 0)} <= readers
    assert stream.size == 16
    second = next(g for g in groups if ("layer2.0.conv2", 16) in {
        (m.name, m.offset) for m in g.members})
    assert ("layer3.0.conv2", 16) in {(m.name, m.offset) for m in second.members}
    # inner block channels: one writer, its BN, one reader
    inner = [g for g in groups if {m.name for m in g.members} == {
        "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}]
    assert len(inner) == 1 and inner[0].size == 16


def test_untraceable_model_gets_no_permutation_and_still_compresses(saved_reports):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(32, 64)
            self.b = nn.Linear(64, 32)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return self.b(h)

    model = Branchy()
    assert not analyse(model).traced
    small = netshrink.compress(model, "pqf", "x4", min_weights=0, keep_stem=False, anneal=2)
    assert small.netshrink_info["facts"]["permutation"]["traced"] is False
    assert len(dict(compressed_layers(small))) == 2
    # the fallback is in the report, also when read back from the file
    for rep in saved_reports(small, model):
        assert any("cannot be traced" in n and "without permutation" in n for n in rep.notes)


def _tiny_llama():
    """A 2-layer Llama (random weights, tied embedding) like SmolLM2, from transformers."""
    netshrink.compat.torchvision_shim()
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_untraceable_transformer_is_permuted_inside_its_traceable_parts(saved_reports):
    """torch.fx cannot trace a Hugging Face Llama as a whole; its MLPs are traced one by
    one: the intermediate channels (gate and up rows, down columns) form one group per
    layer, the function is unchanged, and the report says where groups came from."""
    model = _tiny_llama()
    analysis = analyse(model)
    assert analysis.traced and analysis.reason
    assert analysis.parts == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert len(analysis.groups) == 2
    for i, group in enumerate(analysis.groups):
        roles = sorted((m.role, m.name) for m in group.members)
        assert group.size == 96 and roles == [
            ("reader", f"model.layers.{i}.mlp.down_proj"),
            ("writer", f"model.layers.{i}.mlp.gate_proj"),
            ("writer", f"model.layers.{i}.mlp.up_proj")]
    assert "as a whole: torch.fx cannot trace it" in analysis.blocked[0]
    assert any(b.startswith("model.layers.*.self_attn (x2): not traceable")
               for b in analysis.blocked)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    dims = {n: 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = permute_model(model, dims, iters=300, seed=0)
    with torch.no_grad():
        after = model(x).logits
    assert len(report.groups) == 2 and report.improvement > 0
    assert (after - before).abs().max().item() < 1e-5
    small = netshrink.compress(_tiny_llama(), "pqf", "2bit", layers=["model.layers.*"],
                               min_weights=0, permute_iters=100, anneal=2)
    assert small.netshrink_info["facts"]["permutation"]["groups"] == 2
    for rep in saved_reports(small, _tiny_llama()):
        assert any("pqf permutation: 2 channel groups" in n and "traced parts" in n
                   for n in rep.notes)


def test_a_layer_with_a_tied_weight_keeps_its_channels():
    """Two linears sharing one weight: permuting one's channels would change the other."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2 = nn.Linear(8, 16), nn.Linear(8, 16)
            self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8)
            self.c.weight = self.b.weight

        def forward(self, x):
            return self.b(torch.relu(self.a1(x))) + self.c(torch.relu(self.a2(x)))

    model = Tied()
    analysis = analyse(model)
    assert not analysis.groups
    assert "b: weight tied with another module" in analysis.blocked
    assert "c: weight tied with another module" in analysis.blocked
    model.c.weight = nn.Parameter(model.b.weight.detach().clone())  # untied: two groups
    assert len(analyse(model).groups) == 2


def _group_with_reader(model, d_of):
    dims = d_of(model)
    for g in analyse(model).groups:
        if any(scorable(m, g.size, dims.get(m.name)) for m in g.readers()):
            return g, dims
    raise AssertionError("no scorable group")


def test_search_never_increases_objective_and_incremental_matches_scratch():
    torch.manual_seed(0)
    model = zoo.create("mobilenetv2_small")
    group, dims = _group_with_reader(model, _dims)
    res = search(group, dims, iters=400, seed=1, check_every=25)
    assert res.final <= res.identity and res.final <= res.greedy
    assert res.accepted > 0  # the search did move
    # one more explicit check: a swap's incremental log det equals a fresh computation
    reader = next(m for m in group.readers() if scorable(m, group.size, dims.get(m.name)))
    state = ReaderState(reader, group.size, dims[reader.name])
    perm = np.arange(group.size)
    state.reset(perm)
    upd = state.swap_delta(perm, 0, group.size - 1)
    swapped = perm.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    fresh = ReaderState(reader, group.size, dims[reader.name]).reset(swapped)
    assert math.isclose(state.value(upd.scatter, upd.total), fresh, rel_tol=1e-9, abs_tol=1e-9)


def test_src_no_worse_than_plain_kmeans_on_real_weights():
    try:
        model = netshrink_lab.pretrained.efficientnet_lite0()
    except netshrink.errors.DataError as e:
        pytest.skip(str(e))
    default_i = get_method("pqf").config_cls().anneal
    w = model._blocks[5]._expand_conv.weight.detach()
    _, rows = channel_scales(weight_rows(w, 0), "float16")
    x = rows.reshape(-1, 4)
    plain = kmeans(x, 256, iters=default_i, seed=0, init="random")
    annealed = kmeans(x, 256, seed=0, init="random", anneal=default_i)
    assert annealed.inertia <= plain.inertia


def test_compress_save_load_round_trip_and_file_size(small_net, images, tmp_path):
    small = netshrink.compress(small_net, "pqf", "x6", min_weights=0, permute_iters=300,
                               anneal=5)
    layers = dict(compressed_layers(small))
    assert "stem" not in layers  # the stem stays dense
    assert all(isinstance(v, PalettizedLayer) for v in layers.values())
    out = small(images)
    path = tmp_path / "m.nsk"
    size = netshrink.save(small, path)
    assert size == path.stat().st_size == netshrink.model_bits(small) // 8 + header_bytes(small)
    assert 8 * size <= netshrink.size.fp32_bits(small_net) / 6
    again = netshrink.load(path, small_net)
    assert torch.equal(again(images), out)
    for name, layer in compressed_layers(again):
        assert torch.equal(layer.codes, layers[name].codes)
        assert torch.equal(layer.codebook, layers[name].codebook)
    # the permutation happened and SQNR is measured against the permuted weights
    assert small.netshrink_info["facts"]["permutation"]["groups"] > 0
    assert all(v["sqnr_db"] > 0 for v in small.netshrink_info["layers"].values())


def test_planner_presets_clamp_and_depthwise(small_net):
    small = netshrink.compress(small_net, "pqf", "x3", min_weights=0, block="large",
                               permute=False, anneal=2)
    plan = _plan(small)
    assert plan["stem"].dense
    assert plan["conv"].d == 18 and plan["pw"].d == 8 and plan["fc"].d == 4
    for name, module in small_net.named_modules():
        if name in plan and not plan[name].dense:
            n_sub = module.weight.numel() // plan[name].d
            assert plan[name].k <= max(2, 2 ** math.floor(math.log2(n_sub / 4)))
    assert plan["dw"].dense or plan["dw"].scale  # never a bare per-tensor codebook
    small = netshrink.compress(small_net, "pqf", "x3", min_weights=0, depthwise="scale",
                               permute=False, anneal=2)
    assert _plan(small)["dw"].scale and _plan(small)["dw"].d in (3, 9)


def _plan(small: nn.Module) -> dict[str, Choice]:
    return plan_of(small, ["stem", "conv", "dw", "pw", "fc"])


def test_report_states_permutation_depthwise_choice_and_paper_size(small_net,
                                                                   saved_reports):
    """Each compress call's own outcome is in its report (no shared state), and survives
    save / inspect / load."""
    permuted = netshrink.compress(small_net, "pqf", "x4", min_weights=0, permute_iters=200,
                                  anneal=2)
    plain = netshrink.compress(small_net, "pqf", "x4", min_weights=0, permute=False,
                               depthwise="scale", anneal=2)
    facts = permuted.netshrink_info["facts"]
    groups = facts["permutation"]["groups"]
    assert groups > 0 and "permutation" not in plain.netshrink_info["facts"]
    dw = _plan(permuted)["dw"]
    for rep in saved_reports(permuted, small_net):
        text = "\n".join(rep.notes)
        assert f"pqf permutation: {groups} channel groups, log det -" in text
        assert "; not permuted at " in text and "output: model output" in text
        assert f"pqf depthwise (size planner): dw {dw}" in text
        assert "pqf kept dense: stem (stem, as in the paper)" in text
        paper = format_bytes(paper_size_bits(permuted) / 8)
        assert f"pqf size as the paper counts it (other tensors fp32, BN folded to two " \
               f"vectors): {paper}" in text
        assert rep.facts["paper_size_bits"] == paper_size_bits(permuted)
        assert rep.facts["paper_fp32_bits"] == paper_size_bits(small_net)
    text = "\n".join(netshrink.report(plain).notes)
    assert "pqf permutation: off" in text
    assert "pqf depthwise (depthwise=scale): dw d=" in text


def test_finetune_trains_codebooks_with_codes_frozen(small_net, toy_loader):
    kw = dict(min_weights=0, permute=False, anneal=2, seed=0)
    post = netshrink.compress(small_net, "pqf", "x6", **kw)
    tuned = netshrink.compress(small_net, "pqf", "x6", data=toy_loader,
                               finetune=official_finetune(epochs=1, batch_size=32,
                                                          max_steps_per_epoch=3,
                                                          progress=False), **kw)
    a, b = dict(compressed_layers(post)), dict(compressed_layers(tuned))
    assert all(torch.equal(a[n].codes, b[n].codes) for n in a)
    assert any(not torch.equal(a[n].codebook, b[n].codebook) for n in a)
    cfg = official_finetune()
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.min_lr, cfg.distill_weight) == (
        "adam", 1e-3, "cosine", 1e-6, 0.0)
    assert official_finetune(distill=True).distill_weight > 0


def test_paper_size_convention(small_net):
    fp32 = paper_size_bits(small_net)
    weights = sum(p.numel() for n, p in small_net.named_parameters() if "bn" not in n)
    assert fp32 == 32 * (weights + 2 * 8 + 2 * 32)
    small = netshrink.compress(small_net, "pqf", "x4", min_weights=0, permute=False, anneal=2)
    assert paper_size_bits(small) < fp32 / 3


@pytest.mark.parametrize("options", [
    {"block": "huge"}, {"k": 300}, {"k_fc": 1}, {"d": 0}, {"depthwise": "maybe"},
    {"anneal": -1}, {"permute_iters": 1.5}, {"codebook_dtype": "int8"}, {"nope": 1},
])
def test_bad_configs_raise(small_net, options):
    with pytest.raises(ConfigError):
        netshrink.compress(small_net, "pqf", "x4", **options)


def test_d_that_does_not_divide_rows_and_infeasible_target(small_net):
    with pytest.raises(ConfigError, match="does not divide"):
        netshrink.compress(small_net, "pqf", "x4", min_weights=0, d=7, permute=False)
    with pytest.raises(InfeasibleTargetError):
        netshrink.compress(small_net, "pqf", "x500", min_weights=0, permute=False)


def test_loose_target_says_the_largest_codebooks_leave_budget_unused():
    """With d fixed by block="small", k <= 256 caps a layer's size: a loose target (x4 on
    ResNet-20) gives a smaller file, and the report says so; a target the codebooks can
    fill (x20) has no such note."""
    torch.manual_seed(0)
    model = zoo.create("resnet20", in_channels=1, num_classes=10)
    loose = netshrink.report(netshrink.compress(model, "pqf", "x4"))
    assert loose.ratio > 8
    assert any("the largest codebooks" in n for n in loose.notes)
    assert loose.facts["layer_bits_used"] < 0.9 * loose.facts["layer_bits_available"]
    tight = netshrink.report(netshrink.compress(model, "pqf", "x20"))
    assert 19.5 < tight.ratio < 21
    assert not any("the largest codebooks" in n for n in tight.notes)
    assert "layer_bits_used" not in tight.facts
