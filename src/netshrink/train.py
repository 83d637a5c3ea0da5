"""The one shared training loop of netshrink: baseline training and distillation fine-tuning.

Why one loop: every compression method fine-tunes the same way, so determinism,
checkpoint/resume, distributed runs and BatchNorm recalibration are written (and tested)
once. Compression methods (DKM, PQF annealing, ...) plug in through :class:`StepHook`.

Determinism contract: each epoch ``e`` reseeds torch with ``seed + e`` and draws its batch
order from a sampler seeded the same way, so an epoch's result depends only on the state at
its start (model, optimizer, step counter). That state is what a checkpoint holds, which
makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
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

from netshrink.atomic import atomic_write
from netshrink.errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the training checkpoint inside ``Finetune.checkpoint_dir``."""

_CHECKPOINT_FORMAT = "netshrink.train.checkpoint/1"
_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
_SCHEDULES = ("cosine", "constant")
# Config fields that change the trajectory: a resume with different values is not exact.
_TRAJECTORY_FIELDS = (
    "epochs", "optimizer", "lr", "momentum", "weight_decay", "schedule", "min_lr",
    "warmup_steps", "distill_weight", "temperature", "max_steps_per_epoch", "seed", "grad_clip",
)


# --------------------------------------------------------------------------- configuration


def _require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    """True for real integers (bool excluded: ``epochs=True`` is a bug, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
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
        _require(
            self.optimizer in _DEFAULT_LR,
            f"Finetune.optimizer must be one of {sorted(_DEFAULT_LR)}, got {self.optimizer!r}",
        )
        _require(
            self.schedule in _SCHEDULES,
            f"Finetune.schedule must be one of {list(_SCHEDULES)}, got {self.schedule!r}",
        )
        _require(
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, (str, os.PathLike)),
            f"Finetune.checkpoint_dir must be a path string or None, got {self.checkpoint_dir!r}",
        )
        _require(
            not self.resume or self.checkpoint_dir is not None,
            "Finetune.resume=True requires Finetune.checkpoint_dir (where to resume from)",
        )

    def _check_counts(self) -> None:
        """Validate the integer-valued fields."""
        _require(_is_int(self.epochs) and self.epochs >= 0,
                 f"Finetune.epochs must be an integer >= 0, got {self.epochs!r}")
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
                 f"Finetune.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        _require(self.batch_size is None or (_is_int(self.batch_size) and self.batch_size >= 1),
                 f"Finetune.batch_size must be None or an integer >= 1, got {self.batch_size!r}")
        _require(
            self.max_steps_per_epoch is None
            or (_is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 1),
            "Finetune.max_steps_per_epoch must be None or an integer >= 1, "
            f"got {self.max_steps_per_epoch!r}",
        )
        _require(_is_int(self.bn_recalibration_batches) and self.bn_recalibration_batches >= 0,
                 "Finetune.bn_recalibration_batches must be an integer >= 0, "
                 f"got {self.bn_recalibration_batches!r}")
        _require(_is_int(self.seed) and self.seed >= 0,
                 f"Finetune.seed must be an integer >= 0, got {self.seed!r}")

    def _check_rates(self) -> None:
        """Validate the real-valued fields (comparisons are False for NaN, so NaN is rejected)."""
        _require(self.lr is None
                 or (_is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)),
                 f"Finetune.lr must be None or a finite number > 0, got {self.lr!r}")
        _require(_is_number(self.momentum) and 0.0 <= self.momentum < 1.0,
                 f"Finetune.momentum must be in [0, 1), got {self.momentum!r}")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0.0,
                 f"Finetune.weight_decay must be >= 0, got {self.weight_decay!r}")
        _require(_is_number(self.min_lr) and self.min_lr >= 0.0,
                 f"Finetune.min_lr must be >= 0, got {self.min_lr!r}")
        _require(
            self.schedule != "cosine" or self.optimizer not in _DEFAULT_LR
            or self.min_lr <= self.effective_lr,
            f"Finetune.min_lr ({self.min_lr}) must not exceed lr ({self.effective_lr}) "
            "for the cosine schedule",
        )
        _require(_is_number(self.distill_weight) and 0.0 <= self.distill_weight <= 1.0,
                 f"Finetune.distill_weight must be in [0, 1], got {self.distill_weight!r}")
        _require(_is_number(self.temperature) and self.temperature > 0
                 and math.isfinite(self.temperature),
                 f"Finetune.temperature must be a finite number > 0, got {self.temperature!r}")
        _require(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
                 f"Finetune.grad_clip must be None or > 0, got {self.grad_clip!r}")

    @property
    def effective_lr(self) -> float:
        """The peak learning rate: ``lr``, or the optimizer's default when ``lr`` is None."""
        if self.lr is not None:
            return float(self.lr)
        return _DEFAULT_LR.get(self.optimizer, _DEFAULT_LR["adam"])


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


