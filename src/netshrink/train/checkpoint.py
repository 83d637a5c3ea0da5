"""The training checkpoint file: its name inside ``Finetune.checkpoint_dir``, its format tag,
the atomic write, the checked load (weights_only, nothing unpickled) and the warning when a
resumed run's settings differ from the checkpointed one's. What a checkpoint holds is
written and restored by the loop (`netshrink.train.loop`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from netshrink.atomic import atomic_write
from netshrink.errors import ConfigError

from .config import TRAJECTORY_FIELDS, Finetune

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the training checkpoint inside ``Finetune.checkpoint_dir``."""

CHECKPOINT_FORMAT = "netshrink.train.checkpoint/1"


def checkpoint_path(config: Finetune) -> Path | None:
    """Where ``config`` keeps its checkpoint, or None without a checkpoint_dir."""
    return Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the old or the new file)."""
    atomic_write(path, lambda stream: torch.save(state, stream))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (weights_only, onto the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a netshrink training checkpoint ({CHECKPOINT_FORMAT})")
    return state


def warn_on_mismatch(state: dict[str, Any], config: Finetune, total_steps: int,
                     batch_size: int) -> None:
    """Warn when the resumed run differs from the checkpointed one (resume won't be exact)."""
    saved = state.get("config", {})
    changed = [name for name in TRAJECTORY_FIELDS
               if name in saved and saved[name] != getattr(config, name)]
    if state.get("batch_size") != batch_size:
        changed.append("batch_size")
    if state.get("scheduler", {}).get("total_steps") != total_steps:
        changed.append("total_steps")
    if changed:
        logger.warning("resuming with different %s than the checkpoint: the result will not "
                       "match an uninterrupted run", ", ".join(changed))
