"""The one shared training loop of netshrink: baseline training and distillation fine-tuning.

Why one loop: every compression method fine-tunes the same way, so determinism,
checkpoint/resume, distributed runs and BatchNorm recalibration are written (and tested)
once. Compression methods (DKM, PQF annealing, ...) plug in through :class:`StepHook`.

One module per concern:

- ``config``: :class:`Finetune`, checked when built;
- ``loop``: :func:`fit`, its schedule and optimizer, :class:`StepHook`, :class:`FitResult`;
- ``checkpoint``: the checkpoint file (:data:`CHECKPOINT_NAME`, atomic write, checked load);
- ``distributed``: :func:`init_distributed`, :func:`is_main_process`, DDP, buffer broadcast;
- ``metrics``: :func:`evaluate`, :func:`fidelity`, :func:`agreement`, :func:`perplexity`,
  :func:`distillation_loss`;
- ``batchnorm``: :func:`recalibrate_batchnorm`;
- ``batches``: :func:`split_batch` and the small helpers on batches and models.
"""

from .batches import split_batch
from .batchnorm import recalibrate_batchnorm
from .checkpoint import CHECKPOINT_NAME
from .config import Finetune
from .distributed import init_distributed, is_main_process
from .loop import FitResult, StepHook, fit
from .metrics import agreement, distillation_loss, evaluate, fidelity, perplexity

__all__ = [
    "CHECKPOINT_NAME",
    "Finetune",
    "FitResult",
    "StepHook",
    "agreement",
    "distillation_loss",
    "evaluate",
    "fidelity",
    "fit",
    "init_distributed",
    "is_main_process",
    "perplexity",
    "recalibrate_batchnorm",
    "split_batch",
]
