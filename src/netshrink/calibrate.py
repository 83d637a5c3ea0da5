"""Calibration: input-aware encoding of palette layers from a few unlabelled inputs.

`compress(..., calibrate=...)` runs this stage after `apply` and before fine-tuning
(issue 22). For each layer stored as a scalar palette (kmeans; dkm without fine-tuning,
whose layers are snapped first) it measures the layer's input second moment
H = sum x x^T on calibration inputs (capture.py) and re-encodes the layer to minimise its
output error tr((W - W^) H (W - W^)^T) instead of the weight error (gptq.py), keeping the
plan's codebook size, dtype and per-channel scale, so the stored bits do not change:

1. importance-weighted k-means of the (scaled) weights, weight i,j counting s_i^2 H_jj
   (SqueezeLLM / coremltools' sensitive k-means, with H's diagonal for the Fisher's),
   started from the plan's codebook;
2. GPTQ codes for that codebook (error feedback through the Cholesky of H^-1);
3. least-squares refit of the codebook, then of the scales, given the codes;
   steps 2-3 repeat `passes` times. The encoding with the lowest output error, the
   plan's own included, is kept; with `holdout` > 0 that choice is made on held-out
   calibration samples instead. Opt-in guards (`min_vectors`, `max_bits`) leave some
   layers with the plan's encoding; `calibrate="auto"` leaves plans above
   AUTO_MAX_MEAN_BITS code bits per weight alone.

Layers are captured in groups bounded by `memory_mb`, in the order the model runs them,
each group from the model whose earlier groups are already re-encoded (GPTQ's sequential
capture). Without data, a model with BatchNorm2d can calibrate on inputs distilled from
its BatchNorm statistics (synthetic.py, ZeroQ). The record (`netshrink_info
["calibration"]`, also in `report(model).calibration`) gives samples, source, seconds and
each layer's relative output error ||(W - W^)X||^2 / ||WX||^2 before and after; it is not
saved in the file, whose size and layout stay those of the plan. Under torchrun, the
ranks sum their H (all_reduce) and take rank 0's encoding, so every rank holds the same
model ("samples" in the record counts one rank's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .capture import Probe, capture, plan_groups, trial
from .errors import ConfigError, DataError
from .gptq import decode, factor, gptq_codes, output_error, refit_codebook, refit_scale
from .kmeans import kmeans
from .layers import PalettizedLayer, compressed_layers, set_module, weight_rows
from .reconstruct import Reconstruct, reconstruct
from .synthetic import batchnorm_layers, synthesize_inputs
from .train.batches import model_device, split_batch, training_mode
from .train.distributed import is_distributed

logger = logging.getLogger(__name__)

AUTO_MAX_MEAN_BITS = 4.5
"""calibrate="auto" leaves a plan alone whose palette layers average more code bits than
this: near-lossless already (EfficientNet-Lite0 at x4, 5-8-bit codes: re-encoding on 64
photo views took the KL to the original on other photos from 0.005 to 0.067), while at
4 bits and below re-encoding helped on every model measured (BENCHMARKS.md)."""

RECORD_KEY = "calibration"
"""The `netshrink_info` key of the calibration record (not saved in files)."""


@dataclass(frozen=True)
class Calibrate:
    """Options of the calibration stage (checked when built).

    samples: calibration samples (rows of the inputs' first axis: images, token
    sequences); memory_mb: bound on the H matrices held at once (8 n^2 bytes per group of
    a layer with rows of n weights); max_layers: at most this many layers captured at once
    (None: only memory_mb bounds it; 1: layer by layer; smaller groups see more of the
    earlier groups' re-encoding: on EfficientNet-Lite0 at x8 the KL to the original fell
    from 0.324 with memory-bound groups to 0.167 with 8 layers and 0.159 layer by layer,
    at 1x, 2x and 8x the time); damp: GPTQ's dampening, a
    fraction of H's mean diagonal; passes: GPTQ + refit rounds; refit: least-squares
    codebook and scale refit; weighted_init: H-weighted k-means before GPTQ; act_order:
    code columns by decreasing H_jj; input_shape: (C, H, W) of one input, needed only for
    data-free calibration; synthetic_iters: ZeroQ steps per synthetic batch; min_vectors:
    a layer is re-encoded only when its H sums at least this many input vectors per input
    (a classifier after global pooling sees one per sample, so its H is rank-deficient
    with few samples); holdout: the fraction of the samples kept out of the fit to choose,
    per layer, between the new encoding and the plan's; max_bits: layers with wider codes
    keep the plan. These three are off by default: on EfficientNet-Lite0 at x8 each made
    the KL to the original on other photos worse (BENCHMARKS.md); reconstruct: a
    `Reconstruct` to follow with block-wise reconstruction (reconstruct.py) on the same
    inputs, after fine-tuning if any (None: no reconstruction).
    """

    samples: int = 128
    memory_mb: float = 512.0
    max_layers: int | None = 8
    damp: float = 0.01
    passes: int = 2
    refit: bool = True
    weighted_init: bool = True
    act_order: bool = True
    input_shape: tuple[int, ...] | None = None
    synthetic_iters: int = 500
    min_vectors: float = 0.0
    holdout: float = 0.0
    max_bits: int | None = None
    reconstruct: Reconstruct | None = None

    def __post_init__(self) -> None:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)
        if not (whole(self.samples) and self.samples >= 1):
            raise ConfigError(f"Calibrate.samples must be an integer >= 1, got {self.samples!r}")
        if not (isinstance(self.memory_mb, (int, float)) and self.memory_mb > 0):
            raise ConfigError(f"Calibrate.memory_mb must be > 0, got {self.memory_mb!r}")
        if self.max_layers is not None and not (whole(self.max_layers) and self.max_layers >= 1):
            raise ConfigError(f"Calibrate.max_layers must be None or >= 1, got "
                              f"{self.max_layers!r}")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ConfigError(f"Calibrate.damp must be in (0, 1), got {self.damp!r}")
        if not (whole(self.passes) and self.passes >= 1):
            raise ConfigError(f"Calibrate.passes must be an integer >= 1, got {self.passes!r}")
        if self.reconstruct is not None and not isinstance(self.reconstruct, Reconstruct):
            raise ConfigError(f"Calibrate.reconstruct must be None or a netshrink.Reconstruct, "
                              f"got {type(self.reconstruct).__name__}")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ConfigError(f"Calibrate.holdout must be in [0, 1), got {self.holdout!r}")
        if self.max_bits is not None and not (whole(self.max_bits) and self.max_bits >= 1):
            raise ConfigError(f"Calibrate.max_bits must be None or an integer >= 1, got "
                              f"{self.max_bits!r}")
        if not (isinstance(self.min_vectors, (int, float)) and self.min_vectors >= 0):
            raise ConfigError(f"Calibrate.min_vectors must be >= 0, got {self.min_vectors!r}")
        if not (whole(self.synthetic_iters) and self.synthetic_iters >= 0):
            raise ConfigError("Calibrate.synthetic_iters must be an integer >= 0")
        if self.input_shape is not None and not (
                isinstance(self.input_shape, tuple) and len(self.input_shape) == 3
                and all(whole(s) and s >= 1 for s in self.input_shape)):
            raise ConfigError(f"Calibrate.input_shape must be (channels, height, width), "
                              f"got {self.input_shape!r}")


def resolve(calibrate: Any, data: Any, model: nn.Module, calibrates: bool,
            finetuning: bool) -> Calibrate | None:
    """The options of this call's stage, or None for no calibration.

    "auto": calibrate when data is given, the method supports it and no fine-tuning is
    asked, on up to `Calibrate().samples` samples (fewer when the data holds fewer), and
    (checked in `run`) when the plan averages at most AUTO_MAX_MEAN_BITS code bits;
    False / None: never; True or a `Calibrate`: always (without data only on a model with
    BatchNorm2d, from synthetic inputs; ConfigError otherwise)."""
    if calibrate is None or calibrate is False:
        return None
    if isinstance(calibrate, str) and calibrate == "auto":
        return Calibrate() if data is not None and calibrates and not finetuning else None
    if calibrate is True:
        cfg = Calibrate()
    elif isinstance(calibrate, Calibrate):
        cfg = calibrate
    else:
        raise ConfigError(f"calibrate must be 'auto', True, False, None or a "
                          f"netshrink.Calibrate, got {calibrate!r}")
    if data is None:
        if not batchnorm_layers(model):
            raise ConfigError("calibration needs data=<unlabelled inputs>; without data it "
                              "runs only on models with BatchNorm2d (synthetic inputs from "
                              "their statistics), and this model has none")
        if cfg.input_shape is None:
            raise ConfigError("data-free calibration needs the input size: pass "
                              "calibrate=netshrink.Calibrate(input_shape=(C, H, W))")
    return cfg


def calibration_inputs(data: Iterable[Any], count: int, model: nn.Module | None = None,
                       *, fewer: bool = False) -> list[torch.Tensor]:
    """The first `count` samples of `data` (batches of (x, y), (x,) or bare tensors;
    `train.split_batch`) as a list of input batches, the last one cut to size. DataError
    when the data gives fewer samples, a batch is not a tensor of samples or holds NaN /
    inf; with `model`, also when the first batch does not run through it or gives
    non-finite activations at a layer with a weight (`check_inputs`). Nothing else runs
    before these checks. fewer=True accepts fewer samples than `count` (not none)."""
    if isinstance(data, torch.Tensor):
        data = [data]
    out: list[torch.Tensor] = []
    found = 0
    try:
        for batch in data:
            try:
                x, _ = split_batch(batch)
            except ConfigError as e:
                raise DataError(f"calibration data: {e}") from None
            if x.dim() == 0 or x.shape[0] == 0:
                raise DataError(f"calibration batches must hold samples along their first "
                                f"axis, got shape {tuple(x.shape)}")
            x = x[: count - found]
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise DataError("calibration inputs contain NaN or infinite values")
            out.append(x)
            found += x.shape[0]
            if found >= count:
                break
    except TypeError:
        raise DataError(f"calibration data must be an iterable of batches, got "
                        f"{type(data).__name__}") from None
    if found < count and not (fewer and found):
        raise DataError(f"calibration asked for {count} samples, the data gave {found}: "
                        f"pass more data or calibrate=netshrink.Calibrate(samples={found})"
                        if found else "calibration data is empty")
    if model is not None:
        check_inputs(model, out[0])
    return out


def check_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """Run a batch through `model` (eval mode, no gradients): DataError, in one line, when
    it does not fit (shape, dtype) or when the input of a layer with a weight, or the
    output, is not finite."""
    bad: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            def pre(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                for a in args:
                    if isinstance(a, torch.Tensor) and a.is_floating_point() and not bad \
                            and not bool(torch.isfinite(a).all()):
                        bad.append(name)
            handles.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), training_mode(model, False):
            out = model(x.to(model_device(model)))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"calibration inputs of shape {tuple(x.shape)} and dtype "
                        f"{str(x.dtype).removeprefix('torch.')} do not run through the "
                        f"model: {first}") from None
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise DataError(f"non-finite activations at the input of {bad[0]!r} on the "
                        "calibration data")
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and not bool(
            torch.isfinite(logits).all()):
        raise DataError("the model's output on the calibration data is not finite")


@dataclass
class Stage:
    """A calibration stage ready to run: its options and inputs (gathered and checked
    before any compression work), and where they came from."""

    config: Calibrate
    inputs: list[torch.Tensor]
    source: str
    seconds: float
    auto: bool = False

    def run(self, model: nn.Module, originals: dict[str, torch.Tensor],
            finetuning: bool) -> dict[str, Any]:
        """Re-encode the palette layers of `model` (in place); returns the record."""
        return run(model, originals, self, finetuning)

    def reconstruct(self, student: nn.Module, teacher: nn.Module,
                    record: dict[str, Any]) -> None:
        """Block-wise reconstruction of the finalized `student` towards `teacher` on the
        stage's inputs, when the options ask for it; its report goes into `record`."""
        if self.config.reconstruct is not None:
            record["reconstruct"] = reconstruct(student, teacher, torch.cat(self.inputs),
                                                self.config.reconstruct)


