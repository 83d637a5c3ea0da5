"""Real data sets, read only from local files (netshrink never downloads anything).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (idx files under
``/usr/share/datasets/fashion-mnist``); another directory holding the same four files can be
named by the ``root`` argument or the ``NETSHRINK_FASHION_MNIST`` environment variable.
Decoded arrays are cached per process, so building many loaders in one run reads each file once.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from netshrink.datasources import register_dataset
from netshrink.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "LOADERS",
    "canonical_name",
    "fashion_mnist",
    "fashion_mnist_loaders",
    "get_dataset",
    "get_loaders",
    "photo_views",
    "read_idx",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = 10
FASHION_MNIST_ENV = "NETSHRINK_FASHION_MNIST"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_SIZE = {"train": 60_000, "test": 10_000}


# ----------------------------------------------------------------------------- idx decoding


def _open_bytes(path: Path) -> bytes:
    """Return the raw bytes of an idx file, gunzipping ``.gz`` files."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Decode one idx file; keyed on (path, mtime, size) so a rewritten file is re-read."""
    del mtime_ns, size  # only part of the cache key
    p = Path(path)
    raw = _open_bytes(p)
    if len(raw) < 8:
        raise DataError(f"malformed idx file {p}: {len(raw)} bytes is shorter than a header")
    magic = int.from_bytes(raw[0:4], "big")
    if magic == _IMAGES_MAGIC:
        header = 16
        if len(raw) < header:
            raise DataError(f"malformed idx file {p}: truncated image header")
        n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
        shape: tuple[int, ...] = (n, rows, cols)
    elif magic == _LABELS_MAGIC:
        header = 8
        n = int.from_bytes(raw[4:8], "big")
        shape = (n,)
    else:
        raise DataError(
            f"malformed idx file {p}: magic number {magic} is neither "
            f"{_IMAGES_MAGIC} (images) nor {_LABELS_MAGIC} (labels)"
        )
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"malformed idx file {p}: header promises {expected} bytes for shape {shape}, "
            f"file has {len(raw)} (truncated or corrupted)"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    arr.setflags(write=False)  # shared by every caller through the cache
    logger.debug("decoded %s: shape %s", p, shape)
    return arr


def read_idx(path: str | Path) -> np.ndarray:
    """Decode an idx (optionally gzipped) image or label file into a read-only uint8 array.

    Results are cached in-process per file, so repeated calls are cheap. A bad magic number,
    a truncated file or a corrupt gzip stream raises DataError.
    """
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise DataError(f"cannot read idx file {p}: {exc}") from exc
    return _read_idx_cached(str(p), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _check_split(split: str) -> str:
    """Validate a split name ("train" or "test")."""
    if split not in _SPLIT_PREFIX:
        raise ConfigError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_PREFIX)}")
    return split


def _candidate_roots(root: str | Path | None) -> list[Path]:
    """Directories to search: the argument, else the environment variable, else Debian's."""
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return [Path(env).expanduser()]
    return [FASHION_MNIST_ROOT]


def _find_file(roots: list[Path], stem: str, searched: list[Path]) -> Path | None:
    """First existing ``stem`` or ``stem.gz`` under ``roots``; records every path tried."""
    for r in roots:
        for name in (f"{stem}.gz", stem):
            candidate = r / name
            searched.append(candidate)
            if candidate.is_file():
                return candidate
    return None


def _missing_message(searched: list[Path]) -> str:
    """Error text for absent data: what was searched and how to install it."""
    paths = "\n  ".join(str(p) for p in searched)
    return (
        "Fashion-MNIST files not found. Searched:\n  "
        f"{paths}\n"
        f"Install them with: sudo apt-get install {APT_PACKAGE}\n"
        f"(as root, without sudo: apt-get install {APT_PACKAGE}), or point root= or "
        f"${FASHION_MNIST_ENV} at a directory holding "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    )


def _load_split(split: str, root: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Locate and decode the uint8 images (N,28,28) and labels (N,) of one split."""
    prefix = _SPLIT_PREFIX[split]
    roots = _candidate_roots(root)
    searched: list[Path] = []
    img_path = _find_file(roots, f"{prefix}-images-idx3-ubyte", searched)
    lbl_path = _find_file(roots, f"{prefix}-labels-idx1-ubyte", searched)
    if img_path is None or lbl_path is None:
        raise DataError(_missing_message(searched))
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"malformed Fashion-MNIST files: {img_path} decodes to shape {images.shape}, "
            f"{lbl_path} to {labels.shape}; expected images (N,28,28) and labels (N,)"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"malformed Fashion-MNIST files: {images.shape[0]} images in {img_path} "
            f"but {labels.shape[0]} labels in {lbl_path}"
        )
    if labels.size and int(labels.max()) >= FASHION_MNIST_CLASSES:
        raise DataError(f"malformed Fashion-MNIST labels in {lbl_path}: label above 9")
    return images, labels


def _subset_indices(labels: np.ndarray, subset: int, seed: int) -> np.ndarray:
    """Seeded class-stratified choice of ``subset`` indices (classes interleaved round-robin).

    Each example gets its rank within its class in a seeded permutation; taking the smallest
    ranks first keeps the class mix as balanced as the data allows. Returned sorted.
    """
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    perm_labels = labels[perm].astype(np.int64)
    by_class = np.argsort(perm_labels, kind="stable")
    sorted_labels = perm_labels[by_class]
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    order = np.lexsort((np.arange(n), rank))  # by rank, then by position in perm
    return np.sort(perm[order[:subset]])


def _check_subset(subset: int | None, n: int) -> int | None:
    """Validate ``subset`` against the split size; None or n means the whole split."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)):
        raise ConfigError(f"subset must be an int or None, got {subset!r}")
    if not 0 < int(subset) <= n:
        raise ConfigError(f"subset must be in [1, {n}], got {subset}")
    return None if int(subset) == n else int(subset)


def fashion_mnist(
    split: str = "train",
    *,
    subset: int | None = None,
    root: str | Path | None = None,
    seed: int = 0,
) -> TensorDataset:
    """Fashion-MNIST as a TensorDataset of normalised float32 (N,1,28,28) images and int64 labels.

    ``subset`` keeps a seeded, class-stratified random subset of that size (same seed, same
    subset). Files come from ``root``, else ``$NETSHRINK_FASHION_MNIST``, else Debian's path;
    missing files raise DataError with the apt-get command that installs them.
    """
    split = _check_split(split)
    images, labels = _load_split(split, root)
    k = _check_subset(subset, labels.shape[0])
    if k is not None:
        idx = _subset_indices(labels, k, seed)
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # always a fresh copy
    x = x.unsqueeze(1).div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    logger.debug("fashion-mnist %s: %d examples", split, y.shape[0])
    return TensorDataset(x, y)


def fashion_mnist_loaders(
    batch_size: int = 128,
    *,
    subset_train: int | None = None,
    subset_test: int | None = None,
    root: str | Path | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders; train is shuffled by a generator seeded with ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    train = fashion_mnist("train", subset=subset_train, root=root, seed=seed)
    test = fashion_mnist("test", subset=subset_test, root=root, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers
    )
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., TensorDataset]] = {"fashion-mnist": fashion_mnist}
LOADERS: dict[str, Callable[..., tuple[DataLoader, DataLoader]]] = {
    "fashion-mnist": fashion_mnist_loaders
}


