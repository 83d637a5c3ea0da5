"""Data from a spec string, split once into calibration/fine-tuning and evaluation parts
that never share an item: ``load_data("imagefolder:photos/", model=model)``.

Specs:
- a registered data set name (``register_dataset``; Fashion-MNIST after
  ``import netshrink_lab.data``): its own train split calibrates and fine-tunes, its test
  split evaluates;
- ``imagefolder:DIR``: labelled sub-folders (one per class, sorted names) or a flat folder
  of unlabelled images; split by file (per class); resized (short side to size/crop_pct) and
  centre-cropped to the model's input size, normalised by --mean/--std, else the model's
  (`netshrink.sources.model_preprocessing`), else ImageNet's (with a logged note);
- ``text:FILE_OR_DIR``: token blocks of ``seq_len`` for language models, with the
  tokenizer of an ``hf:`` model; documents are the files of a directory or the blank-line
  separated parts of one file, and the split is by document;
- ``npz:FILE``: arrays ``x`` and optional ``y``, split by row.

`score` is the one number the command line reports for a model on a `DataSource`:
accuracy on labelled data, else top-1 agreement with the original model, and perplexity
on text (the metrics live in `netshrink.train.metrics`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .arch import arch_of
from .errors import ConfigError, DataError
from .sources import IMAGENET_MEAN, IMAGENET_STD, model_preprocessing
from .train.metrics import agreement, evaluate, perplexity

__all__ = ["DATA_SPECS", "DataSource", "Score", "check_data_spec", "load_data",
           "register_dataset", "score"]

logger = logging.getLogger(__name__)

DATA_SPECS = ("a registered name (fashion-mnist), imagefolder:DIR, text:FILE_OR_DIR or "
              "npz:FILE")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff", ".ppm"})

NamedLoaders = Callable[..., tuple[DataLoader, DataLoader]]
"""(batch_size, *, subset_train, subset_test, seed) -> (train loader, test loader)."""

_NAMED: dict[str, NamedLoaders] = {}


def register_dataset(name: str, loaders: NamedLoaders) -> None:
    """Make ``load_data(name)`` use ``loaders`` (labelled image data with its own
    train/test split); netshrink_lab.data registers fashion-mnist this way."""
    _NAMED[name] = loaders


@dataclass
class DataSource:
    """Explicit, disjoint splits: ``train`` calibrates and fine-tunes, ``eval`` measures.
    ``kind`` is "image", "text" or "array"; ``labelled`` whether batches are (x, y)."""

    spec: str
    kind: str
    train: DataLoader
    eval: DataLoader
    labelled: bool
    n_train: int
    n_eval: int
    split: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what the data is and how it was split."""
        what = "labelled" if self.labelled else "unlabelled"
        return (f"{self.spec}: {what} {self.kind} data, {self.n_train} calibration/training "
                f"and {self.n_eval} evaluation items ({self.split})")


# --------------------------------------------------------------------------- splitting


def _check_fraction(eval_fraction: float) -> float:
    if not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise ConfigError(f"--eval-fraction must lie in (0, 1), got {eval_fraction!r}")
    return float(eval_fraction)


