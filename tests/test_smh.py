"""SMH (structured multi-hashing): budget -> M, the 2M-variable dependence of every value,
gradients to every variable, the He-scaled initialisation, SVD start, file round trips and
clear errors on impossible targets."""

import copy
import math

import pytest
import torch
from torch import nn

import netshrink
from netshrink.errors import ConfigError, InfeasibleTargetError
from netshrink.fileformat import inspect_file
from netshrink.layers import compressed_layers
from netshrink.methods.smh import HashBank, HashedLayer, bank_of, he_fan_out_std
from netshrink.size import fp32_bits, model_bits
from netshrink_lab import zoo


class TinyTransformerMLP(nn.Module):
    """Transformer-style: token projection, two pre-norm MLP blocks (LayerNorm, 4x GELU
    MLP, residual), head. LayerNorms are left out of SMH and counted at their dtype."""

    def __init__(self, d: int = 16, n_in: int = 12, n_out: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(d), "up": nn.Linear(d, 4 * d),
                           "down": nn.Linear(4 * d, d)}) for _ in range(2))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["down"](torch.nn.functional.gelu(b["up"](b["norm"](h))))
        return self.head(h)


def covered(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return TinyTransformerMLP()
    return zoo.create(name)


@pytest.mark.parametrize("name,fraction", [("resnet20", 4), ("resnet32", 10),
                                           ("mobilenetv2_small", 4), ("mlp", 3)])
def test_variable_count_equals_the_budget(name, fraction):
    model = make(name)
    n_values = covered(model)
    budget = n_values // fraction
    small = netshrink.compress(model, method="smh", variables=budget, init="random",
                               min_weights=0)
    bank = bank_of(small)
    n = math.ceil(math.sqrt(n_values))
    assert bank.n == n and bank.n_values == n_values
    assert bank.rank == budget // (2 * n)  # the code's rounding (docs/methods/smh.md#budget: floor)
    assert bank.variables() == 2 * bank.rank * n <= budget < 2 * (bank.rank + 1) * n
    # every conv/linear weight is hashed; the only other trainables are scalars and norms
    layers = dict(compressed_layers(small))
    assert all(isinstance(layer, HashedLayer) for layer in layers.values())
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    norms = sum(p.numel() for m in model.modules() if isinstance(m, (nn.BatchNorm2d,
                                                                     nn.LayerNorm))
                for p in m.parameters())
    trainable = sum(p.numel() for p in small.parameters() if p.requires_grad)
    assert trainable == bank.variables() + len(layers) + norms
    # tiling: creation order, contiguous slices
    assert [entry[0] for entry in bank.layers] == list(layers)
    assert [entry[1] for entry in bank.layers] == [layer.offset for layer in layers.values()]


def test_size_target_sets_the_largest_m_that_fits(tmp_path):
    model = make("resnet20")
    small = netshrink.compress(model, method="smh", target="x8", init="random", min_weights=0)
    bank = bank_of(small)
    size = netshrink.save(small, tmp_path / "s.nsk")
    header = inspect_file(tmp_path / "s.nsk")["header_bytes"]
    assert size == model_bits(small) // 8 + header  # file size == accounted size
    file_budget = fp32_bits(model) / 8 / 8
    assert size <= file_budget
    assert size + 2 * bank.n * 4 > file_budget  # one more rank would not fit
    # the bank is counted once: U, V at fp32, one fp32 alpha per layer, BN at fp32
    n_layers = len(list(compressed_layers(small)))
    bn = sum(t.numel() * t.element_size() for m in model.modules()
             if isinstance(m, nn.BatchNorm2d) for t in m.state_dict().values())
    assert model_bits(small) // 8 == bank.variables() * 4 + n_layers * 4 + bn


def test_every_value_depends_on_exactly_2m_variables():
    small = netshrink.compress(make("mlp"), method="smh", rank=3, init="random", min_weights=0)
    bank = bank_of(small)
    layers = list(dict(compressed_layers(small)).values())
    n, m = bank.n, bank.rank
    picks = [(layers[0], 0), (layers[1], 5), (layers[-1], layers[-1].size - 1)]
    for layer, k in picks:  # k-th value of the layer (the last one is a bias entry)
        j = layer.offset + k
        bank.zero_grad()
        value = torch.cat([layer.decode_weight().reshape(-1),
                           layer.decode_bias().reshape(-1)])[k]
        value.backward()
        rows = (bank.U.grad != 0).any(1).nonzero().flatten().tolist()
        cols = (bank.V.grad != 0).any(0).nonzero().flatten().tolist()
        assert rows == [j // n] and cols == [j % n]
        assert int((bank.U.grad != 0).sum() + (bank.V.grad != 0).sum()) == 2 * m


def test_gradients_reach_every_variable():
    torch.manual_seed(1)
    small = netshrink.compress(make("mlp"), method="smh", rank=4, init="random", min_weights=0)
    small.train()
    small(torch.randn(32, 12)).pow(2).mean().backward()
    bank = bank_of(small)
    # every row of U that holds a used value (n = ceil(sqrt N) can leave the last row
    # unused: 4517 values in 68 x 68) and every column of V gets a gradient
    used_rows = (bank.n_values - 1) // bank.n + 1
    assert used_rows == bank.n - 1
    assert bool((bank.U.grad[:used_rows] != 0).all()) and bool((bank.V.grad != 0).all())
    assert bool((bank.U.grad[used_rows:] == 0).all())
    for _, layer in compressed_layers(small):
        assert layer.alpha.grad is not None and float(layer.alpha.grad) != 0.0


def test_initial_layer_std_matches_the_he_scale():
    model = make("resnet20")
    small = netshrink.compress(model, method="smh", variables=covered(model) // 2,
                               init="random", min_weights=0)
    ratios = []
    for _, layer in compressed_layers(small):
        assert float(layer.alpha.detach()) == 1.0
        w = layer.decode_weight().detach()
        expected = he_fan_out_std(layer.weight_shape, 0)
        assert layer.he_std == pytest.approx(expected)
        if w.numel() >= 2000:
            ratios.append(float(w.std()) / expected)
    assert len(ratios) >= 15
    assert all(0.75 < r < 1.25 for r in ratios), ratios
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.08)
    bank = bank_of(small)
    assert float(bank.U.detach().std()) == pytest.approx(bank.rank ** -0.25, rel=0.05)


def test_he_fan_out_scale_formula():
    assert he_fan_out_std((32, 16, 3, 3), 0) == pytest.approx(math.sqrt(2 / (9 * 32)))
    assert he_fan_out_std((10, 64), 0) == pytest.approx(1 / math.sqrt(10))


def test_svd_start_is_exact_at_full_rank_and_improves_with_rank():
    model = make("mlp")
    x = torch.randn(16, 12)
    full = netshrink.compress(model, method="smh", rank=10_000, min_weights=0)
    assert bank_of(full).rank == bank_of(full).n  # capped at n
    assert torch.allclose(full(x), model(x), atol=1e-4)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    errors = []
    for rank in (2, 12, 40):  # Eckart-Young: the tiled, scale-divided error falls
        small = netshrink.compress(model, method="smh", rank=rank, min_weights=0)
        err = 0.0
        for name, layer in compressed_layers(small):
            ref = originals[name]
            err += float(((layer.decode_weight() - ref.weight) / layer.he_std).pow(2).sum()
                         .detach())
            err += float(((layer.decode_bias() - ref.bias) / layer.he_std).pow(2).sum()
                         .detach())
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_reload_is_identical_and_file_size_is_accounted(tmp_path):
    model = make("resnet20")
    small = netshrink.compress(model, method="smh", target="x6", init="random",
                               min_weights=0)
    x = torch.randn(2, 1, 28, 28)
    out = small(x)
    size = netshrink.save(small, tmp_path / "r.nsk")
    assert size == (tmp_path / "r.nsk").stat().st_size
    assert size == model_bits(small) // 8 + inspect_file(tmp_path / "r.nsk")["header_bytes"]
    manifest = inspect_file(tmp_path / "r.nsk")["manifest"]
    banks = [e for e in manifest["layers"].values() if e["spec"]["kind"] == "smh-bank"]
    assert len(banks) == 1 and set(banks[0]["tensors"]) == {"U", "V"}
    assert [e[0] for e in banks[0]["spec"]["layers"]][:2] == ["conv1", "layer1.0.conv1"]
    for loaded in (netshrink.load(tmp_path / "r.nsk"), netshrink.load(tmp_path / "r.nsk", model),
                   netshrink.load(tmp_path / "r.nsk", small)):
        assert torch.equal(loaded(x), out)
        assert isinstance(loaded.conv1.smh_bank, HashBank)  # held by the first layer
        assert loaded.fc.bank is loaded.conv1.smh_bank
    twin = copy.deepcopy(small)  # copies keep one shared bank
    assert twin.conv1.bank is twin.conv1.smh_bank and twin.fc.bank is twin.conv1.smh_bank
    assert torch.equal(twin(x), out)
    # the layers with a bias (the classifier) decode it from the bank
    assert small.fc.bias.shape == (10,) and small.fc.host.bias is None


def test_fp16_bank_round_trip_and_cache(tmp_path):
    model = make("mlp")
    small = netshrink.compress(model, method="smh", rank=4, dtype="float16", cache=True,
                               min_weights=0)
    bank = bank_of(small)
    assert torch.equal(bank.U, bank.U.half().float())  # finalized to the stored dtype
    assert model_bits(small) < model_bits(netshrink.compress(model, method="smh", rank=4,
                                                             min_weights=0))
    x = torch.randn(8, 12)
    with torch.no_grad():
        cached = small(x)
        assert bank._cached is not None  # expanded once, reused
    bank.set_cache(False)
    with torch.no_grad():
        assert torch.allclose(small(x), cached, atol=1e-5)
        assert bank._cached is None
    bank.set_cache(True)
    netshrink.save(small, tmp_path / "h.nsk")
    loaded = netshrink.load(tmp_path / "h.nsk", model)
    assert bank_of(loaded).cache and bank_of(loaded).dtype == "float16"
    with torch.no_grad():
        assert torch.equal(loaded(x), cached)


def test_distillation_through_the_shared_loop_moves_u_and_v():
    torch.manual_seed(0)
    model = make("mlp")
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    post = netshrink.compress(model, method="smh", rank=3, min_weights=0)
    tuned = netshrink.compress(model, method="smh", rank=3, min_weights=0, data=data,
                               finetune=netshrink.Finetune(epochs=1, progress=False))
    assert not torch.equal(bank_of(post).U, bank_of(tuned).U)
    assert not torch.equal(bank_of(post).V, bank_of(tuned).V)


def test_too_small_targets_and_bad_configs_raise_clearly():
    model = make("resnet20")
    with pytest.raises(InfeasibleTargetError, match="M = 1"):
        netshrink.compress(model, method="smh", target="x2000", min_weights=0)
    mlp = make("mlp")  # n = 68
    with pytest.raises(InfeasibleTargetError, match="2n = 136"):
        netshrink.compress(mlp, method="smh", variables=135, min_weights=0)
    assert bank_of(netshrink.compress(mlp, method="smh", variables=136, init="random",
                                      min_weights=0)).rank == 1
    with pytest.raises(ConfigError, match="bits per weight"):
        netshrink.compress(mlp, method="smh", target="0.1bit", min_weights=0)
    with pytest.raises(ConfigError, match="init"):
        netshrink.compress(model, method="smh", init="zeros")
    with pytest.raises(ConfigError, match="rank"):
        netshrink.compress(model, method="smh", rank=0)
    with pytest.raises(ConfigError, match="dtype"):
        netshrink.compress(model, method="smh", dtype="int8")
    model.conv1.smh_bank = nn.Identity()  # the bank's place, under the first chosen layer
    with pytest.raises(ConfigError, match="bank_name"):
        netshrink.compress(model, method="smh", rank=2, min_weights=0)


@pytest.mark.parametrize("cache", [False, True])
def test_report_states_rank_variables_and_expansion_memory(cache, small_net, saved_reports):
    """The report says M, n, the variables, and whether U @ V is expanded once or per call
    with the memory that costs, also from the saved file."""
    from netshrink.size import format_bytes

    small = netshrink.compress(small_net, "smh", "x4", min_weights=0, cache=cache)
    bank = bank_of(small)
    n, rank = bank.n, bank.rank
    rows = max((o + s - 1) // n + 1 - o // n for _, o, s in bank.layers)
    for rep in saved_reports(small, small_net):
        text = "\n".join(rep.notes)
        assert f"smh: M = {rank}, n = {n}: {2 * n * rank} variables (float32)" in text
        if cache:
            assert "smh expansion: once (cache=True)" in text
            assert f"{format_bytes(4 * n * n)} of memory" in text
        else:
            assert "smh expansion: per call (cache=False)" in text
            assert f"{format_bytes(4 * rows * n)} of extra memory" in text
        assert rep.facts["expansion"] == ("once" if cache else "per call")
        assert rep.facts["expansion_bytes"] == 4 * (n * n if cache else rows * n)