def canonical_name(name: str) -> str:
    """Registered spelling of data set ``name`` (any case, ``_`` for ``-``), else ConfigError."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return key


def _lookup(name: str, table: dict[str, Any]) -> Any:
    """Builder registered under ``name`` in ``table`` (ConfigError lists known names)."""
    return table[canonical_name(name)]


def get_dataset(name: str, split: str = "train", **kw: Any) -> TensorDataset:
    """Build data set ``name`` (e.g. "fashion-mnist") for ``split``; kwargs go to its builder."""
    return _lookup(name, DATASETS)(split, **kw)


def get_loaders(name: str, batch_size: int = 128, **kw: Any) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders of data set ``name``; kwargs go to its loader builder."""
    return _lookup(name, LOADERS)(batch_size, **kw)


# ----------------------------------------------------------------------------- photos

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "logo", "stereo_motorcycle",
          "camera", "moon", "page", "coins", "clock", "cell", "text", "horse", "brick",
          "grass", "gravel")
"""The scikit-image sample images that ship with the package (others need a download)."""

# Calibration and evaluation never share a photo: recovery stages are tuned on views of
# CALIBRATION_PHOTOS and scored on views of EVALUATION_PHOTOS (split by photo, not by view).
CALIBRATION_PHOTOS = PHOTOS[0::2]
EVALUATION_PHOTOS = PHOTOS[1::2]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photos(names: tuple[str, ...] = PHOTOS) -> list[tuple[str, torch.Tensor]]:
    """scikit-image's offline photos as (name, float (3, H, W) in [0, 1]); grey images are
    repeated to 3 channels, alpha is dropped, stereo_motorcycle gives its 3 images."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise DataError("scikit-image is not installed: pip install scikit-image") from None
    out = []
    for name in names:
        value = getattr(skdata, name)()
        images = value if isinstance(value, tuple) else (value,)
        for i, img in enumerate(images):
            raw = np.asarray(img)
            arr = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            if raw.dtype == np.uint8:
                arr = arr / 255.0
            elif arr.max() > 1.0 or arr.min() < 0.0:  # e.g. a disparity map
                arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            t = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3])).permute(2, 0, 1)
            out.append((name if len(images) == 1 else f"{name}{i}", t.contiguous()))
    return out


def photo_views(size: int = 224, crops: tuple[float, ...] = (1.0, 0.7),
                flips: bool = True, names: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """Deterministic evaluation views of the photos for ImageNet models: for each photo,
    centre square crops covering `crops` of its short side, each resized to `size` and
    also mirrored when `flips`, normalised with ImageNet mean/std. (N, 3, size, size)."""
    import torch.nn.functional as F

    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    views = []
    for _, img in photos(names):
        _, h, w = img.shape
        for frac in crops:
            side = max(1, int(min(h, w) * frac))
            top, left = (h - side) // 2, (w - side) // 2
            crop = img[:, top:top + side, left:left + side][None]
            view = F.interpolate(crop, size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=True)[0]
            view = (view.clamp(0, 1) - mean) / std
            views.append(view)
            if flips:
                views.append(view.flip(-1))
    return torch.stack(views)


def random_photo_views(n: int, size: int = 224, seed: int = 0,
                       names: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """`n` random training views (random square crops of 30-100% of the short side,
    random mirror), for distillation on unlabelled photos; seeded."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    imgs = [img for _, img in photos(names)]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = imgs[int(torch.randint(len(imgs), (1,), generator=gen))]
        _, h, w = img.shape
        side = max(8, int(min(h, w) * (0.3 + 0.7 * float(torch.rand(1, generator=gen)))))
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        crop = img[:, top:top + side, left:left + side][None]
        view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
        if float(torch.rand(1, generator=gen)) < 0.5:
            view = view.flip(-1)
        out[i] = (view.clamp(0, 1) - mean) / std
    return out


register_dataset("fashion-mnist", fashion_mnist_loaders)  # so netshrink.load_data finds it