def prepare(model: nn.Module, data: Any, calibrate: Any, calibrates: bool,
            finetuning: bool, seed: int = 0) -> Stage | None:
    """The stage `compress` will run, with its inputs checked on `model` (the original):
    None when calibration is off (`resolve`). Synthesises inputs when data is None."""
    cfg = resolve(calibrate, data, model, calibrates, finetuning)
    if cfg is None:
        return None
    auto = isinstance(calibrate, str)
    start = time.perf_counter()
    if data is None:
        shape = tuple(cfg.input_shape or ())
        with training_mode(model, False):
            x = synthesize_inputs(model, cfg.samples, shape, iters=cfg.synthetic_iters,
                                  seed=seed)
        inputs, source = list(x.split(32)), "synthetic"
        check_inputs(model, inputs[0])
    else:  # "auto" calibrates on what the data holds when it holds fewer samples
        inputs, source = calibration_inputs(data, cfg.samples, model, fewer=auto), "data"
    return Stage(cfg, inputs, source, time.perf_counter() - start, auto=auto)


def _scalar_palettes(model: nn.Module, names: Iterable[str], finetuning: bool,
                     max_bits: int | None
                     ) -> tuple[dict[str, PalettizedLayer], dict[str, str]]:
    """The layers the stage re-encodes (scalar palettes of at most `max_bits`-bit codes),
    and why the others are not: layers of a train-time kind with `snapped()` (DKM) are
    snapped first when no fine-tuning follows."""
    layers = dict(compressed_layers(model))
    chosen: dict[str, PalettizedLayer] = {}
    skipped: dict[str, str] = {}
    for name in names:
        layer = layers.get(name)
        if not isinstance(layer, PalettizedLayer):
            skipped[name] = "not applicable: not a palette layer"
            continue
        if layer.codebook.shape[1] != 1:
            skipped[name] = "not applicable: vector palette (d > 1)"
            continue
        if max_bits is not None and layer.bits > max_bits:
            skipped[name] = (f"kept: {layer.bits}-bit codes, above max_bits={max_bits} (the "
                             "plan's palette is near-lossless there)")
            continue
        if type(layer) is not PalettizedLayer:
            if finetuning or not hasattr(layer, "snapped"):
                skipped[name] = "not applicable: the layer trains its own assignments"
                continue
            layer = layer.snapped()
            set_module(model, name, layer)
        chosen[name] = layer
    return chosen, skipped


