"""Tests of netshrink_lab.data: the real Fashion-MNIST files and idx parsing errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from netshrink.errors import ConfigError, DataError
from netshrink_lab import data
from netshrink_lab.data import (
    FASHION_MNIST_ENV,
    FASHION_MNIST_ROOT,
    fashion_mnist,
    fashion_mnist_loaders,
    get_dataset,
    read_idx,
)

APT = "sudo apt-get install dataset-fashion-mnist"
HAVE_DATA = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST missing: {APT}")


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)


def _write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a gzipped idx image/label pair the way the Fashion-MNIST files are laid out."""
    n, rows, cols = images.shape
    img = struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    lbl = struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()
    (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
    (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lbl))


def _tiny_root(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28))
    labels = np.arange(n) % 10
    for prefix in ("train", "t10k"):
        _write_idx(root, prefix, images, labels)
    return root


@pytest.fixture(scope="module")
def train_full() -> torch.utils.data.TensorDataset:
    return fashion_mnist("train")


@needs_data
def test_real_train_shapes_dtypes_labels(train_full: torch.utils.data.TensorDataset) -> None:
    x, y = train_full.tensors
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60_000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [6000] * 10


@needs_data
def test_real_train_is_normalised(train_full: torch.utils.data.TensorDataset) -> None:
    x = train_full.tensors[0]
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01


@needs_data
def test_real_test_split() -> None:
    x, y = fashion_mnist("test").tensors
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    assert torch.bincount(y).tolist() == [1000] * 10


@needs_data
def test_subset_size_stratified_and_seeded() -> None:
    a = fashion_mnist("train", subset=1000, seed=3)
    b = fashion_mnist("train", subset=1000, seed=3)
    c = fashion_mnist("train", subset=1000, seed=4)
    assert len(a) == 1000
    assert torch.bincount(a.tensors[1]).tolist() == [100] * 10
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert len(fashion_mnist("test", subset=37)) == 37


@needs_data
def test_loaders_seeded_shuffle_and_sizes() -> None:
    tr1, te1 = fashion_mnist_loaders(64, subset_train=512, subset_test=256, seed=1)
    tr2, te2 = fashion_mnist_loaders(64, subset_train=512, subset_test=256, seed=1)
    assert len(tr1.dataset) == 512 and len(te1.dataset) == 256
    assert len(tr1) == 8 and len(te1) == 4
    assert torch.equal(next(iter(tr1))[1], next(iter(tr2))[1])
    first_test_labels = next(iter(te1))[1]
    assert torch.equal(first_test_labels, te1.dataset.tensors[1][:64])  # test is not shuffled
    assert not torch.equal(next(iter(tr1))[1], tr1.dataset.tensors[1][:64])


@needs_data
def test_get_dataset_dispatch() -> None:
    ds = get_dataset("fashion-mnist", "test", subset=10)
    assert len(ds) == 10
    assert len(get_dataset("Fashion_MNIST", "test", subset=10)) == 10


def test_get_dataset_unknown_name_lists_known() -> None:
    with pytest.raises(ConfigError, match="fashion-mnist"):
        get_dataset("cifar-1000", "train")


def test_bad_split_and_subset(tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    with pytest.raises(ConfigError):
        fashion_mnist("val", root=root)
    with pytest.raises(ConfigError):
        fashion_mnist("train", subset=0, root=root)
    with pytest.raises(ConfigError):
        fashion_mnist("train", subset=41, root=root)


def test_missing_root_names_apt_command_and_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        fashion_mnist("train", root=missing)
    msg = str(info.value)
    assert APT in msg
    assert str(missing / "train-images-idx3-ubyte.gz") in msg


def test_env_root_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty"):
        fashion_mnist("test")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(_tiny_root(tmp_path)))
    x, y = fashion_mnist("test").tensors
    assert x.shape == (40, 1, 28, 28) and y.tolist()[:3] == [0, 1, 2]


def test_synthetic_idx_roundtrip_and_cache(tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    path = root / "train-images-idx3-ubyte.gz"
    arr = read_idx(path)
    assert arr.shape == (40, 28, 28) and arr.dtype == np.uint8
    assert read_idx(path) is arr  # decoded once per process
    x = fashion_mnist("train", root=root).tensors[0]
    expected = (arr[0].astype(np.float32) / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bad_magic_raises(tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    bad = struct.pack(">IIII", 1234, 40, 28, 28) + bytes(40 * 28 * 28)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    with pytest.raises(DataError, match="magic"):
        fashion_mnist("train", root=root)


def test_truncated_idx_raises(tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    short = struct.pack(">IIII", 2051, 40, 28, 28) + bytes(100)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(short))
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist("test", root=root)


def test_corrupt_gzip_and_label_mismatch_raise(tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError):
        fashion_mnist("train", root=root)
    _write_idx(root, "t10k", np.zeros((5, 28, 28)), np.zeros(4))
    with pytest.raises(DataError):
        fashion_mnist("test", root=root)