def _split_indices(groups: Sequence[int], eval_fraction: float, seed: int, spec: str,
                   unit: str) -> tuple[list[int], list[int]]:
    """Seeded split of items 0..n-1 into (train, eval), per group (class) so each class
    with 2+ items is in both; every item goes to exactly one side."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    evals: list[int] = []
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for g in sorted(by_group):
        items = [by_group[g][j] for j in rng.permutation(len(by_group[g]))]
        k = min(max(round(len(items) * eval_fraction), 1), len(items) - 1) if len(
            items) > 1 else 0
        evals += items[:k]
        train += items[k:]
    if not train or not evals:
        raise DataError(f"{spec} has {len(groups)} {unit}: too few to split into calibration "
                        f"and evaluation parts (need at least 2)")
    order = rng.permutation(len(train))
    return [train[i] for i in order], sorted(evals)


def _subset(items: list[Any], n: int | None, what: str) -> list[Any]:
    if n is None:
        return items
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{what} must be a positive integer, got {n!r}")
    return items[:n]


def _loaders(train: Dataset, evals: Dataset, batch_size: int, seed: int
             ) -> tuple[DataLoader, DataLoader]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(evals, batch_size=batch_size, shuffle=False))


# --------------------------------------------------------------------------- images


def _floats(values: Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = tuple(float(v) for v in values)
    if not out or (what == "std" and any(v <= 0 for v in out)):
        raise ConfigError(f"--{what} needs positive numbers, got {values!r}")
    return out


class ImageFiles(Dataset):
    """Images read with Pillow on access: short side resized to ``size / crop_pct``,
    centre-cropped to ``size``, scaled to [0, 1] and normalised; (x, label) or x."""

    def __init__(self, files: list[Path], labels: list[int] | None, size: int,
                 crop_pct: float, mean: Sequence[float], std: Sequence[float],
                 channels: int) -> None:
        self.files, self.labels = files, labels
        self.size, self.crop_pct, self.channels = size, crop_pct, channels
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                w, h = img.size
                short = max(self.size, round(self.size / self.crop_pct))
                scale = short / min(w, h)
                img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                                 Image.Resampling.BILINEAR)
                w, h = img.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                img = img.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {self.files[i]}: {e}") from None
        x = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)
        x = (x - self.mean) / self.std
        return x if self.labels is None else (x, self.labels[i])


def _image_files(root: Path, spec: str) -> tuple[list[Path], list[int] | None, list[str]]:
    """(files, labels or None, class names) of an image folder."""
    if not root.is_dir():
        raise DataError(f"{spec}: {root} is not a directory")
    visible = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    flat = [p for p in visible if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    classes = [p for p in visible if p.is_dir()]
    per_class = [sorted(f for f in d.rglob("*") if f.is_file() and
                        f.suffix.lower() in IMAGE_SUFFIXES) for d in classes]
    if any(per_class) and flat:
        raise DataError(f"{spec} mixes images ({flat[0].name}) with class folders: use "
                        f"either one sub-folder per class or a flat folder of images")
    if any(per_class):
        names = [d.name for d, files in zip(classes, per_class, strict=True) if files]
        files = [f for fs in per_class for f in fs]
        labels = [i for i, fs in enumerate(fs for fs in per_class if fs) for _ in fs]
        return files, labels, names
    if not flat:
        raise DataError(f"{spec}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return flat, None, []


def _image_source(spec: str, root: Path, model: nn.Module | None, image_size: int | None,
                  mean: Sequence[float] | None, std: Sequence[float] | None,
                  eval_fraction: float, seed: int, batch_size: int,
                  subset_train: int | None, subset_eval: int | None) -> DataSource:
    files, labels, classes = _image_files(root, spec)
    pre = model_preprocessing(model)
    notes: list[str] = []
    size = image_size or pre.get("image_size")
    if size is None:
        size = 224
        notes.append("input size 224 (not known for this model; pass --image-size)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--image-size must be a positive integer, got {size!r}")
    channels = int(pre.get("channels", 3))
    mean_, std_ = _floats(mean, "mean"), _floats(std, "std")
    if mean_ is None or std_ is None:
        if "mean" in pre and "std" in pre:
            mean_, std_ = mean_ or pre["mean"], std_ or pre["std"]
        else:
            mean_, std_ = mean_ or IMAGENET_MEAN, std_ or IMAGENET_STD
            notes.append("ImageNet mean/std (not known for this model; pass --mean/--std)")
    if channels == 1 and len(mean_) == 3 and len(std_) == 3:
        mean_, std_ = (sum(mean_) / 3,), (sum(std_) / 3,)
    if len(mean_) not in (1, channels) or len(std_) not in (1, channels):
        raise ConfigError(f"--mean/--std need 1 or {channels} values for this model's "
                          f"{channels}-channel input, got {len(mean_)} and {len(std_)}")
    crop_pct = float(pre.get("crop_pct", 0.875))
    groups = labels if labels is not None else [0] * len(files)
    train_idx, eval_idx = _split_indices(groups, _check_fraction(eval_fraction), seed, spec,
                                         "images")
    train_idx = _subset(train_idx, subset_train, "subset_train")
    eval_idx = _subset(eval_idx, subset_eval, "subset_eval")

    def part(idx: list[int]) -> ImageFiles:
        return ImageFiles([files[i] for i in idx],
                          None if labels is None else [labels[i] for i in idx],
                          size, crop_pct, mean_, std_, channels)

    train, evals = _loaders(part(train_idx), part(eval_idx), batch_size, seed)
    how = f"split by file{', per class' if labels is not None else ''}"
    if classes:
        how += f"; {len(classes)} classes: {', '.join(classes[:5])}" + (
            ", ..." if len(classes) > 5 else "")
    return DataSource(spec, "image", train, evals, labels is not None, len(train_idx),
                      len(eval_idx), f"{how}; {size}x{size}", notes)


# --------------------------------------------------------------------------- text


def _documents(path: Path, spec: str) -> list[str]:
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)]
        docs = [p.read_text(errors="replace") for p in files]
    elif path.is_file():
        docs = re.split(r"\n\s*\n", path.read_text(errors="replace"))
    else:
        raise DataError(f"{spec}: {path} does not exist")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{spec}: no text in {path}")
    return docs


def _tokenizer_of(model: nn.Module | None, spec: str) -> Any:
    name = str((arch_of(model) or {}).get("name", "")) if model is not None else ""
    if not name.startswith("hf:"):
        raise ConfigError(f"{spec} needs the tokenizer of an hf: model (--model hf:DIR)")
    from .sources import _import

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _import("transformers", name, "transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(name[3:])
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name} has no usable tokenizer for {spec}: {e}") from None


def _blocks(tokenizer: Any, docs: list[str], seq_len: int, spec: str, what: str
            ) -> torch.Tensor:
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for doc in docs:
        ids += list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the {what} documents of {spec} hold {len(ids)} tokens, fewer than "
                        f"--seq-len {seq_len}: pass a smaller --seq-len or more text")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)


def _text_source(spec: str, path: Path, model: nn.Module | None, tokenizer: Any,
                 seq_len: int, eval_fraction: float, seed: int, batch_size: int,
                 subset_train: int | None, subset_eval: int | None) -> DataSource:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"--seq-len must be an integer >= 2, got {seq_len!r}")
    docs = _documents(path, spec)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model, spec)
    train_idx, eval_idx = _split_indices([0] * len(docs), _check_fraction(eval_fraction),
                                         seed, spec, "documents")
    train = _blocks(tokenizer, [docs[i] for i in train_idx], seq_len, spec, "calibration")
    evals = _blocks(tokenizer, [docs[i] for i in eval_idx], seq_len, spec, "evaluation")
    train = train[:len(_subset(list(range(len(train))), subset_train, "subset_train"))]
    evals = evals[:len(_subset(list(range(len(evals))), subset_eval, "subset_eval"))]
    tl, el = _loaders(TensorDataset(train), TensorDataset(evals), batch_size, seed)
    return DataSource(spec, "text", tl, el, False, len(train), len(evals),
                      f"blocks of {seq_len} tokens; split by document: {len(train_idx)} / "
                      f"{len(eval_idx)} documents")


# --------------------------------------------------------------------------- arrays


def _npz_source(spec: str, path: Path, eval_fraction: float, seed: int, batch_size: int,
                subset_train: int | None, subset_eval: int | None) -> DataSource:
    if not path.is_file():
        raise DataError(f"{spec}: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {spec}: {e}") from None
    if "x" not in arrays:
        raise DataError(f"{spec} has no array 'x' (it has: {', '.join(sorted(arrays)) or 'none'})")
    x, y = arrays["x"], arrays.get("y")
    if y is not None and len(y) != len(x):
        raise DataError(f"{spec}: x has {len(x)} rows but y has {len(y)}")
    tx = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32) if x.dtype.kind == "f"
                                               else x.astype(np.int64)))
    ty = None if y is None else torch.from_numpy(np.ascontiguousarray(
        y.astype(np.int64) if y.dtype.kind in "iub" else y.astype(np.float32)))
    train_idx, eval_idx = _split_indices([0] * len(tx), _check_fraction(eval_fraction), seed,
                                         spec, "rows")
    train_idx = _subset(train_idx, subset_train, "subset_train")
    eval_idx = _subset(eval_idx, subset_eval, "subset_eval")

    def part(idx: list[int]) -> TensorDataset:
        rows = torch.tensor(idx, dtype=torch.long)
        return TensorDataset(tx[rows]) if ty is None else TensorDataset(tx[rows], ty[rows])

    train, evals = _loaders(part(train_idx), part(eval_idx), batch_size, seed)
    return DataSource(spec, "array", train, evals, ty is not None, len(train_idx),
                      len(eval_idx), "split by row")


# --------------------------------------------------------------------------- load_data


def check_data_spec(spec: str) -> str:
    """The stripped spec after the checks that need no model (known kind or registered
    name, the path exists): the command line runs them before loading or training any
    model. ConfigError / DataError otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--data needs a spec: {DATA_SPECS}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("imagefolder", "text", "npz"):
        if not rest:
            raise ConfigError(f"--data {spec}: the path after '{prefix}:' is missing")
        path = Path(rest).expanduser()
        if not path.exists():
            raise DataError(f"--data {spec}: {path} does not exist")
        if prefix == "imagefolder" and not path.is_dir():
            raise DataError(f"--data {spec}: {path} is not a directory")
        if prefix == "npz" and not path.is_file():
            raise DataError(f"--data {spec}: {path} is not a file")
    elif sep:
        raise ConfigError(f"unknown data kind {prefix!r} in --data {spec}; use {DATA_SPECS}")
    elif spec.lower().replace("_", "-") not in _NAMED:
        hint = " (import netshrink_lab.data first)" if spec == "fashion-mnist" else ""
        raise ConfigError(f"unknown data set {spec!r}{hint}; use {DATA_SPECS} "
                          f"(registered: {', '.join(sorted(_NAMED)) or 'none'})")
    return spec


