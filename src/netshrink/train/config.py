"""`Finetune`: how to train or fine-tune (optimizer, schedule, distillation, checkpoints),
checked when it is built; and the small validators the rest of `netshrink.train` shares."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from netshrink.errors import ConfigError

DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
SCHEDULES = ("cosine", "constant")
# Config fields that change the trajectory: a resume with different values is not exact.
TRAJECTORY_FIELDS = (
    "epochs", "optimizer", "lr", "momentum", "weight_decay", "schedule", "min_lr",
    "warmup_steps", "distill_weight", "temperature", "max_steps_per_epoch", "seed", "grad_clip",
)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def is_int(value: object) -> bool:
    """True for real integers (bool excluded: ``epochs=True`` is a bug, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for ints and floats (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Finetune:
    """How to train or fine-tune: optimizer, schedule, distillation, checkpoints.

    ``lr=None`` picks 1e-3 for Adam and 0.05 for SGD. The cosine schedule decays per
    optimizer step from ``lr`` to ``min_lr`` over ``epochs * steps_per_epoch`` steps, after
    an optional linear warm-up. With a teacher, the loss is
    ``(1 - distill_weight) * CE + distill_weight * T^2 * KL(teacher_T || student_T)``.
    All values are checked when the object is built (ConfigError).
    """

    epochs: int = 1
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    min_lr: float = 1e-6
    warmup_steps: int = 0
    distill_weight: float = 0.5
    temperature: float = 4.0
    batch_size: int | None = None
    max_steps_per_epoch: int | None = None
    bn_recalibration_batches: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    seed: int = 0
    progress: bool = True
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        """Reject invalid settings at construction time, with the offending value named."""
        self._check_counts()
        self._check_rates()
        require(
            self.optimizer in DEFAULT_LR,
            f"Finetune.optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}",
        )
        require(
            self.schedule in SCHEDULES,
            f"Finetune.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}",
        )
        require(
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, (str, os.PathLike)),
            f"Finetune.checkpoint_dir must be a path string or None, got {self.checkpoint_dir!r}",
        )
        require(
            not self.resume or self.checkpoint_dir is not None,
            "Finetune.resume=True requires Finetune.checkpoint_dir (where to resume from)",
        )

    def _check_counts(self) -> None:
        """Validate the integer-valued fields."""
        require(is_int(self.epochs) and self.epochs >= 0,
                f"Finetune.epochs must be an integer >= 0, got {self.epochs!r}")
        require(is_int(self.warmup_steps) and self.warmup_steps >= 0,
                f"Finetune.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        require(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
                f"Finetune.batch_size must be None or an integer >= 1, got {self.batch_size!r}")
        require(
            self.max_steps_per_epoch is None
            or (is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 1),
            "Finetune.max_steps_per_epoch must be None or an integer >= 1, "
            f"got {self.max_steps_per_epoch!r}",
        )
        require(is_int(self.bn_recalibration_batches) and self.bn_recalibration_batches >= 0,
                "Finetune.bn_recalibration_batches must be an integer >= 0, "
                f"got {self.bn_recalibration_batches!r}")
        require(is_int(self.seed) and self.seed >= 0,
                f"Finetune.seed must be an integer >= 0, got {self.seed!r}")

    def _check_rates(self) -> None:
        """Validate the real-valued fields (comparisons are False for NaN, so NaN is rejected)."""
        require(self.lr is None
                or (is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)),
                f"Finetune.lr must be None or a finite number > 0, got {self.lr!r}")
        require(is_number(self.momentum) and 0.0 <= self.momentum < 1.0,
                f"Finetune.momentum must be in [0, 1), got {self.momentum!r}")
        require(is_number(self.weight_decay) and self.weight_decay >= 0.0,
                f"Finetune.weight_decay must be >= 0, got {self.weight_decay!r}")
        require(is_number(self.min_lr) and self.min_lr >= 0.0,
                f"Finetune.min_lr must be >= 0, got {self.min_lr!r}")
        require(
            self.schedule != "cosine" or self.optimizer not in DEFAULT_LR
            or self.min_lr <= self.effective_lr,
            f"Finetune.min_lr ({self.min_lr}) must not exceed lr ({self.effective_lr}) "
            "for the cosine schedule",
        )
        require(is_number(self.distill_weight) and 0.0 <= self.distill_weight <= 1.0,
                f"Finetune.distill_weight must be in [0, 1], got {self.distill_weight!r}")
        require(is_number(self.temperature) and self.temperature > 0
                and math.isfinite(self.temperature),
                f"Finetune.temperature must be a finite number > 0, got {self.temperature!r}")
        require(self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
                f"Finetune.grad_clip must be None or > 0, got {self.grad_clip!r}")

    @property
    def effective_lr(self) -> float:
        """The peak learning rate: ``lr``, or the optimizer's default when ``lr`` is None."""
        if self.lr is not None:
            return float(self.lr)
        return DEFAULT_LR.get(self.optimizer, DEFAULT_LR["adam"])
