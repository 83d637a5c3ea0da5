"""Block-wise reconstruction of a compressed model from a few unlabelled inputs (BRECQ).

BRECQ (Li et al., ICLR 2021, §3-4; issue 22): after post-training compression, train each
block's stored parameters so that the block reproduces the original block's outputs, one
block at a time, then (optionally) a short end-to-end distillation. Here:
- blocks are found by `blocks.find_blocks` (or named in `Reconstruct.blocks`); the stem
  (what runs before the first block) and the head (after the last) are blocks of their own;
- a block's inputs come from the *student's* already reconstructed blocks, its targets from
  the *teacher's* block on the teacher's own inputs, so errors do not accumulate (§4);
- only stored parameters whose size and layout are fixed are trained: palette codebooks
  and scales, low-rank factors, per-layer scalars, biases and norm affines (and the dense
  weights of uncompressed layers with `dense=True`); codes stay fixed, or with
  `codes="soft"` scalar palettes re-choose each code between two codebook entries
  (AdaRound, as BRECQ does; softcodes.py): either way the codes keep their count and
  width, so the file has the same bytes count. Shared
  representations (SMH's bank, an `attached` stored module) are left alone. Loss: MSE of
  the block outputs relative to their mean square (plus AdaRound's rounding regulariser
  with soft codes), Adam with a cosine-decayed rate;
- every module stays in eval mode (BatchNorm running statistics do not move);
- memory: one block's input and output activations (student and teacher) are held at a
  time, on the CPU; `memory_mb` lowers the number of samples when they would not fit;
- a block whose calibration error does not improve, or whose parameters become
  non-finite, gets its parameters back (the report says so).
The final distillation (KL on the outputs) runs in the shared loop `netshrink.train.fit`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from .blocks import (
    Trace,
    block_input,
    block_output,
    find_blocks,
    owner,
    primary,
    run_head,
    trace,
    units,
    with_primary,
)
from .errors import ConfigError, DataError, NetshrinkError
from .layers import PalettizedLayer, StoredModule, stored_modules
from .softcodes import SoftCodes, beta_at, relaxable
from .train import Finetune, StepHook, fit
from .train.batches import model_device, training_mode
from .train.config import is_int, is_number, require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconstruct:
    """How to reconstruct: `steps` Adam steps per block at learning rate `lr` (cosine decay
    to 0) on mini-batches of `batch_size` samples; activations held within `memory_mb`
    (fewer samples otherwise); `blocks` names the blocks (None: found automatically);
    `final_steps` steps of end-to-end distillation at `final_lr` afterwards; `dense=True`
    also trains the dense weights of uncompressed layers. `codes="soft"` also re-chooses
    the codes of scalar palette layers (AdaRound's relaxed rounding between two codebook
    entries, softcodes.py: from the current codes with `soft_start="codes"`, from the
    original weights with "weights"), with the regulariser at `round_weight` and the
    relaxation trained at `codes_lr`; "fixed" keeps the codes.
    Checked when built."""

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    memory_mb: float = 2048.0
    blocks: tuple[str, ...] | None = None
    final_steps: int = 0
    final_lr: float = 1e-4
    dense: bool = False
    codes: str = "fixed"
    soft_start: str = "codes"
    round_weight: float = 1.0
    codes_lr: float = 3e-2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        require(is_int(self.steps) and self.steps >= 0,
                f"Reconstruct.steps must be an integer >= 0, got {self.steps!r}")
        require(is_int(self.final_steps) and self.final_steps >= 0,
                f"Reconstruct.final_steps must be an integer >= 0, got {self.final_steps!r}")
        require(is_int(self.batch_size) and self.batch_size >= 1,
                f"Reconstruct.batch_size must be an integer >= 1, got {self.batch_size!r}")
        require(is_int(self.seed) and self.seed >= 0,
                f"Reconstruct.seed must be an integer >= 0, got {self.seed!r}")
        require(self.codes in ("fixed", "soft"),
                f"Reconstruct.codes must be 'fixed' or 'soft', got {self.codes!r}")
        require(self.soft_start in ("codes", "weights"),
                f"Reconstruct.soft_start must be 'codes' or 'weights', got {self.soft_start!r}")
        for name in ("lr", "final_lr", "memory_mb", "round_weight", "codes_lr"):
            value = getattr(self, name)
            require(is_number(value) and value > 0 and math.isfinite(value),
                    f"Reconstruct.{name} must be a finite number > 0, got {value!r}")
        require(self.blocks is None or (
            isinstance(self.blocks, (tuple, list)) and len(self.blocks) > 0
            and all(isinstance(b, str) and b for b in self.blocks)),
            f"Reconstruct.blocks must be None or a non-empty tuple of module names, "
            f"got {self.blocks!r}")
        require(isinstance(self.dense, bool) and isinstance(self.progress, bool),
                "Reconstruct.dense and Reconstruct.progress must be True or False")


# --------------------------------------------------------------------------- checks


def _as_inputs(inputs: Any) -> Tensor:
    """The calibration inputs as one tensor (N, ...); DataError when they cannot be."""
    if isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(t, Tensor) for t in inputs):
        try:
            inputs = torch.cat(list(inputs))
        except RuntimeError as e:
            raise DataError("calibration batches differ in shape or dtype: "
                            f"{str(e).splitlines()[0]}") from None
    if not isinstance(inputs, Tensor) or inputs.dim() == 0:
        raise DataError("calibration inputs must be a tensor (N, ...) or a list of batch "
                        f"tensors, got {type(inputs).__name__}")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise DataError("calibration inputs contain NaN or infinite values")
    return inputs.detach()


def _check_runs(model: nn.Module, x: Tensor, what: str) -> None:
    """DataError (one line, with the model's complaint) unless `model(x)` runs and gives
    finite outputs."""
    try:
        with torch.no_grad():
            out = primary(model(x.to(model_device(model))))
    except NetshrinkError:
        raise
    except Exception as e:  # the model's own complaint, whatever its type
        line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"calibration inputs of shape {tuple(x.shape)} and dtype "
                        f"{str(x.dtype).removeprefix('torch.')} do not run through the "
                        f"{what}: {type(e).__name__}: {line}") from None
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise DataError(f"the {what} gives non-finite outputs on the calibration inputs")


def _check_blocks(student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> list[str]:
    for name in names:
        for model, what in ((student, "student"), (teacher, "teacher")):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"block {name!r} is not a module of the {what}") from None
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ConfigError(f"blocks {a!r} and {b!r} are nested")
    return list(names)


# --------------------------------------------------------------------------- parameters


def trainable(model: nn.Module, names: Sequence[str], dense: bool
              ) -> tuple[list[nn.Parameter], list[StoredModule]]:
    """The parameters reconstruction may train in the units `names` (see `blocks.units`),
    and the stored modules among them (rounded to their storage dtypes afterwards)."""
    params: dict[int, nn.Parameter] = {}
    stored: list[StoredModule] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, StoredModule):
            stored.append(module)
            for t, _ in module.stored().values():
                if isinstance(t, nn.Parameter) and t.is_floating_point():
                    params[id(t)] = t
        else:
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and (dense or p.dim() <= 1):
                    params[id(p)] = p
    return list(params.values()), stored


def relaxed(student: nn.Module, teacher: nn.Module, names: Sequence[str]
            ) -> list[tuple[PalettizedLayer, Tensor]]:
    """The scalar palette layers among the units `names` whose codes soft codes may
    re-choose, each with the teacher's weight at the same name (layers the teacher has no
    weight for are left out)."""
    out = []
    for name in names:
        module = student.get_submodule(name)
        if not relaxable(module):
            continue
        try:
            weight = getattr(teacher.get_submodule(name), "weight", None)
        except AttributeError:
            weight = None
        if isinstance(weight, Tensor) and weight.numel() == module.codes.numel():
            out.append((module, weight.detach()))
    return out


@dataclass
class _Stage:
    """One thing to reconstruct: a block, the stem or the head."""

    name: str
    params: list[nn.Parameter]
    stored: list[StoredModule]
    run: Callable[[Tensor], Tensor]  # sample indices -> student output (grad enabled)
    relax: list[tuple[PalettizedLayer, Tensor]] = field(default_factory=list)
    """Scalar palette layers whose codes may be relaxed, with their original weights."""


class _Data:
    """N calibration samples cut into aligned batches of `batch_size`."""

    def __init__(self, n: int, batch_size: int, aligned: bool, seed: int) -> None:
        self.n, self.batch_size, self.aligned = n, batch_size, aligned
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self) -> list[Tensor]:
        b = self.batch_size
        return [torch.arange(i, i + b) for i in range(0, self.n, b)]

    def sample(self) -> Tensor:
        b = self.batch_size
        if self.aligned:
            k = int(torch.randint(self.n // b, (1,), generator=self.gen))
            return torch.arange(k * b, (k + 1) * b)
        return torch.randperm(self.n, generator=self.gen)[:b]


def _measure(stage: _Stage, targets: Tensor, data: _Data, out: Tensor | None = None
             ) -> float:
    """Relative MSE sum|s - t|^2 / sum|t|^2 of the stage's outputs over all samples (and
    the outputs written to `out`)."""
    err, ref = 0.0, 0.0
    with torch.no_grad():
        for idx in data.batches():
            y = stage.run(idx).float().cpu()
            t = targets[idx].float()
            err += float(((y - t) ** 2).sum())
            ref += float((t**2).sum())
            if out is not None:
                out[idx] = y.to(out.dtype)
    return err / max(ref, 1e-30)


def _reconstruct_stage(stage: _Stage, targets: Tensor, data: _Data, cfg: Reconstruct,
                       out: Tensor | None = None) -> dict[str, Any]:
    """Train `stage.params` (and, with soft codes, the codes of its scalar palettes) on the
    relative MSE to `targets`; keep the result only if the error on the calibration
    samples went down. Writes the final outputs to `out`."""
    start = time.perf_counter()
    before = _measure(stage, targets, data, out)
    record: dict[str, Any] = {"block": stage.name, "params": sum(p.numel() for p in stage.params),
                              "error_before": before, "steps": 0}
    if not stage.params or before <= 1e-12 or cfg.steps == 0:
        record.update(error_after=before, kept=False, seconds=time.perf_counter() - start,
                      note="nothing to train" if not stage.params else "no error")
        _log(record)
        return record
    saved = [p.detach().clone() for p in stage.params]
    soft = [SoftCodes(layer, original, cfg.soft_start) for layer, original in stage.relax] \
        if cfg.codes == "soft" else []
    free = sum(int(sc.free.sum()) for sc in soft)
    ref = max(float(targets.float().pow(2).mean()), 1e-30)
    for p in stage.params:
        p.requires_grad_(True)
    groups = [{"params": stage.params, "lr": cfg.lr}]
    if soft:
        groups.append({"params": [sc.v for sc in soft], "lr": cfg.codes_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / cfg.steps)))
    try:
        bar = tqdm(range(cfg.steps), desc=f"reconstruct {stage.name}", leave=False,
                   disable=not cfg.progress, dynamic_ncols=True)
        for step in bar:
            idx = data.sample()
            y = stage.run(idx)
            loss = F.mse_loss(y.float(), targets[idx].to(y.device).float()) / ref
            beta = beta_at(step, cfg.steps) if soft else None
            if beta is not None and free:
                loss = loss + cfg.round_weight * sum(
                    sc.regulariser(beta) for sc in soft) / free
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not bar.disable:
                bar.set_postfix(loss=f"{float(loss.detach()):.3g}", refresh=False)
    finally:
        for p in stage.params:
            p.requires_grad_(False)
            p.grad = None
        changed = sum(sc.harden() for sc in soft)
    for m in stage.stored:
        m.finalize()
    finite = all(bool(torch.isfinite(p).all()) for p in stage.params)
    after = _measure(stage, targets, data, out) if finite else math.inf
    kept = finite and after <= before
    if not kept:
        with torch.no_grad():
            for p, s in zip(stage.params, saved):
                p.copy_(s)
        for sc in soft:
            sc.discard()
        if soft:  # the codes as they were, and the other parameters trained alone
            fixed = _reconstruct_stage(stage, targets, data, replace(cfg, codes="fixed"), out)
            fixed["note"] = (f"soft codes gave {after:.4g}, not below {before:.4g}: codes "
                             "kept" + (f"; {fixed['note']}" if "note" in fixed else ""))
            fixed["seconds"] = time.perf_counter() - start
            return fixed
        after = _measure(stage, targets, data, out)
    record.update(error_after=after, kept=kept, steps=cfg.steps,
                  seconds=time.perf_counter() - start)
    if soft:  # kept: refit the other parameters to the hardened codes (a quarter as long)
        record["codes_changed"], record["codes_relaxed"] = changed, free
        refit = _reconstruct_stage(stage, targets, data,
                                   replace(cfg, codes="fixed", steps=max(1, cfg.steps // 4)),
                                   out)
        record.update(error_after=min(after, refit["error_after"]),
                      steps=cfg.steps + refit["steps"], seconds=time.perf_counter() - start,
                      note=f"soft codes: {changed} of {free} changed ({after:.4g}), then "
                           f"{refit['steps']} steps with the codes fixed")
        _log(record)
        return record
    if not kept:
        record["note"] = "restored: " + ("non-finite parameters" if not finite
                                         else "calibration error did not improve")
    _log(record)
    return record


# --------------------------------------------------------------------------- the stages


def _to(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device) if t.device != device else t.clone()


def _same(a: Any, b: Any) -> bool:
    """Whether two captured block arguments are equal (tensors by value)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==
        return a is b


