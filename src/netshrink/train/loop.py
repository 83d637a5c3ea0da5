"""`fit`, the one shared training loop of netshrink: baseline training and distillation
fine-tuning, its schedule and optimizer, and the run state a checkpoint holds.

Why one loop: every compression method fine-tunes the same way, so determinism,
checkpoint/resume, distributed runs and BatchNorm recalibration are written (and tested)
once. Compression methods (DKM, PQF annealing, ...) plug in through :class:`StepHook`.

Determinism contract: each epoch ``e`` reseeds torch with ``seed + e`` and draws its batch
order from a sampler seeded the same way, so an epoch's result depends only on the state at
its start (model, optimizer, step counter). That state is what a checkpoint holds, which
makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from netshrink.errors import ConfigError

from .batches import hard_targets, model_device, split_batch
from .batchnorm import recalibrate_batchnorm
from .checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    warn_on_mismatch,
)
from .config import Finetune, require
from .distributed import broadcast_buffers, is_distributed, wrap
from .metrics import distillation_loss, evaluate

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- public types


class StepHook:
    """Callbacks into :func:`fit`; subclass and override only what you need.

    ``model`` is always the bare model (never the DistributedDataParallel wrapper).
    ``step`` is the global optimizer-step index, 0-based and continuous across epochs and
    across resume; ``before_step`` runs before the step's forward pass, ``after_step`` after
    ``optimizer.step()``, both with the same ``step``. ``epoch`` is 0-based. Hooks are not
    checkpointed: a hook whose behaviour depends on more than (model, step, epoch) makes
    resume inexact.
    """

    def on_train_start(self, model: nn.Module) -> None:
        """Called once per :func:`fit` call, before the optimizer is built and before a
        checkpoint is loaded (so structural changes, e.g. parametrizations, are checkpointed)."""

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of optimizer step ``step``."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after ``optimizer.step()`` of step ``step``."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called when epoch ``epoch`` ends, before evaluation and the checkpoint."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``history`` has one dict per finished epoch (including epochs restored from a
    checkpoint) with keys ``epoch`` (0-based), ``loss`` (mean per sample), ``train_acc``,
    ``eval_acc`` (only with an eval loader) and ``lr`` (the rate after the epoch's last step).
    ``resumed_from`` is the number of epochs already done in the checkpoint resumed from,
    or None for a fresh run.
    """

    history: list[dict[str, float]]
    resumed_from: int | None


# --------------------------------------------------------------------------- schedule