# --------------------------------------------------------------------------- small helpers


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (first buffer, else CPU)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a batch into (inputs, labels-or-None): ``(x, y)``, ``(x,)`` or a bare tensor."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        if len(batch) == 1:
            return batch[0], None
        if isinstance(batch[1], Tensor):
            return batch[0], batch[1]
    raise ConfigError(
        "batches must be (x, y) or (x,) tuples/lists of tensors, or a bare tensor; "
        f"got {type(batch).__name__}"
    )


def _hard_targets(labels: Tensor, logits: Tensor) -> Tensor:
    """Class indices for accuracy: the labels, or their argmax when they are soft targets."""
    if labels.is_floating_point() and labels.shape == logits.shape:
        return labels.argmax(dim=-1)
    return labels


@contextlib.contextmanager
def _training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Set ``model`` to train/eval mode, restoring every submodule's own flag afterwards."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _limited(loader: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    """The loader, cut after ``max_batches`` batches when that is given."""
    if max_batches is None:
        return loader
    _require(_is_int(max_batches) and max_batches >= 1,
             f"max_batches must be None or an integer >= 1, got {max_batches!r}")
    return itertools.islice(loader, max_batches)


def _distributed() -> bool:
    """True when a torch.distributed process group is up (the only check in one process)."""
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> bool:
    """Join the process group that `torchrun` describes in the environment, if any.

    With WORLD_SIZE > 1 this initialises torch.distributed (NCCL when CUDA is available,
    else gloo) and returns True; in a plain single process it does nothing and returns
    False. `fit` then wraps the model in DistributedDataParallel by itself.
    """
    if _distributed():
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
    return not _distributed() or dist.get_rank() == 0


# --------------------------------------------------------------------------- losses and metrics


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    The T^2 factor keeps gradient magnitudes comparable to the cross-entropy term across
    temperatures (Hinton et al. 2015). Classes are on the last dimension.
    """
    _require(temperature > 0, f"temperature must be > 0, got {temperature!r}")
    _require(student_logits.shape == teacher_logits.shape,
             f"student logits {tuple(student_logits.shape)} and teacher logits "
             f"{tuple(teacher_logits.shape)} differ in shape")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


@torch.no_grad()
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, max_batches: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on labelled ``loader``, in [0, 1].

    Runs in eval mode without gradients and restores each submodule's previous mode.
    Raises ConfigError on unlabelled batches (use :func:`agreement`) or an empty loader.
    """
    device = _model_device(model)
    correct, total = 0, 0
    with _training_mode(model, False):
        for batch in _limited(loader, max_batches):
            inputs, labels = _split_batch(batch)
            if labels is None:
                raise ConfigError("evaluate() needs labelled (x, y) batches; "
                                  "use agreement() for unlabelled data")
            logits = model(inputs.to(device))
            targets = _hard_targets(labels.to(device), logits)
            correct += int((logits.argmax(dim=-1) == targets).sum())
            total += targets.numel()
    _require(total > 0, "evaluate(): the loader yielded no samples")
    return correct / total


@torch.no_grad()
def fidelity(
    model: nn.Module, reference: nn.Module, loader: Iterable[Any], max_batches: int | None = None
) -> dict[str, float]:
    """How faithfully ``model`` reproduces ``reference`` on (possibly unlabelled) inputs:
    ``agreement`` (fraction of inputs with the same top-1 class) and ``kl`` (mean
    KL(reference || model) of the softmax outputs, in nats per input). Labels, if any,
    are ignored; both models run in eval mode (restored after)."""
    device, ref_device = _model_device(model), _model_device(reference)
    same, total, kl = 0, 0, 0.0
    with _training_mode(model, False), _training_mode(reference, False):
        for batch in _limited(loader, max_batches):
            inputs, _ = _split_batch(batch)
            logits = model(inputs.to(device)).float()
            expected = reference(inputs.to(ref_device)).float().to(logits.device)
            same += int((logits.argmax(dim=-1) == expected.argmax(dim=-1)).sum())
            classes = logits.shape[-1]
            kl += float(F.kl_div(logits.reshape(-1, classes).log_softmax(-1),
                                 expected.reshape(-1, classes).log_softmax(-1),
                                 reduction="sum", log_target=True))
            total += logits.argmax(dim=-1).numel()
    _require(total > 0, "fidelity(): the loader yielded no samples")
    return {"agreement": same / total, "kl": kl / total}


def agreement(
    model: nn.Module, reference: nn.Module, loader: Iterable[Any], max_batches: int | None = None
) -> float:
    """Fraction of inputs on which ``model`` and ``reference`` predict the same class
    (see :func:`fidelity`)."""
    return fidelity(model, reference, loader, max_batches)["agreement"]