def _capture_inputs(model: nn.Module, block: str, x: Tensor, data: _Data,
                    shape: tuple[int, ...], dtype: torch.dtype
                    ) -> tuple[Tensor, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """The block's primary inputs for every sample (CPU) and its other arguments per batch."""
    device = model_device(model)
    buf = torch.empty((data.n, *shape), dtype=dtype)
    extras = []
    with torch.no_grad():
        for idx in data.batches():
            h, args, kwargs = block_input(model, block, x[idx].to(device))
            buf[idx] = h.detach().cpu()
            extras.append((args, kwargs))
    return buf, extras


def _capture_outputs(model: nn.Module, block: str, x: Tensor, data: _Data,
                     shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    device = model_device(model)
    buf = torch.empty((data.n, *shape), dtype=dtype)
    with torch.no_grad():
        for idx in data.batches():
            buf[idx] = block_output(model, block, x[idx].to(device)).detach().cpu()
    return buf


def _block_run(model: nn.Module, block: str, inputs: Tensor,
               extras: list[tuple[tuple[Any, ...], dict[str, Any]]], batch_size: int
               ) -> Callable[[Tensor], Tensor]:
    module, device = model.get_submodule(block), model_device(model)

    def run(idx: Tensor) -> Tensor:
        args, kwargs = extras[0] if len(extras) == 1 else extras[int(idx[0]) // batch_size]
        return primary(module(_to(inputs[idx], device), *args, **kwargs))
    return run


def _out_shape(tr: Trace, block: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Per-sample shape and dtype of the block's primary output (from the trace)."""
    p = primary(tr.templates[block])
    return tuple(p.shape[1:]), p.dtype


OUTPUT_SAMPLES = 128
"""Calibration samples (at least one batch) on which the whole model's output error is
measured before and after: two full forward passes each, so not all of them."""


def _output_error(student: nn.Module, teacher: nn.Module, x: Tensor, data: _Data
                  ) -> tuple[float, float]:
    """(relative MSE, top-1 agreement) of the student's outputs against the teacher's, on
    the first OUTPUT_SAMPLES calibration samples."""
    err, ref, same, total = 0.0, 0.0, 0, 0
    sd, td = model_device(student), model_device(teacher)
    batches = data.batches()[:max(1, OUTPUT_SAMPLES // data.batch_size)]
    with torch.no_grad():
        for idx in batches:
            s = primary(student(x[idx].to(sd))).float().cpu()
            t = primary(teacher(x[idx].to(td))).float().cpu()
            err += float(((s - t) ** 2).sum())
            ref += float((t**2).sum())
            same += int((s.argmax(-1) == t.argmax(-1)).sum())
            total += s.argmax(-1).numel()
    return err / max(ref, 1e-30), same / max(total, 1)


class _EvalMode(StepHook):
    """Keep every module in eval mode during `fit` (BatchNorm statistics must not move)."""

    def before_step(self, model: nn.Module, step: int) -> None:
        model.eval()


class _Outputs(nn.Module):
    """A model whose output is its primary tensor (HF outputs -> logits), for `fit`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return primary(self.model(x))


# --------------------------------------------------------------------------- entry point


def reconstruct(student: nn.Module, teacher: nn.Module, inputs: Tensor | list[Tensor],
                config: Reconstruct | None = None) -> dict[str, Any]:
    """Reconstruct the compressed `student` block by block towards `teacher` (the original
    model) on unlabelled `inputs`, in place; returns a report dict (samples, steps, seconds,
    per-block relative output error before/after, output error before/after, notes)."""
    cfg = Reconstruct() if config is None else config
    require(isinstance(cfg, Reconstruct),
            f"config must be a Reconstruct, got {type(cfg).__name__}")
    start = time.perf_counter()
    x = _as_inputs(inputs)
    b = cfg.batch_size
    if x.shape[0] < b:
        raise DataError(f"{x.shape[0]} calibration samples, fewer than batch_size={b}")
    names = _check_blocks(student, teacher, cfg.blocks or find_blocks(student))
    saved_flags = [(p, p.requires_grad) for p in student.parameters()]
    caches = [(m.config, m.config.use_cache) for m in (student, teacher)
              if hasattr(getattr(m, "config", None), "use_cache")]
    try:
        for c, _ in caches:
            c.use_cache = False
        with training_mode(student, False), training_mode(teacher, False):
            _check_runs(teacher, x[:b], "model")
            _check_runs(student, x[:b], "compressed model")
            for p, _ in saved_flags:
                p.requires_grad_(False)
            report = _run(student, teacher, x, names, cfg)
    finally:
        for c, flag in caches:
            c.use_cache = flag
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    report["seconds"] = time.perf_counter() - start
    return report


def _sample_count(x: Tensor, tr: Trace, cfg: Reconstruct, notes: list[str]) -> int:
    """Samples to use: a multiple of batch_size whose activations fit `memory_mb`."""
    b = cfg.batch_size
    per = max(2 * (tr.in_bytes[k] + tr.out_bytes[k]) for k in tr.order)
    per += x.element_size() * (x[0].numel() if x.dim() > 1 else 1)
    fit_n = int(cfg.memory_mb * 2**20 // per)
    n = max(b, min(x.shape[0], fit_n) // b * b)
    if n < x.shape[0] // b * b:
        notes.append(f"memory_mb={cfg.memory_mb:g}: {n} of {x.shape[0]} samples used "
                     f"(activations {per / 2**20:.2f} MB per sample)")
    elif n < x.shape[0]:
        notes.append(f"{n} of {x.shape[0]} samples used (a multiple of batch_size={b})")
    return n


def _run(student: nn.Module, teacher: nn.Module, x: Tensor, names: list[str],
         cfg: Reconstruct) -> dict[str, Any]:
    b, notes = cfg.batch_size, []
    tr, ttr = trace(student, names, x[:b]), trace(teacher, names, x[:b])
    order = tr.order
    given = int(x.shape[0])
    n = _sample_count(x, tr, cfg, notes)
    x = x[:n]
    data = _Data(n, b, aligned=False, seed=cfg.seed)
    shared = [name for name, m in stored_modules(student) if m.attached]
    if shared:
        notes.append(f"shared stored modules {', '.join(shared)} are not reconstructed: "
                     "only per-block parameters (scalars, biases, norms) are")
    if tr.between:
        notes.append(f"units between blocks are not reconstructed: {', '.join(tr.between)}")
    err0, agree0 = _output_error(student, teacher, x, data)
    all_units = units(student)
    records: list[dict[str, Any]] = []
    all_params: list[nn.Parameter] = []
    first = order[0]
    sd = model_device(student)

    # teacher inputs of the first block: the stem's targets
    t_in0, _ = _capture_inputs(teacher, first, x, data, *_input_shape(teacher, first, x))
    stem_params, stem_stored = trainable(student, tr.stem, cfg.dense)
    if stem_params:
        stage = _Stage("stem", stem_params, stem_stored,
                       lambda idx: block_input(student, first, x[idx].to(sd))[0],
                       relaxed(student, teacher, tr.stem))
        records.append(_reconstruct_stage(stage, t_in0, data, cfg))
        all_params += stem_params
    s_in, s_extras = _capture_inputs(student, first, x, data, tuple(t_in0.shape[1:]),
                                     t_in0.dtype)
    constant = all(_same(e, s_extras[0]) for e in s_extras)
    chained = tr.chained and constant
    if not chained:
        data = _Data(n, b, aligned=True, seed=cfg.seed)
        notes.append("block inputs captured by re-running the model for each block "
                     f"({'blocks are not chained' if not tr.chained else 'per-batch arguments'})")
    t_in: Tensor | None = t_in0
    s_out = s_in
    for i, name in enumerate(order):
        shape, dtype = _out_shape(tr, name)
        if chained:
            assert t_in is not None
            t_run = _block_run(teacher, name, t_in, [ttr.extras[name]], b)
            targets = torch.empty((n, *shape), dtype=dtype)
            with torch.no_grad():
                for idx in data.batches():
                    targets[idx] = t_run(idx).cpu()
            extras = [tr.extras[name]]
            t_in = None
        else:
            if i > 0:
                s_in, s_extras = _capture_inputs(student, name, x, data,
                                                 *_input_shape(student, name, x))
            targets = _capture_outputs(teacher, name, x, data, shape, dtype)
            extras = s_extras
        block_units = [u for u in all_units if owner(u, names) == name]
        params, stored = trainable(student, block_units, cfg.dense)
        s_out = torch.empty((n, *shape), dtype=dtype)
        stage = _Stage(name, params, stored, _block_run(student, name, s_in, extras, b),
                       relaxed(student, teacher, block_units))
        records.append(_reconstruct_stage(stage, targets, data, cfg, s_out))
        all_params += params
        if chained:
            s_in, t_in = s_out, targets
        else:
            t_in = targets
        del targets

    head_params, head_stored = trainable(student, tr.head, cfg.dense)
    if head_params and t_in is not None:
        rec = _head(student, teacher, tr, ttr, x, s_out, t_in, data, cfg, head_params,
                    head_stored, notes)
        if rec is not None:
            records.append(rec)
            all_params += head_params
    del s_in, s_out, t_in
    final: dict[str, Any] = {}
    if cfg.final_steps and all_params:
        final = _distill(student, teacher, x, data, cfg, all_params)
    err1, agree1 = _output_error(student, teacher, x, data)
    logger.info("reconstruct: output error %.4g -> %.4g, top-1 agreement %.3f -> %.3f",
                err0, err1, agree0, agree1)
    return {"samples": n, "samples_given": given,
            "batch_size": b, "steps": cfg.steps, "chained": chained, "blocks": records,
            "output_error_before": err0, "output_error_after": err1,
            "output_error_samples": min(n, max(b, OUTPUT_SAMPLES // b * b)),
            "agreement_before": agree0, "agreement_after": agree1, "final": final,
            "notes": notes}


def _input_shape(model: nn.Module, block: str, x: Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    with torch.no_grad():
        h = block_input(model, block, x[:1].to(model_device(model)))[0]
    return tuple(h.shape[1:]), h.dtype


def _log(r: dict[str, Any]) -> None:
    """The one logging line per block."""
    logger.info("reconstruct %s: output error %.4g -> %.4g (%d parameters, %d steps, "
                "%.1f s)%s", r["block"], r["error_before"], r["error_after"], r["params"],
                r["steps"], r["seconds"], f"; {r['note']}" if r.get("note") else "")


def _head(student: nn.Module, teacher: nn.Module, tr: Trace, ttr: Trace, x: Tensor,
          s_last: Tensor, t_last: Tensor, data: _Data, cfg: Reconstruct,
          params: list[nn.Parameter], stored: list[StoredModule], notes: list[str]
          ) -> dict[str, Any] | None:
    """Reconstruct the head from the last block's outputs, when running the model with
    every block short-circuited to a given output reproduces the model (checked)."""
    order, b = tr.order, cfg.batch_size
    last = order[-1]
    sd, td = model_device(student), model_device(teacher)
    with torch.no_grad():
        check = run_head(student, order, tr.templates[last], x[:b].to(sd)).float()
        real = primary(tr.output).float()
    if not torch.allclose(check, real, rtol=1e-4, atol=1e-5 * float(real.abs().max())):
        notes.append("the head is not reconstructed: the model's output does not follow "
                     "from the last block's output alone")
        return None
    out = primary(tr.output)
    targets = torch.empty((data.n, *out.shape[1:]), dtype=out.dtype)
    with torch.no_grad():
        for idx in data.batches():
            value = with_primary(ttr.templates[last], t_last[idx].to(td))
            targets[idx] = run_head(teacher, order, value, x[idx].to(td)).cpu()

    def run(idx: Tensor) -> Tensor:
        value = with_primary(tr.templates[last], _to(s_last[idx], sd))
        return run_head(student, order, value, x[idx].to(sd))
    return _reconstruct_stage(_Stage("head", params, stored, run,
                                     relaxed(student, teacher, tr.head)), targets, data, cfg)


def _distill(student: nn.Module, teacher: nn.Module, x: Tensor, data: _Data,
             cfg: Reconstruct, params: list[nn.Parameter]) -> dict[str, Any]:
    """`final_steps` steps of KL distillation on the outputs in `netshrink.fit`, all
    modules in eval mode; undone when the output error on the calibration samples grows."""
    start = time.perf_counter()
    before, _ = _output_error(student, teacher, x, data)
    saved = [p.detach().clone() for p in params]
    loader = DataLoader(TensorDataset(x), batch_size=cfg.batch_size)
    epochs = math.ceil(cfg.final_steps / len(loader))
    per_epoch = math.ceil(cfg.final_steps / epochs)
    for p in params:
        p.requires_grad_(True)
    try:
        fit(_Outputs(student), loader,
            Finetune(epochs=epochs, lr=cfg.final_lr, min_lr=0.0, temperature=1.0,
                     max_steps_per_epoch=per_epoch, seed=cfg.seed, progress=cfg.progress),
            teacher=_Outputs(teacher), hooks=[_EvalMode()], parameters=params)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    for _, m in stored_modules(student):
        m.finalize()
    after, _ = _output_error(student, teacher, x, data)
    kept = after <= before and all(bool(torch.isfinite(p).all()) for p in params)
    if not kept:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    logger.info("reconstruct final distillation: output error %.4g -> %.4g (%d steps, "
                "%.1f s)%s", before, after, epochs * per_epoch, time.perf_counter() - start,
                "" if kept else "; restored")
    return {"steps": epochs * per_epoch, "error_before": before,
            "error_after": after if kept else before, "kept": kept,
            "seconds": time.perf_counter() - start}