def _lr_at(config: Finetune, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up to the peak over ``warmup_steps`` steps, then constant or a cosine
    decay that reaches ``min_lr`` exactly at ``step == total_steps``.
    """
    peak = config.effective_lr
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    span = total_steps - config.warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (peak - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _make_optimizer(params: list[nn.Parameter], config: Finetune) -> torch.optim.Optimizer:
    """Build the configured optimizer (the schedule sets its lr before every step)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.effective_lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.effective_lr, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------- data


def _check_train_loader(loader: Any, config: Finetune) -> int:
    """Check the training loader can be re-batched per epoch; return the batch size."""
    dataset = getattr(loader, "dataset", None)
    require(dataset is not None,
            "fit() needs a torch DataLoader (or anything with .dataset) as train_loader")
    require(not isinstance(dataset, IterableDataset),
            "fit() needs a map-style dataset: it reshuffles train_loader.dataset per epoch "
            "with a seeded sampler, which an IterableDataset cannot do")
    require(len(dataset) > 0, "fit(): the training data set is empty")
    batch_size = config.batch_size or getattr(loader, "batch_size", None)
    require(batch_size is not None,
            "the train loader has no batch_size (it uses a batch_sampler): "
            "set Finetune.batch_size")
    return int(batch_size)


def _epoch_loader(source: Any, batch_size: int, seed: int, epoch: int,
                  distributed: bool) -> DataLoader:
    """A fresh loader over ``source.dataset`` whose order depends only on (seed, epoch).

    The given loader's own shuffling is ignored on purpose: a resumed run must see exactly
    the batches the interrupted one would have seen.
    """
    dataset = source.dataset
    if distributed:
        sampler: Any = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        sampler = RandomSampler(dataset, generator=generator)
    # A loader built with batch_size=None uses default_convert, which cannot batch.
    collate = source.collate_fn if getattr(source, "batch_sampler", None) is not None else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
        num_workers=getattr(source, "num_workers", 0), collate_fn=collate,
        pin_memory=getattr(source, "pin_memory", False),
        worker_init_fn=getattr(source, "worker_init_fn", None),
    )


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """Everything one training run carries from step to step."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    hooks: tuple[StepHook, ...]
    config: Finetune
    source: Any
    batch_size: int
    device: torch.device
    distributed: bool
    is_main: bool
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0


def _teacher_logits(run: _Run, inputs: Tensor, labels: Tensor | None) -> Tensor | None:
    """Teacher logits on ``inputs`` (no grad), or None when distillation is off."""
    if run.teacher is None or (labels is not None and run.config.distill_weight == 0.0):
        return None
    with torch.no_grad():
        logits = run.teacher(inputs.to(model_device(run.teacher)))
    return logits.to(run.device)


def _batch_loss(run: _Run, inputs: Tensor, labels: Tensor | None,
                teacher_logits: Tensor | None) -> tuple[Tensor, Tensor]:
    """Forward the batch; return (loss, number of correct predictions).

    Without labels "correct" counts agreement with the teacher's argmax.
    """
    logits = run.net(inputs)
    cfg = run.config
    if labels is None:
        assert teacher_logits is not None
        loss = distillation_loss(logits, teacher_logits, cfg.temperature)
        targets = teacher_logits.argmax(dim=-1)
    else:
        loss = F.cross_entropy(logits, labels)
        if teacher_logits is not None:
            distill = distillation_loss(logits, teacher_logits, cfg.temperature)
            loss = (1.0 - cfg.distill_weight) * loss + cfg.distill_weight * distill
        targets = hard_targets(labels, logits)
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    return loss, correct


def _train_step(run: _Run, batch: Any) -> Tensor:
    """One optimizer step with hooks around it; returns [loss * n, correct, n] (float64)."""
    inputs, labels = split_batch(batch)
    if labels is None and run.teacher is None:
        raise ConfigError("unlabelled training batches need a teacher (distillation-only "
                          "fine-tuning): pass teacher=... to fit()")
    inputs = inputs.to(run.device, non_blocking=True)
    labels = None if labels is None else labels.to(run.device, non_blocking=True)
    step = run.global_step
    for hook in run.hooks:
        hook.before_step(run.model, step)
    teacher_logits = _teacher_logits(run, inputs, labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss, correct = _batch_loss(run, inputs, labels, teacher_logits)
    loss.backward()
    if run.config.grad_clip is not None:
        nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    run.optimizer.step()
    run.global_step = step + 1
    _set_lr(run.optimizer, _lr_at(run.config, run.global_step, run.total_steps))
    for hook in run.hooks:
        hook.after_step(run.model, step)
    count = float(inputs.shape[0])
    return torch.stack([loss.detach().double() * count, correct.double(),
                        torch.tensor(count, dtype=torch.float64, device=run.device)])


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float]:
    """Train one epoch from its own seeded loader; return (mean loss, train accuracy)."""
    cfg = run.config
    torch.manual_seed(cfg.seed + epoch)
    loader = _epoch_loader(run.source, run.batch_size, cfg.seed, epoch, run.distributed)
    run.net.train()
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and run.is_main), leave=False, dynamic_ncols=True)
    with bar:
        for batch in itertools.islice(loader, run.steps_per_epoch):
            sums += _train_step(run, batch)
            if not bar.disable:
                loss_sum, correct, count = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.3f}",
                                refresh=False)
                bar.update(1)
    if run.distributed:
        dist.all_reduce(sums)
        broadcast_buffers(run.model)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def _trainable(model: nn.Module, parameters: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    """The parameters to optimise: the given ones, or all that require grad."""
    params = list(parameters) if parameters is not None else [
        p for p in model.parameters() if p.requires_grad]
    require(len(params) > 0, "fit(): there are no parameters to optimise")
    return params


def _maybe_resume(run: _Run, path: Path | None) -> tuple[int, list[dict[str, float]], int | None]:
    """Load the checkpoint when resuming; return (first epoch, history, resumed_from)."""
    cfg = run.config
    if path is None:
        return 0, [], None
    exists = path.is_file()
    if not cfg.resume:
        if exists and run.is_main:
            logger.warning("checkpoint %s exists but resume=False: starting fresh, it will be "
                           "overwritten", path)
        return 0, [], None
    if not exists:
        logger.info("resume=True but there is no checkpoint at %s: starting fresh", path)
        return 0, [], None
    state = load_checkpoint(path)
    warn_on_mismatch(state, cfg, run.total_steps, run.batch_size)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.global_step = int(state["global_step"])
    done = int(state["epochs_done"])
    if done > cfg.epochs:
        logger.warning("checkpoint %s has %d epochs, more than the %d configured", path, done,
                       cfg.epochs)
    logger.info("resumed from %s after epoch %d (global step %d)", path, done, run.global_step)
    return done, [dict(record) for record in state["history"]], done


def _checkpoint_state(run: _Run, epochs_done: int,
                      history: list[dict[str, float]]) -> dict[str, Any]:
    """What a checkpoint holds: tensors, dicts, lists, numbers and strings only."""
    config = dataclasses.asdict(run.config)
    config["checkpoint_dir"] = os.fspath(config["checkpoint_dir"])  # a Path won't load
    return {
        "format": CHECKPOINT_FORMAT,
        "epochs_done": epochs_done,
        "global_step": run.global_step,
        "batch_size": run.batch_size,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"step": run.global_step, "total_steps": run.total_steps},
        "history": [dict(record) for record in history],
        "config": config,
    }


def _recalibrate_after_fit(run: _Run) -> None:
    """BatchNorm recalibration on seeded training batches (the same ones on every rank)."""
    cfg = run.config
    torch.manual_seed(cfg.seed + cfg.epochs)
    loader = _epoch_loader(run.source, run.batch_size, cfg.seed, cfg.epochs, distributed=False)
    recalibrate_batchnorm(run.model, loader, cfg.bn_recalibration_batches)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    config: Finetune,
    *,
    teacher: nn.Module | None = None,
    eval_loader: Iterable[Any] | None = None,
    hooks: Sequence[StepHook] = (),
    parameters: Iterable[nn.Parameter] | None = None,
) -> FitResult:
    """Train ``model`` in place (from scratch, or fine-tune with distillation from ``teacher``).

    Each epoch reshuffles ``train_loader.dataset`` with a sampler seeded by ``seed + epoch``;
    with ``checkpoint_dir`` a checkpoint is written atomically after every epoch and
    ``resume=True`` continues from it bit-exactly. Under an initialised torch.distributed
    group the model is wrapped in DistributedDataParallel. Returns the per-epoch history;
    the model is left in eval mode.
    """
    require(isinstance(config, Finetune),
            f"config must be a Finetune, got {type(config).__name__}")
    hooks = tuple(hooks)
    for hook in hooks:
        require(isinstance(hook, StepHook), f"hooks must be StepHook instances, got {hook!r}")
    batch_size = _check_train_loader(train_loader, config)
    distributed = is_distributed()
    device = model_device(model)
    if teacher is not None:
        teacher.eval()
    for hook in hooks:
        hook.on_train_start(model)
    params = _trainable(model, parameters)
    steps_per_epoch = len(_epoch_loader(train_loader, batch_size, config.seed, 0, distributed))
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    run = _Run(
        model=model, net=model, teacher=teacher, optimizer=_make_optimizer(params, config),
        params=params, hooks=hooks, config=config, source=train_loader, batch_size=batch_size,
        device=device, distributed=distributed,
        is_main=not distributed or dist.get_rank() == 0,
        steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * config.epochs,
    )
    path = checkpoint_path(config)
    start, history, resumed_from = _maybe_resume(run, path)
    _set_lr(run.optimizer, _lr_at(config, run.global_step, run.total_steps))
    run.net = wrap(model, device, distributed)
    for epoch in range(start, config.epochs):
        loss, train_acc = _train_epoch(run, epoch)
        for hook in hooks:
            hook.after_epoch(model, epoch)
        record: dict[str, float] = {"epoch": epoch, "loss": loss, "train_acc": train_acc}
        if eval_loader is not None:
            record["eval_acc"] = evaluate(model, eval_loader)
        record["lr"] = run.optimizer.param_groups[0]["lr"]
        history.append(record)
        if path is not None and run.is_main:
            save_checkpoint(path, _checkpoint_state(run, epoch + 1, history))
        if distributed:
            dist.barrier()
        if run.is_main:
            logger.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                        ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
    if config.bn_recalibration_batches > 0:
        _recalibrate_after_fit(run)
    model.eval()
    return FitResult(history=history, resumed_from=resumed_from)
