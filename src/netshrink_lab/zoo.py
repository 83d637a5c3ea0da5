"""Reference models to compress, a name registry, and a cache of trained baselines.

Models: CIFAR-style ResNet-20/32/56 (He et al. 2016, section 4.2) and a small MobileNetV2.
The models are registered with `netshrink.arch` when this module is imported, and
``create`` records how a model was built (``model.netshrink_arch``), so a saved file names
its architecture and ``netshrink.load`` rebuilds it without ``model_like``. Baselines are
trained with the library's one training loop (``netshrink.train.fit``) and cached as
safetensors files under ``cache_dir()/baselines``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.arch import ARCH_ATTR, arch_of, create_arch, register_arch
from netshrink.atomic import atomic_write
from netshrink.errors import ConfigError, DataError
from netshrink_lab import data as datasets

__all__ = [
    "ARCH_ATTR",
    "MODELS",
    "BasicBlock",
    "InvertedResidual",
    "MobileNetV2Small",
    "PadShortcut",
    "ResNetCifar",
    "arch_of",
    "baseline_path",
    "cache_dir",
    "create",
    "load_baseline",
    "load_or_train_baseline",
    "mobilenetv2_small",
    "names",
    "resnet20",
    "resnet32",
    "resnet56",
    "save_baseline",
    "train_baseline",
]

logger = logging.getLogger(__name__)

_MIN_IMAGE_SIZE = 8


# ----------------------------------------------------------------------------- validation


def _int_arg(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int >= minimum, or raise ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_common(in_channels: Any, num_classes: Any, image_size: Any) -> tuple[int, int]:
    """Validate the arguments every zoo model takes; returns (in_channels, num_classes)."""
    _int_arg("image_size", image_size, _MIN_IMAGE_SIZE)
    return _int_arg("in_channels", in_channels, 1), _int_arg("num_classes", num_classes, 2)


def _kaiming_init(model: nn.Module) -> None:
    """He-normal convs (fan_out, ReLU), unit/zero BatchNorm, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- ResNet (CIFAR)


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: subsample by ``stride`` and zero-pad new channels.

    Written with plain tensor ops (slice + F.pad) so torch.fx can trace it.
    """

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection (ReLU after the sum)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(planes - in_planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): 16-channel 3x3 stem, stages of n blocks at 16/32/64 channels.

    `widths` replaces the three stage widths (the stem takes the first): thinner networks
    of the same depth, the width-multiplier baseline of SMH (docs/methods/smh.md#reported-results).
    """

    def __init__(self, depth_n: int, in_channels: int, num_classes: int, shortcut: str,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ConfigError(f"widths must be three positive channel counts, got {widths!r}")
        stem = int(widths[0])
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        stages: list[nn.Sequential] = []
        in_planes = stem
        for i, planes in enumerate(int(w) for w in widths):
            blocks = []
            for j in range(depth_n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(
    depth_n: int, in_channels: int, num_classes: int, image_size: int, shortcut: str
) -> ResNetCifar:
    """Validate arguments and build a CIFAR ResNet with ``depth_n`` blocks per stage."""
    in_channels, num_classes = _check_common(in_channels, num_classes, image_size)
    if shortcut not in ("A", "B"):
        raise ConfigError(f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 conv), "
                          f"got {shortcut!r}")
    return ResNetCifar(depth_n, in_channels, num_classes, shortcut)


def resnet20(
    in_channels: int = 1, num_classes: int = 10, image_size: int = 28, shortcut: str = "A"
) -> ResNetCifar:
    """ResNet-20 (3 blocks per stage, ~0.27M parameters with option A)."""
    return _resnet(3, in_channels, num_classes, image_size, shortcut)


def resnet32(
    in_channels: int = 1, num_classes: int = 10, image_size: int = 28, shortcut: str = "A"
) -> ResNetCifar:
    """ResNet-32 (5 blocks per stage, ~0.46M parameters with option A)."""
    return _resnet(5, in_channels, num_classes, image_size, shortcut)


def resnet56(
    in_channels: int = 1, num_classes: int = 10, image_size: int = 28, shortcut: str = "A"
) -> ResNetCifar:
    """ResNet-56 (9 blocks per stage, ~0.85M parameters with option A)."""
    return _resnet(9, in_channels, num_classes, image_size, shortcut)


# ----------------------------------------------------------------------------- MobileNetV2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping below 90 %."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, out_ch, 1, bias=False),
                                     nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


# (out channels, repeats, first stride); a stride-2 stem then 28 -> 14 -> 14 -> 7 -> 7 -> 4.
# The stride-2 stem (as in MobileNetV2) keeps the 6x-expanded activations small: with a
# stride-1 stem a CPU training step is ~6x slower for no gain on 28x28 inputs.
_MOBILENET_STAGES = ((16, 1, 1), (24, 2, 2), (32, 3, 1), (64, 2, 2))
_MOBILENET_EXPANSION = 6
_MOBILENET_STEM = 16
_MOBILENET_STEM_STRIDE = 2
_MOBILENET_LAST = 256


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2 for 28x28-ish inputs: stride-2 stem, 8 inverted residuals, 1x1 head."""

    def __init__(self, in_channels: int, num_classes: int, width: float) -> None:
        super().__init__()
        stem = _make_divisible(_MOBILENET_STEM * width)
        last = _make_divisible(_MOBILENET_LAST * max(1.0, width))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=_MOBILENET_STEM_STRIDE, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(),
        )
        blocks: list[nn.Module] = []
        in_ch = stem
        for channels, repeats, stride in _MOBILENET_STAGES:
            out_ch = _make_divisible(channels * width)
            for j in range(repeats):
                blocks.append(
                    InvertedResidual(in_ch, out_ch, stride if j == 0 else 1, _MOBILENET_EXPANSION)
                )
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenetv2_small(
    in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0
) -> MobileNetV2Small:
    """Small MobileNetV2 (channels 16-24-32-64, head 256): pointwise-dominated, depthwise 3x3."""
    in_channels, num_classes = _check_common(in_channels, num_classes, image_size)
    if (
        isinstance(width, bool)
        or not isinstance(width, numbers.Real)
        or not math.isfinite(float(width))
        or not 0.0 < float(width) <= 8.0
    ):
        raise ConfigError(f"width must be a number in (0, 8], got {width!r}")
    return MobileNetV2Small(in_channels, num_classes, float(width))


# ----------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenetv2_small": mobilenetv2_small,
}


def names() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(MODELS)


def _json_fallback(value: Any) -> Any:
    """json.dumps ``default``: numbers and 0-d tensors as numbers, anything else as text."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` and record ``{"name", "kwargs"}`` on it.

    The record (``model.netshrink_arch``, see `netshrink.arch.create_arch`) holds every
    argument, defaults included, so ``create(**arch_of(model))`` rebuilds the same
    architecture. Unknown names or bad arguments raise ConfigError.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(names())}")
    return create_arch(name, **kwargs)