def _mean_bits(layers: dict[str, PalettizedLayer]) -> float:
    """Code bits per weight of the palette layers together (0 without any)."""
    weights = sum(layer.codes.numel() for layer in layers.values())
    return sum(layer.bits * layer.codes.numel() for layer in layers.values()) / max(1, weights)


def run(model: nn.Module, originals: dict[str, torch.Tensor], stage: Stage,
        finetuning: bool) -> dict[str, Any]:
    """The stage on `model` (compressed in place): capture groups of layers in run order,
    re-encode each; returns the record (module docstring)."""
    cfg = stage.config
    start = time.perf_counter()
    layers, skipped = _scalar_palettes(model, originals, finetuning, cfg.max_bits)
    mean_bits = _mean_bits(layers)
    if stage.auto and mean_bits > AUTO_MAX_MEAN_BITS:
        skipped.update({name: f"kept: calibrate='auto' leaves plans of more than "
                              f"{AUTO_MAX_MEAN_BITS:g} bits per weight alone "
                              f"({mean_bits:.2f} here)" for name in layers})
        layers = {}
    device = model_device(model)
    inputs = [x.to(device) for x in stage.inputs]
    errors: dict[str, dict[str, float]] = {}
    with training_mode(model, False):
        probes = trial(model, layers, inputs[0][:1])
        usable: list[Probe] = []
        for name in layers:
            probe = probes.get(name)
            if probe is None:
                skipped[name] = "not applicable: the model's forward does not reach it"
            elif probe.reason is not None:
                skipped[name] = f"not applicable: {probe.reason}"
            else:
                usable.append(probe)
        fit, held = split_holdout(inputs, cfg.holdout)
        # with a held-out part, two H per layer: half the memory for each
        groups = plan_groups(usable, cfg.memory_mb / (2 if held else 1), cfg.max_layers)
        bar = tqdm(groups, desc="calibrate", unit="group", disable=None, leave=False)
        for i, group in enumerate(bar):
            counts: dict[str, int] = {}
            hs = capture(model, layers, group, fit, desc=f"capture {i + 1}/{len(groups)}",
                         counts=counts)
            hv = capture(model, layers, group, held, desc=f"held out {i + 1}/{len(groups)}") \
                if held else {}
            for probe in group:
                name = probe.name
                h, h_check = hs.pop(name), hv.pop(name, None)
                if is_distributed():  # every rank's samples; one encoding for all ranks
                    dist.all_reduce(h)
                    if h_check is not None:
                        dist.all_reduce(h_check)
                    total = torch.tensor([counts[name]], device=h.device)
                    dist.all_reduce(total)
                    counts[name] = int(total)
                if counts[name] < cfg.min_vectors * probe.columns:
                    skipped[name] = (f"not applicable: {counts[name]} calibration vectors for "
                                     f"{probe.columns} inputs, fewer than "
                                     f"{cfg.min_vectors:g} per input (H would fit the "
                                     "calibration samples, not the layer)")
                    continue
                errors[name] = encode_layer(layers[name], originals[name], h, cfg, h_check)
                if is_distributed():
                    for t in layers[name].stored_extra().values():
                        dist.broadcast(t[0].data, src=0)
                bar.set_postfix(layer=name[-24:])
    before = [e["before"] for e in errors.values()]
    after = [e["after"] for e in errors.values()]
    record = {
        "samples": sum(int(x.shape[0]) for x in stage.inputs),
        "source": stage.source,
        "seconds": round(stage.seconds + time.perf_counter() - start, 2),
        "groups": len(groups),
        "max_layers_at_once": max((len(g) for g in groups), default=0),
        "config": {k: getattr(cfg, k) for k in ("memory_mb", "max_layers", "damp", "passes",
                                                "refit", "weighted_init", "act_order",
                                                "min_vectors", "holdout", "max_bits")},
        "layers": errors,
        "not_applicable": skipped,
        "mean_error_before": sum(before) / len(before) if before else None,
        "mean_error_after": sum(after) / len(after) if after else None,
    }
    logger.info("calibration on %d %s samples: %d layers re-encoded in %.1f s, mean relative "
                "output error %s -> %s; %d not applicable", record["samples"], stage.source,
                len(errors), record["seconds"], record["mean_error_before"],
                record["mean_error_after"], len(skipped))
    return record


