"""`compress()`: plan -> prepare -> apply -> fine-tune -> finalize, the library's one verb.

The input model is never modified: compression works on a deep copy. The returned module
runs and trains like any nn.Module; it carries a `netshrink_info` dict (method, target,
config, skipped layers with reasons, per-layer SQNR, fp32 baseline bits, and the method's
`Notes`: "notes" lines and "facts", present only when the method gave some) that `report`
and `save` read.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibrate import RECORD_KEY as CALIBRATION_KEY
from .calibrate import prepare as calibrate_stage
from .errors import (
    ConfigError,
    FormatError,
    IncompleteCompressionError,
    InfeasibleTargetError,
    NonFiniteError,
)
from .fileformat import check_savable, header_bytes
from .graph import Selection, select_layers, weight_count
from .layers import StoredModule, compressed_layers, meta_copy, set_module, stored_modules
from .methods import Method, Notes, Plan, Request, get_method
from .size import (
    Budget,
    Target,
    dense_bits,
    format_bytes,
    fp32_bits,
    model_bits,
    parse_target,
)
from .train import Finetune, fit

logger = logging.getLogger(__name__)

INFO_ATTR = "netshrink_info"


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|w|^2 / |w - w^|^2) in dB."""
    ref = reference.detach().double()
    noise = float(((ref - approx.detach().double()) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def compress(
    model: nn.Module,
    method: str = "kmeans",
    target: str = "4bit",
    data: Any = None,
    finetune: Finetune | None = None,
    *,
    layers: Selection = None,
    exclude: Selection = None,
    min_weights: int = 1024,
    overrides: Mapping[Any, Any] | None = None,
    config: Any = None,
    seed: int = 0,
    eval_data: Any = None,
    strict: bool = False,
    calibrate: Any = "auto",
    **options: Any,
) -> nn.Module:
    """Compress `model` with `method` to `target`; return a new, compressed module.

    target: '1.5MB' / '800KB' (the whole file on disk, header included), 'x20' (fp32 size
    / file size) or '3bit' (bits per compressible weight). data: a DataLoader of (inputs,
    labels) or unlabelled inputs, needed for fine-tuning. finetune: a `Finetune` config
    (None: post-training only); the loss is task loss plus distillation from the original.
    layers / exclude: name patterns, module types or predicates; overrides: {pattern or
    type: options dict, or None to keep dense}; the option `out_axis` names the output
    axis of an unknown layer kind. Extra keyword options go to the method's config.

    If less than half of the weights can be compressed, or a layer holding more than 1%
    of them is unsupported, a warning names the reason; `strict=True` raises
    `IncompleteCompressionError` instead. A NaN or infinite value in any tensor of the
    model raises `NonFiniteError` (naming the tensors) before any work.

    calibrate: "auto" (default: when data is given, the method supports it, no
    fine-tuning is asked and the plan averages at most 4.5 code bits per weight), True /
    a `netshrink.Calibrate` (always; without data, from inputs synthesised from BatchNorm
    statistics), False / None (never): re-encode the palette layers after apply to
    minimise their output error on a few of data's inputs, same stored bits
    (calibrate.py). Bad calibration data raises DataError before any work.

    Steps (methods/__init__.py): survey and plan (repeated with the measured header until
    the file fits), prepare, apply once, fine-tune, finalize.
    """
    algo = get_method(method)
    cfg = algo.make_config(config, **options)
    tgt = parse_target(target)
    if finetune is not None and not isinstance(finetune, Finetune):
        raise ConfigError("finetune must be a netshrink.Finetune or None")
    if finetune is not None and finetune.epochs > 0 and data is None:
        raise ConfigError("fine-tuning needs data: pass data=<DataLoader>")
    if min_weights < 0:
        raise ConfigError("min_weights must be >= 0")

    _check_finite_input(model)
    # -- calibration, part 1: options and inputs, checked before any work (calibrate.py)
    finetuning = finetune is not None and finetune.epochs > 0
    calibration = calibrate_stage(model, data, calibrate, algo.calibrates, finetuning, seed)
    reserve: int | None = None
    for attempt in range(2):
        student = copy.deepcopy(model)
        chosen, skipped = select_layers(student, algo.supports, layers=layers,
                                        exclude=exclude, min_weights=min_weights,
                                        overrides=overrides)
        if attempt == 0:
            share = _check_coverage(student, chosen, skipped, strict)
        request = Request(student, chosen, cfg, data, seed)
        survey = algo.survey(request)  # it may refer to this copy's modules
        context = _Context(algo, tgt, cfg, seed, fp32_bits(model), skipped, share)
        plan, budget = _plan(context, request, survey, reserve)
        notes = Notes().add(plan.notes).add(algo.prepare(student, plan, request))
        originals = {ref.name: ref.module.weight.detach().clone() for ref in chosen
                     if ref.name in plan.layers}
        logger.info("%s: compressing %d layers (%d weights) to %s; %d layers kept dense",
                    algo.name, len(plan.layers), budget.n_weights, tgt, len(skipped))
        notes.add(algo.apply(student, plan, request))
        _check_applied(student, plan, algo.name)
        setattr(student, INFO_ATTR, context.info(notes, _layer_stats(student, originals)))
        header = header_bytes(student) + _header_slack(len(plan.layers))
        file_bits = budget.file_bits()
        if file_bits is None or model_bits(student) + 8 * header <= file_bits or attempt:
            break
        # the notes apply returned outgrew their placeholders: plan and apply again
        logger.info("the header needs %d bytes after apply, %d were reserved: compressing "
                    "again", header, budget.header_bits // 8)
        reserve = header

    # -- calibration, part 2: input-aware encoding after apply (calibrate.py) -----------
    record = calibration.run(student, originals, finetuning) if calibration else None

    if finetune is not None and finetune.epochs > 0:
        was_training = model.training
        try:
            fit(student, data, finetune, teacher=model, eval_loader=eval_data)
        finally:
            model.train(was_training)
    algo.finalize(student, cfg)
    student.eval()
    if calibration is not None and record is not None:  # calibration, part 2b (optional)
        calibration.reconstruct(student, model, record)
    _check_finite(student)

    setattr(student, INFO_ATTR, context.info(notes, _layer_stats(student, originals)))
    if record is not None:  # calibration, part 3: the record (not saved in files)
        getattr(student, INFO_ATTR)[CALIBRATION_KEY] = record
    total = model_bits(student) + 8 * header_bytes(student)
    logger.info("compressed to %s (x%.2f of fp32 %s), header included",
                format_bytes(total / 8), context.baseline_bits / total,
                format_bytes(context.baseline_bits / 8))
    file_bits = budget.file_bits()
    if file_bits is not None and total > file_bits:
        logger.warning("result %s exceeds the target %s by %d bytes (the method's notes "
                       "grew past the header reserve)", format_bytes(total / 8), tgt,
                       math.ceil((total - file_bits) / 8))
    return student


@dataclass(frozen=True)
class _Context:
    """What `compress` knows besides the plan, and the `netshrink_info` it writes."""

    algo: Method
    target: Target
    config: Any
    seed: int
    baseline_bits: int
    skipped: dict[str, str]
    share: tuple[int, int]

    def info(self, notes: Notes, stats: dict[str, Any]) -> dict[str, Any]:
        """The model's `netshrink_info`. The method's notes and facts are added only when
        it gave some, so methods without notes save the same manifest as before."""
        info = {
            "method": self.algo.name,
            "target": notes.target or self.target.text,
            "config": _jsonable(dataclasses.asdict(self.config)),
            "seed": self.seed,
            "baseline_bits": self.baseline_bits,
            "weights_compressed": self.share[0],
            "weights_total": self.share[1],
            "skipped": self.skipped,
            "layers": stats,
        }
        if notes.lines:
            info["notes"] = list(notes.lines)
        if notes.facts:
            info["facts"] = _jsonable(notes.facts)
        return info


_MAX_PLANS = 4
_RESERVE_WASTE = 0.02  # plan again when the header reserve overshoots by 2% of the file


def _plan(context: _Context, request: Request, survey: Any, reserve: int | None,
          check_feasible: bool = True) -> tuple[Plan, Budget]:
    """Plan until the file fits: the header reserved in the budget starts from an estimate
    and is replaced by the header of what the plan will store (measured exactly on the
    meta device, with room for the numbers only known after apply) until the planned file
    fits the target without wasting more than 2% of it on an oversized reserve. Bits
    targets do not count the header: one plan."""
    student, chosen = request.model, request.layers
    weights_bits = dense_bits((r.name, r.module.weight) for r in chosen)
    fixed_bits = model_bits(student) - weights_bits
    n_weights = sum(r.n_weights for r in chosen)
    if reserve is None:
        reserve = _first_header_estimate(student, len(chosen))
    for attempt in range(_MAX_PLANS):
        budget = Budget(context.target, context.baseline_bits, fixed_bits, n_weights,
                        header_bits=8 * reserve)
        try:
            plan = context.algo.plan(request, survey, budget)
        except InfeasibleTargetError as error:
            if not check_feasible:
                raise
            return _after_infeasible(context, request, survey, error)
        file_bits = budget.file_bits()
        if file_bits is None:
            return plan, budget
        stored, header = _planned_size(context, student, plan)
        fits = stored + 8 * header <= file_bits
        wasteful = 8 * (reserve - header) > _RESERVE_WASTE * file_bits
        if (fits and not wasteful) or attempt == _MAX_PLANS - 1:
            return plan, budget
        logger.info("the header needs %d bytes, %d were reserved: planning again",
                    header, reserve)
        reserve = header
    raise AssertionError("unreachable")


def _planned_size(context: _Context, student: nn.Module, plan: Plan) -> tuple[int, int]:
    """(stored bits, header bytes with slack) of the file the plan makes, measured on its
    skeleton with placeholder notes and statistics."""
    skeleton = _skeleton(student, plan)
    placeholder = Notes().add(plan.notes).add(plan.expected)
    setattr(skeleton, INFO_ATTR, context.info(placeholder, _placeholder_stats(plan)))
    return model_bits(skeleton), header_bytes(skeleton) + _header_slack(len(plan.layers))


def _after_infeasible(context: _Context, request: Request, survey: Any,
                      error: InfeasibleTargetError) -> tuple[Plan, Budget]:
    """The method found the target infeasible with the header it had reserved, an estimate;
    `error.feasible` was computed with it too. Plan at `error.feasible` (with the measured
    header) until a plan fits, then plan the user's target again with that plan's header:
    it may fit after all (the estimate was too large), and the plan is returned; otherwise
    that error is raised, its numbers those of the smallest file and `feasible` a target
    checked by planning. `feasible` is None when no plan fits."""
    checked = error
    for _ in range(3):
        if checked.feasible is None:
            break
        try:
            plan, budget = _plan(dataclasses.replace(context, target=parse_target(
                checked.feasible)), request, survey, None, check_feasible=False)
        except InfeasibleTargetError as again:
            checked = again
            continue
        stored, header = _planned_size(context, request.model, plan)
        file_bits = budget.file_bits()
        if file_bits is not None and stored + 8 * header > file_bits:
            break
        try:
            return _plan(context, request, survey, header, check_feasible=False)
        except InfeasibleTargetError as final:
            final.feasible = checked.feasible
            raise final from None
    error.feasible = None
    raise error from None


def _skeleton(student: nn.Module, plan: Plan) -> nn.Module:
    """The model as the plan will store it, on the meta device: every planned layer built
    empty from its spec (as the loader builds them), shared modules attached. Its
    `model_bits` and `header_bytes` are those of the file the plan makes."""
    skeleton = meta_copy(student)
    with torch.device("meta"):
        for name, spec in plan.layers.items():
            set_module(skeleton, name,
                       StoredModule.from_spec(spec, skeleton.get_submodule(name)))
        for name, spec in plan.attached.items():
            set_module(skeleton, name, StoredModule.from_spec(spec))
    return skeleton


def _placeholder_stats(plan: Plan) -> dict[str, dict[str, float]]:
    """Per-layer statistics of the same form as the real ones (`_layer_stats`), with
    varied digits so that the manifest compresses as it will."""
    return {name: {"sqnr_db": round(10.0 + (7.318 * i) % 23.0 + 0.0137 * i, 4)}
            for i, name in enumerate(plan.layers)}


def _check_applied(student: nn.Module, plan: Plan, method: str) -> None:
    """What `apply` built is what the plan specified (a method bug otherwise: the size
    counted at planning would not be the size written)."""
    built = dict(stored_modules(student))
    for name, spec in {**plan.layers, **plan.attached}.items():
        layer = built.get(name)
        got = _jsonable(layer.spec()) if layer is not None else None
        if got != _jsonable(spec):
            raise RuntimeError(f"{method}.apply built {name!r} as {got}, the plan said {spec}")


def _first_header_estimate(student: nn.Module, n_layers: int) -> int:
    """Header bytes reserved for the first plan: the uncompressed model's header plus an
    allowance per compressed layer (its spec and statistics, zlib-compressed)."""
    return header_bytes(student) + 64 * n_layers + 256


def _header_slack(n_layers: int) -> int:
    """Room for the manifest to change after planning: the numbers in the statistics and
    the notes that are only known after apply and fine-tuning are other numbers of the same
    form as the placeholders measured."""
    return 32 + 2 * n_layers


def _layer_stats(student: nn.Module, originals: dict[str, torch.Tensor]
                 ) -> dict[str, dict[str, float]]:
    comp = dict(compressed_layers(student))
    return {name: {"sqnr_db": round(sqnr_db(weight, comp[name].decode_weight()), 4)}
            for name, weight in originals.items() if name in comp}


def _skipped_size(model: nn.Module, name: str) -> int:
    """Weights held by a skipped entry: a module's weight, or a named parameter."""
    try:
        return model.get_submodule(name).weight.numel()
    except AttributeError:
        return model.get_parameter(name).numel()


def _check_coverage(student: nn.Module, chosen: list[Any], skipped: dict[str, str],
                    strict: bool) -> tuple[int, int]:
    """(compressed weights, all weights); warn (or raise with strict) when less than half
    can be compressed or an unsupported layer holds more than 1% of the weights."""
    if not chosen:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no weight layers"
        raise ConfigError(f"no layer can be compressed ({reasons})")
    total = weight_count(student)
    done = sum(r.n_weights for r in chosen)
    problems = []
    if done < 0.5 * total:
        problems.append(f"only {done / total:.1%} of the weights ({done} of {total}) can be "
                        "compressed")
    for name, reason in skipped.items():
        size = _skipped_size(student, name)
        if reason.startswith("unsupported") and size > 0.01 * total:
            problems.append(f"{name} ({size} weights, {size / total:.1%}) is skipped: {reason}")
    if problems:
        message = "; ".join(problems)
        if strict:
            raise IncompleteCompressionError(message)
        logger.warning("%s", message)
    return done, total


def _check_finite_input(model: nn.Module) -> None:
    """Every floating tensor of the input model (weights, biases, norms, buffers) is
    finite, or a `NonFiniteError` naming the tensors that are not, before any work."""
    bad = [name for name, t in model.state_dict(keep_vars=True).items()
           if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        listed = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteError(f"the model holds NaN or inf values in {listed}; compress a "
                             "model whose tensors are all finite")


def _check_finite(student: nn.Module) -> None:
    """Every decoded weight and stored tensor is finite, or a clear error."""
    for name, layer in compressed_layers(student):
        if not bool(torch.isfinite(layer.decode_weight().detach()).all()):
            stored = ", ".join(f"{t} {enc.name}" for t, (_, enc) in layer.stored().items())
            raise NonFiniteError(f"layer {name!r}: the decoded weight is not finite; its "
                                 f"stored tensors ({stored}) cannot hold these values "
                                 "(a wider codebook_dtype may)")
    try:
        check_savable(student)
    except FormatError as e:
        raise NonFiniteError(str(e)) from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