for _name, _factory in MODELS.items():  # so that netshrink.load finds them by name
    register_arch(_name, _factory, module=__name__)


# ----------------------------------------------------------------------------- baseline cache


def cache_dir() -> Path:
    """Root of netshrink's cache: ``$NETSHRINK_CACHE``, else ``~/.cache/netshrink``."""
    env = os.environ.get("NETSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "netshrink"


def baseline_path(name: str, data: str = "fashion-mnist") -> Path:
    """Where the baseline of model ``name`` trained on ``data`` is cached."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(names())}")
    return cache_dir() / "baselines" / f"{name}-{datasets.canonical_name(data)}.safetensors"


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """JSON-encode every metadata value (safetensors metadata is str -> str)."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        try:
            out[str(key)] = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metadata {key!r} is not JSON-serialisable: {exc}") from exc
    return out


def _decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Inverse of ``_encode_metadata``; values that are not JSON are kept as strings."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def save_baseline(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state_dict and ``metadata`` (plus its arch) to a safetensors file.

    Tensors are cloned contiguous (so shared or strided tensors save), every metadata value is
    stored as JSON text, and the file is written to a temp file then renamed (atomic).
    """
    from safetensors.torch import save

    arch = metadata.get("arch") or arch_of(model)
    if not isinstance(arch, dict) or "name" not in arch:
        raise ConfigError("model has no recorded architecture; build it with zoo.create")
    meta = _encode_metadata({**metadata, "arch": arch})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    atomic_write(path, save(tensors, metadata=meta))
    logger.info("saved baseline %s to %s", arch["name"], path)
    return path


def load_baseline(
    name: str, data: str = "fashion-mnist", path: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a cached baseline from the arch in its metadata; returns (model in eval, metadata).

    A missing file raises DataError saying which command trains it; a corrupt file, an arch
    that is not ``name`` or weights that do not match strictly raise DataError too.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path) if path is not None else baseline_path(name, data)
    if not p.is_file():
        raise DataError(
            f"no baseline for {name!r} on {data!r} at {p}; "
            f"run `netshrink train-baseline {name} --data {data}` to train and cache it"
        )
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"cannot read baseline file {p}: {exc}") from exc
    metadata = _decode_metadata(raw_meta)
    arch = metadata.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise DataError(f"baseline file {p} has no architecture record in its metadata")
    if arch["name"] != name:
        raise DataError(f"baseline file {p} holds {arch['name']!r}, not {name!r}")
    try:
        model = create(arch["name"], **arch.get("kwargs", {}))
        model.load_state_dict(state, strict=True)
    except (ConfigError, RuntimeError) as exc:
        raise DataError(f"baseline file {p} does not match its architecture: {exc}") from exc
    return model.eval(), metadata


# ----------------------------------------------------------------------------- training


def train_baseline(
    name: str,
    data: str = "fashion-mnist",
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 0.05,
    subset_train: int | None = None,
    subset_test: int | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    max_steps_per_epoch: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train model ``name`` on ``data`` from scratch, measure test accuracy, optionally cache it.

    Uses the library's one training loop (``netshrink.train.fit``) with SGD + cosine schedule.
    Returns (model in eval mode, metadata); with ``cache`` the result goes to
    ``baseline_path(name, data)``, where ``load_baseline`` finds it.
    """
    from netshrink.train import Finetune, evaluate, fit, is_main_process

    _int_arg("epochs", epochs, 1)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(names())}")
    data = datasets.canonical_name(data)
    train_loader, test_loader = datasets.get_loaders(
        data, batch_size, subset_train=subset_train, subset_test=subset_test, seed=seed
    )
    torch.manual_seed(seed)
    model = create(name, in_channels=1, num_classes=10, image_size=28)
    steps = len(train_loader) if max_steps_per_epoch is None else min(
        len(train_loader), max_steps_per_epoch
    )
    config = Finetune(
        epochs=epochs,
        optimizer="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_steps=(steps * epochs) // 20,
        max_steps_per_epoch=max_steps_per_epoch,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        seed=seed,
        progress=progress,
    )
    logger.info("training baseline %s on %s: %d epochs x %d steps (batch %d, lr %g)",
                name, data, epochs, steps, batch_size, lr)
    start = time.perf_counter()
    result = fit(model, train_loader, config, eval_loader=None)
    train_seconds = time.perf_counter() - start
    accuracy = float(evaluate(model, test_loader))
    logger.info("baseline %s on %s: test accuracy %.4f after %.1f s",
                name, data, accuracy, train_seconds)
    metadata: dict[str, Any] = {
        "arch": arch_of(model),
        "data": data,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "subset_train": subset_train,
        "subset_test": subset_test,
        "max_steps_per_epoch": max_steps_per_epoch,
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "seed": seed,
        "torch_version": torch.__version__,
        # round-trip through JSON so numpy/torch scalars in the history cannot break saving
        "history": json.loads(json.dumps(list(getattr(result, "history", []) or []),
                                         default=_json_fallback)),
    }
    model.eval()
    if cache and is_main_process():
        save_baseline(model, baseline_path(name, data), metadata)
    return model, metadata


def load_or_train_baseline(name: str, data: str = "fashion-mnist"
                           ) -> tuple[nn.Module, dict[str, Any]]:
    """The cached baseline of ``name`` on ``data``; trained (defaults) and cached first when
    it cannot be loaded. Used by the CLI, the demo and the benchmarks."""
    try:
        model, metadata = load_baseline(name, data)
        logger.info("using cached baseline %s", baseline_path(name, data))
    except DataError:
        logger.info("no cached baseline for %s on %s: training one now (cached afterwards)",
                    name, data)
        model, metadata = train_baseline(name, data)
    return model, metadata