def split_holdout(inputs: list[torch.Tensor], fraction: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The calibration batches cut into a fitting part and the last `fraction` of the
    samples held out (none when fraction is 0 or fewer than 2 samples), batch sizes kept."""
    total = sum(int(x.shape[0]) for x in inputs)
    n_held = int(round(total * fraction)) if fraction > 0 else 0
    if total < 2 or n_held == 0:
        return inputs, []
    n_held = min(n_held, total - 1)
    size = max(int(x.shape[0]) for x in inputs)
    both = torch.cat(inputs)
    fit, held = both[: total - n_held], both[total - n_held:]
    return list(fit.split(size)), list(held.split(size))


def _rounded(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """t as it will be stored (rounded to `dtype`), in float32."""
    return t.to(getattr(torch, dtype)).float()


def encode_layer(layer: PalettizedLayer, original: torch.Tensor, h: torch.Tensor,
                 cfg: Calibrate, h_check: torch.Tensor | None = None) -> dict[str, Any]:
    """Re-encode one scalar palette layer for its input moment H (G, n, n) (module
    docstring, steps 1-3); returns its relative output errors before and after. With
    `h_check` (the moment of held-out samples) the new encoding is kept only if its
    error there is lower than the plan's, and the errors reported are the held-out ones."""
    g = h.shape[0]
    rows = weight_rows(original.detach().float(), layer.out_axis).to(h.device)
    r, n = rows.shape
    w = rows.reshape(g, r // g, n)
    dtype = layer.codebook_dtype
    k = layer.codebook.shape[0]
    scale0 = None if layer.scale is None else layer.scale.detach().float().reshape(g, -1)
    values0 = layer.codebook.detach()[:, 0].float()
    codes0 = layer.codes.detach().long().reshape(g, r // g, n)
    energy = max(output_error(w, torch.zeros_like(w), h), 1e-300)

    def err(values: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None) -> float:
        return output_error(w, decode(_rounded(values, dtype), codes,
                                      None if scale is None else _rounded(scale, dtype)), h)

    best = (err(values0, codes0, scale0), values0, codes0, scale0)
    before = best[0]
    values, scale = values0, scale0
    if cfg.weighted_init:
        values = _weighted_values(w, h, values0, scale0, cfg)
    prepared = factor(h, damp=cfg.damp, act_order=cfg.act_order)
    for _ in range(cfg.passes):
        codes = gptq_codes(w, prepared, _rounded(values, dtype), None if scale is None else
                           _rounded(scale, dtype))
        current = err(values, codes, scale)
        if current < best[0]:
            best = (current, values, codes, scale)
        if not cfg.refit:
            break
        used = torch.bincount(codes.flatten(), minlength=k) > 0
        fitted = refit_codebook(w, h, codes, k, None if scale is None else _rounded(scale, dtype))
        values = torch.where(used, fitted, values)
        current = err(values, codes, scale)
        if scale is not None:
            new_scale = refit_scale(w, h, codes, _rounded(values, dtype), _rounded(scale, dtype))
            rescaled = err(values, codes, new_scale)
            if rescaled < current:
                scale, current = new_scale, rescaled
        if current < best[0]:
            best = (current, values, codes, scale)
    chosen = "calibrated"
    if h_check is not None:  # choose on samples the fit did not see
        def check(values: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None
                  ) -> float:
            return output_error(w, decode(_rounded(values, dtype), codes, None if scale is None
                                          else _rounded(scale, dtype)), h_check)
        energy = max(output_error(w, torch.zeros_like(w), h_check), 1e-300)
        before = check(values0, codes0, scale0)
        after = check(*best[1:])
        if after >= before:
            best, after, chosen = (before, values0, codes0, scale0), before, "plan"
        result: dict[str, Any] = {"before": round(before / energy, 6),
                                  "after": round(after / energy, 6), "kept": chosen}
    else:
        result = {"before": round(before / energy, 6), "after": round(best[0] / energy, 6),
                  "kept": "calibrated" if best[2] is not codes0 else "plan"}
    _, values, codes, scale = best
    with torch.no_grad():
        layer.codebook.copy_(values[:, None].to(layer.codebook))
        layer.codes.copy_(codes.reshape(layer.codes.shape).to(layer.codes))
        if scale is not None and layer.scale is not None:
            layer.scale.copy_(scale.reshape(-1).to(layer.scale))
    return result


def _weighted_values(w: torch.Tensor, h: torch.Tensor, values: torch.Tensor,
                     scale: torch.Tensor | None, cfg: Calibrate) -> torch.Tensor:
    """k-means of the scaled weights with importance s_i^2 H_jj (per group's H), started
    from the plan's codebook."""
    diag = h.diagonal(dim1=-2, dim2=-1).float()  # (G, n)
    if scale is None:
        points, weights = w, diag[:, None, :].expand_as(w)
    else:
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        points = w / safe[..., None]
        weights = diag[:, None, :] * (scale * scale)[..., None]
    if not bool((weights > 0).any()):
        return values
    result = kmeans(points.reshape(-1).cpu(), values.numel(), init=values[:, None].cpu(),
                    weights=weights.reshape(-1).cpu(), iters=30)
    return result.centroids[:, 0].to(values)