def load_data(spec: str, *, model: nn.Module | None = None, image_size: int | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              seq_len: int = 128, batch_size: int = 64, eval_fraction: float = 0.2,
              seed: int = 0, subset_train: int | None = None, subset_eval: int | None = None,
              tokenizer: Any = None) -> DataSource:
    """The `DataSource` a data spec names (see the module docstring). ``model`` supplies
    the image preprocessing and the tokenizer where the flags do not. A bad spec, a
    missing or empty folder or too few items to split raise ConfigError / DataError."""
    spec = check_data_spec(spec)
    prefix, sep, rest = spec.partition(":")
    if sep:
        path = Path(rest).expanduser()
        if prefix == "imagefolder":
            source = _image_source(spec, path, model, image_size, mean, std, eval_fraction,
                                   seed, batch_size, subset_train, subset_eval)
        elif prefix == "text":
            source = _text_source(spec, path, model, tokenizer, seq_len, eval_fraction, seed,
                                  batch_size, subset_train, subset_eval)
        else:
            source = _npz_source(spec, path, eval_fraction, seed, batch_size, subset_train,
                                 subset_eval)
    else:
        key = spec.lower().replace("_", "-")
        train, evals = _NAMED[key](batch_size, subset_train=subset_train,
                                   subset_test=subset_eval, seed=seed)
        source = DataSource(key, "image", train, evals, True, len(train.dataset),
                            len(evals.dataset), "its own train and test splits")
    for note in source.notes:
        logger.info("%s: %s", spec, note)
    return source


# --------------------------------------------------------------------------- score


@dataclass(frozen=True)
class Score:
    """One measurement of a model on a `DataSource`'s eval split."""

    metric: str
    value: float
    higher_is_better: bool

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.4f}"


def score(model: nn.Module, data: DataSource, reference: nn.Module | None = None, *,
          max_batches: int | None = None) -> Score:
    """Perplexity on text (causal language models); accuracy on labelled data; else top-1
    agreement with ``reference``, the original model (needed then: ConfigError without)."""
    if data.kind == "text":
        if not getattr(model, "causal_lm", False):
            raise ConfigError(f"{data.spec} is scored by perplexity, which needs a causal "
                              f"language model (an hf: ...ForCausalLM)")
        return Score("perplexity", perplexity(model, data.eval, max_batches), False)
    if data.labelled:
        return Score("accuracy", evaluate(model, data.eval, max_batches=max_batches), True)
    if reference is None:
        raise ConfigError(f"{data.spec} is unlabelled: the score is top-1 agreement with the "
                          f"original model, which is needed (--model SPEC --weights FILE)")
    return Score("agreement", agreement(model, reference, data.eval, max_batches), True)
