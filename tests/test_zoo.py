"""Tests of netshrink_lab.zoo: reference architectures, the registry and the baseline cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from netshrink.errors import ConfigError, DataError
from netshrink_lab import zoo
from netshrink_lab.data import FASHION_MNIST_ROOT

HAVE_DATA = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_resnet20_option_a_has_about_027m_parameters() -> None:
    n = _n_params(zoo.resnet20(in_channels=3))
    assert 260_000 <= n <= 280_000
    assert 260_000 <= _n_params(zoo.resnet20()) <= 280_000
    assert _n_params(zoo.resnet20()) < _n_params(zoo.resnet32()) < _n_params(zoo.resnet56())


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_forward_shapes(name: str, shape: tuple[int, int]) -> None:
    channels, size = shape
    torch.manual_seed(0)
    model = zoo.create(name, in_channels=channels, image_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_option_a_is_parameter_free_and_option_b_has_1x1_shortcuts() -> None:
    a, b = zoo.resnet20(shortcut="A"), zoo.resnet20(shortcut="B")
    shortcut_convs = [
        m for name, m in b.named_modules()
        if isinstance(m, nn.Conv2d) and ".shortcut." in f".{name}."
    ]
    assert len(shortcut_convs) == 2  # the two stage transitions
    assert all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in shortcut_convs)
    assert sum(isinstance(m, zoo.PadShortcut) for m in a.modules()) == 2
    assert not any(
        isinstance(m, nn.Conv2d) and ".shortcut." in f".{n}." for n, m in a.named_modules()
    )


def test_mobilenet_has_depthwise_convs_and_is_pointwise_dominated() -> None:
    model = zoo.mobilenetv2_small()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    pointwise = sum(c.weight.numel() for c in convs if c.kernel_size == (1, 1))
    assert pointwise > 0.7 * _n_params(model)
    assert any(isinstance(m, zoo.InvertedResidual) and m.use_residual for m in model.modules())
    assert _n_params(zoo.mobilenetv2_small(width=0.5)) < _n_params(model)


def test_registry_and_config_errors() -> None:
    assert zoo.names() == sorted(zoo.MODELS)
    assert {"resnet20", "resnet32", "resnet56", "mobilenetv2_small"} <= set(zoo.names())
    with pytest.raises(ConfigError, match="resnet20"):
        zoo.create("resnet18")
    with pytest.raises(ConfigError, match="depth"):
        zoo.create("resnet20", depth=3)
    with pytest.raises(ConfigError):
        zoo.create("resnet20", shortcut="C")
    with pytest.raises(ConfigError):
        zoo.create("resnet20", image_size=4)
    with pytest.raises(ConfigError):
        zoo.create("mobilenetv2_small", width=0)
    with pytest.raises(ConfigError):
        zoo.create("resnet56", in_channels=0)


def test_arch_recorded_and_reproducible() -> None:
    model = zoo.create("resnet32", in_channels=3, shortcut="B")
    arch = zoo.arch_of(model)
    assert arch == {
        "name": "resnet32",
        "kwargs": {"in_channels": 3, "num_classes": 10, "image_size": 28, "shortcut": "B"},
    }
    assert json.loads(json.dumps(arch)) == arch
    for rebuilt in (zoo.create(**arch), zoo.create(arch["name"], **arch["kwargs"])):
        assert zoo.arch_of(rebuilt) == arch
        a, b = model.state_dict(), rebuilt.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)
    assert zoo.arch_of(nn.Linear(2, 2)) is None
    zoo.arch_of(model)["kwargs"]["in_channels"] = 99  # a copy: the record stays intact
    assert zoo.arch_of(model) == arch


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_fx_symbolic_trace(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_cache_paths(cache: Path) -> None:
    assert zoo.cache_dir() == cache
    assert zoo.baseline_path("resnet20") == cache / "baselines/resnet20-fashion-mnist.safetensors"
    assert zoo.baseline_path("resnet20", "Fashion_MNIST") == zoo.baseline_path("resnet20")
    with pytest.raises(ConfigError):
        zoo.baseline_path("nope")
    with pytest.raises(ConfigError):
        zoo.baseline_path("resnet20", "../etc")


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_small"])
def test_save_load_baseline_round_trip(cache: Path, name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name)
    model.train()
    with torch.no_grad():  # move BN running stats away from their defaults
        model(torch.randn(8, 1, 28, 28))
    model.eval()
    path = zoo.baseline_path(name)
    saved = zoo.save_baseline(model, path, {"test_accuracy": 0.5, "data": "fashion-mnist"})
    assert saved == path and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded, meta = zoo.load_baseline(name)
    assert meta["test_accuracy"] == 0.5 and meta["data"] == "fashion-mnist"
    assert meta["arch"] == zoo.arch_of(model) == zoo.arch_of(loaded)
    assert not loaded.training
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_handles_shared_and_strided_tensors(tmp_path: Path) -> None:
    model = zoo.create("resnet20")
    block = model.layer1[0]
    block.conv2.weight = block.conv1.weight  # tied: two state_dict keys, one storage
    model.fc.weight = nn.Parameter(model.fc.weight.detach().t().contiguous().t())
    assert not model.fc.weight.is_contiguous()
    path = zoo.save_baseline(model, tmp_path / "m.safetensors", {})
    loaded, _ = zoo.load_baseline("resnet20", path=path)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert torch.equal(loaded.layer1[0].conv2.weight, block.conv1.weight)


def test_save_requires_recorded_arch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        zoo.save_baseline(zoo.resnet20(), tmp_path / "m.safetensors", {})


def test_missing_baseline_says_how_to_train(cache: Path) -> None:
    with pytest.raises(DataError, match="netshrink train-baseline resnet56 --data fashion-mnist"):
        zoo.load_baseline("resnet56")


def test_corrupt_or_mismatched_baseline(cache: Path) -> None:
    path = zoo.baseline_path("resnet20")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError):
        zoo.load_baseline("resnet20")
    zoo.save_baseline(zoo.create("resnet32"), path, {})
    with pytest.raises(DataError, match="resnet32"):
        zoo.load_baseline("resnet20")


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST missing (apt-get install it)")
def test_train_baseline_small_subset(cache: Path) -> None:
    pytest.importorskip("netshrink.train", reason="netshrink.train not written yet")
    model, meta = zoo.train_baseline(
        "resnet20",
        epochs=1,
        batch_size=32,
        lr=0.05,
        subset_train=1024,
        subset_test=256,
        max_steps_per_epoch=32,  # 32 small steps reach ~0.47 here, in ~2 s
        progress=False,
        seed=0,
    )
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert meta["test_accuracy"] > 0.2  # chance is 0.1
    assert meta["train_seconds"] > 0 and meta["epochs"] == 1 and meta["seed"] == 0
    assert meta["data"] == "fashion-mnist" and meta["torch_version"] == torch.__version__
    assert meta["arch"]["name"] == "resnet20"
    assert zoo.baseline_path("resnet20").is_file()
    loaded, loaded_meta = zoo.load_baseline("resnet20")
    assert loaded_meta["test_accuracy"] == pytest.approx(meta["test_accuracy"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
