"""Distributed runs under `torchrun`: joining the process group, who writes files, the
DistributedDataParallel wrapper and keeping BatchNorm buffers equal across ranks.

In a plain single process every function here is a no-op or says "main process"."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a torch.distributed process group is up (the only check in one process)."""
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> bool:
    """Join the process group that `torchrun` describes in the environment, if any.

    With WORLD_SIZE > 1 this initialises torch.distributed (NCCL when CUDA is available,
    else gloo) and returns True; in a plain single process it does nothing and returns
    False. `fit` then wraps the model in DistributedDataParallel by itself.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(),
                dist.get_world_size(), backend)
    return True


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a distributed run (who writes files)."""
    return not is_distributed() or dist.get_rank() == 0


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm stats) to every rank.

    DDP syncs buffers only at the start of each forward, so after an epoch each rank holds
    stats updated by its own last batch; this makes all ranks (and rank 0's checkpoint) agree.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def wrap(model: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    """The module to call during training: the model, or a DDP wrapper of it."""
    if not distributed:
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device],
                                                   output_device=device)
    return nn.parallel.DistributedDataParallel(model)