def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics from ``batches`` batches of ``loader``.

    Why: after weights change (compression, fine-tuning) the stored running stats no longer
    match the activations. Stats are reset and re-accumulated as an exact cumulative average
    (momentum=None) in train mode under no_grad; momentum and modes are restored afterwards.
    Labels are ignored, so unlabelled loaders work.
    """
    _require(_is_int(batches) and batches >= 1, f"batches must be an integer >= 1, got {batches!r}")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        logger.info("recalibrate_batchnorm: the model has no BatchNorm with running stats")
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    device, seen = _model_device(model), 0
    try:
        with torch.no_grad(), _training_mode(model, True):
            for batch in itertools.islice(loader, batches):
                inputs, _ = _split_batch(batch)
                model(inputs.to(device))
                seen += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    if seen < batches:
        logger.warning("recalibrate_batchnorm: asked for %d batches, the loader had only %d",
                       batches, seen)
    logger.info("recalibrated %d BatchNorm layers on %d batches", len(norms), seen)


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
    _require(dataset is not None,
             "fit() needs a torch DataLoader (or anything with .dataset) as train_loader")
    _require(not isinstance(dataset, IterableDataset),
             "fit() needs a map-style dataset: it reshuffles train_loader.dataset per epoch "
             "with a seeded sampler, which an IterableDataset cannot do")
    _require(len(dataset) > 0, "fit(): the training data set is empty")
    batch_size = config.batch_size or getattr(loader, "batch_size", None)
    _require(batch_size is not None,
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


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the old or the new file)."""
    atomic_write(path, lambda stream: torch.save(state, stream))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`_save_checkpoint` (weights_only, onto the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a netshrink training checkpoint ({_CHECKPOINT_FORMAT})")
    return state


def _warn_on_mismatch(state: dict[str, Any], config: Finetune, total_steps: int,
                      batch_size: int) -> None:
    """Warn when the resumed run differs from the checkpointed one (resume won't be exact)."""
    saved = state.get("config", {})
    changed = [name for name in _TRAJECTORY_FIELDS
               if name in saved and saved[name] != getattr(config, name)]
    if state.get("batch_size") != batch_size:
        changed.append("batch_size")
    if state.get("scheduler", {}).get("total_steps") != total_steps:
        changed.append("total_steps")
    if changed:
        logger.warning("resuming with different %s than the checkpoint: the result will not "
                       "match an uninterrupted run", ", ".join(changed))


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
        logits = run.teacher(inputs.to(_model_device(run.teacher)))
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
        targets = _hard_targets(labels, logits)
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    return loss, correct


def _train_step(run: _Run, batch: Any) -> Tensor:
    """One optimizer step with hooks around it; returns [loss * n, correct, n] (float64)."""
    inputs, labels = _split_batch(batch)
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
        _broadcast_buffers(run.model)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def _broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm stats) to every rank.

    DDP syncs buffers only at the start of each forward, so after an epoch each rank holds
    stats updated by its own last batch; this makes all ranks (and rank 0's checkpoint) agree.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def _trainable(model: nn.Module, parameters: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    """The parameters to optimise: the given ones, or all that require grad."""
    params = list(parameters) if parameters is not None else [
        p for p in model.parameters() if p.requires_grad]
    _require(len(params) > 0, "fit(): there are no parameters to optimise")
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
    state = _load_checkpoint(path)
    _warn_on_mismatch(state, cfg, run.total_steps, run.batch_size)
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
        "format": _CHECKPOINT_FORMAT,
        "epochs_done": epochs_done,
        "global_step": run.global_step,
        "batch_size": run.batch_size,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"step": run.global_step, "total_steps": run.total_steps},
        "history": [dict(record) for record in history],
        "config": config,
    }


def _wrap(model: nn.Module, device: torch.device, distributed: bool) -> nn.Module:
    """The module to call during training: the model, or a DDP wrapper of it."""
    if not distributed:
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device],
                                                   output_device=device)
    return nn.parallel.DistributedDataParallel(model)


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
    _require(isinstance(config, Finetune),
             f"config must be a Finetune, got {type(config).__name__}")
    hooks = tuple(hooks)
    for hook in hooks:
        _require(isinstance(hook, StepHook), f"hooks must be StepHook instances, got {hook!r}")
    batch_size = _check_train_loader(train_loader, config)
    distributed = _distributed()
    device = _model_device(model)
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
    path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    start, history, resumed_from = _maybe_resume(run, path)
    _set_lr(run.optimizer, _lr_at(config, run.global_step, run.total_steps))
    run.net = _wrap(model, device, distributed)
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
            _save_checkpoint(path, _checkpoint_state(run, epoch + 1, history))
        if distributed:
            dist.barrier()
        if run.is_main:
            logger.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                        ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
    if config.bn_recalibration_batches > 0:
        _recalibrate_after_fit(run)
    model.eval()
    return FitResult(history=history, resumed_from=resumed_from)
