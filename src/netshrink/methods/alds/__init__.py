"""`alds`: optimal layer-wise grouped low-rank decomposition (Liebenwein et al., NeurIPS
2021, "Compressing Neural Networks: Towards Determining the Optimal Layer-wise
Decomposition"); docs/methods/alds.md.

Every Conv2d (groups = 1) and Linear layer is folded to f x (c·kh·kw), its input channels
split into k groups, each group truncated to rank j by SVD, and run as a grouped conv plus
a 1x1 conv (`LowRankLayer`), so parameters and FLOPs really drop. k and j are chosen per
layer by `solver.solve_alds` so that the largest per-layer relative operator-norm error
(`profile.py`: the paper's Theorem 1 bound, or the official code's variant) is minimal
under one global budget. A layer whose factorisation would not be smaller stays dense.

Budget: either the paper's convention, `keep_ratio` = kept / original count of *all*
parameters (BN affine and biases counted, never compressed), or any netshrink target
('1.5MB', 'x4', '16bit') through `size.Budget`. Fine-tuning uses the shared loop
(`compress(..., finetune=netshrink.Finetune(...))`; the paper retrains with plain
cross-entropy, `distill_weight=0`).

Report: the share of all parameters kept (with `keep_ratio`, requested and achieved; the
report's target then reads "keep_ratio r", not compress's default) and the FLOPs kept,
measured on one input from `data` when compress was given data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ...encoding import Encoding, dtype_name
from ...errors import ConfigError, InfeasibleTargetError
from ...graph import LayerRef
from ...layers import compressible, set_module
from ...size import Budget
from ...train import split_batch as _split_batch
from .. import Method, Notes, Plan, Request, register_method
from .layer import LowRankLayer, factorize
from .profile import ERROR_MODES, LayerProfile, profile_layer
from .solver import SOLVERS, InfeasibleBudget, layer_error, solve

logger = logging.getLogger(__name__)

__all__ = ["AldsConfig", "AldsMethod", "LowRankLayer", "factorize"]


@dataclass(frozen=True)
class AldsConfig:
    """Options of the `alds` method.

    keep_ratio: the paper's budget, the share of all parameters kept (0 < r < 1); when
    set, it replaces the size target (a size or ratio target together with it is an
    error; compress's default bits target is ignored). solver: "alds" (the paper), or the
    k = 1 baselines "svd" (one uniform relative rank), "svd-energy" (one residual-energy
    threshold), "alds-k1" (ALDS's ranks at k = 1). error: "paper" (Theorem 1, with
    sqrt(k): an upper bound on the true error, the safe choice) or "code" (torchprune,
    without: a lower bound); both are exact at k = 1. iters / random_starts: rounds of the
    alternating minimisation and seeded random starts besides k ~ 3, 5, 7, 9 (official
    code: 4 and 11). max_groups: largest k tried (None: every divisor of c).
    factor_dtype: storage dtype of the factors (None: the layer's weight dtype).
    """

    keep_ratio: float | None = None
    solver: str = "alds"
    error: str = "paper"
    iters: int = 4
    random_starts: int = 11
    max_groups: int | None = None
    factor_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.keep_ratio is not None and not (
                isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio < 1):
            raise ConfigError(f"keep_ratio must lie in (0, 1), got {self.keep_ratio!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, "
                              f"got {self.solver!r}")
        if self.error not in ERROR_MODES:
            raise ConfigError(f"error must be one of {', '.join(ERROR_MODES)}, "
                              f"got {self.error!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError("iters must be an integer >= 0")
        if not isinstance(self.random_starts, int) or self.random_starts < 0:
            raise ConfigError("random_starts must be an integer >= 0")
        if self.max_groups is not None and (not isinstance(self.max_groups, int)
                                            or self.max_groups < 1):
            raise ConfigError("max_groups must be None or an integer >= 1")
        if self.factor_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"factor_dtype must be None, float32, float16 or bfloat16, "
                              f"got {self.factor_dtype!r}")


def parameter_count(model: nn.Module) -> int:
    """All parameters of a model, shared ones once (the paper's size measure)."""
    return sum(p.numel() for p in model.parameters())


class AldsMethod(Method):
    name = "alds"
    config_cls = AldsConfig
    summary = "grouped low-rank factorisation, ranks/groups from error bounds (ALDS)"

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"grouped/depthwise conv (groups={module.groups})"
            if module.weight.shape[1] == 0:
                return "no input channels"
        elif isinstance(module, nn.Linear):
            if type(module).forward is not nn.Linear.forward:
                return "a Linear subclass with its own forward"
        else:
            return "only Conv2d (groups=1) and Linear layers are factorised"
        return compressible(module)

    def _factor_dtype(self, ref: LayerRef, config: AldsConfig) -> str:
        return ref.option(config, "factor_dtype") or dtype_name(ref.module.weight.dtype)

    def survey(self, request: Request) -> list[LayerProfile]:
        """Singular values of every group split of every layer (the expensive part, once);
        sizes in parameters for `keep_ratio`, else in bits of the stored factors."""
        config, profiles = request.config, []
        only_k1 = config.solver != "alds"
        for ref in tqdm(request.layers, desc="alds: spectra", unit="layer", disable=None,
                        leave=False):
            weight = ref.module.weight
            if config.keep_ratio is not None:
                unit, dense = 1.0, float(ref.n_weights)
            else:
                unit = float(Encoding.of(self._factor_dtype(ref, config)).bits)
                dense = float(Encoding.of(weight.dtype).nbits(ref.n_weights))
            profiles.append(profile_layer(ref.name, weight, unit, dense,
                                          ref.option(config, "max_groups"), only_k1))
        return profiles

    def plan(self, request: Request, survey: list[LayerProfile], budget: Budget) -> Plan:
        """(k, j) per layer from the solver; a layer at j = 0 stays dense."""
        config, layers, model = request.config, request.layers, request.model
        total = parameter_count(model)
        if config.keep_ratio is not None:
            if budget.target.kind != "bits":
                raise ConfigError("give either keep_ratio or a size/ratio target, not both")
            available = config.keep_ratio * total - (total - sum(r.n_weights for r in layers))
        else:
            available = budget.available()
        try:
            sol = solve(config.solver, survey, available, config.error, seed=request.seed,
                        iters=config.iters, random_starts=config.random_starts)
        except InfeasibleBudget as e:
            if config.keep_ratio is not None:
                lowest = (total - sum(r.n_weights for r in layers) + e.min_size) / total
                raise InfeasibleTargetError(
                    f"keep_ratio {config.keep_ratio} cannot be met: with every factorised "
                    f"layer at rank 1 the model keeps {lowest:.4f} of its {total} "
                    f"parameters (solver {config.solver}); feasible keep ratios lie in "
                    f"[{lowest:.4f}, 1)") from None
            raise budget.infeasible(e.min_size, f"with every layer at rank 1 "
                                    f"(solver {config.solver})") from None
        specs = {ref.name: LowRankLayer.plan_spec(ref.module, c.k, c.j,
                                                   self._factor_dtype(ref, config))
                 for ref, c in zip(layers, sol.choices) if c.j > 0}
        kept = total - sum(ref.n_weights - c.j * prof.tables[c.k].step
                           for ref, prof, c in zip(layers, survey, sol.choices) if c.j > 0)
        flops = None if request.data is None else (123456789, 987654321, [123, 45, 67])
        expected = _kept_notes(total, kept, config.keep_ratio, flops)
        dense = [ref.name for ref, c in zip(layers, sol.choices) if c.j == 0]
        notes = Notes([f"alds kept dense: {', '.join(dense)} (no factorisation is both "
                       "smaller and as accurate as the plan needs)"]) if dense else Notes()
        return Plan(specs, notes=notes, expected=expected, detail=(survey, sol, total))

    def apply(self, model: nn.Module, plan: Plan, request: Request) -> Notes:
        """Factorise the layers as the solver planned; returns the parameters (and, given
        data, FLOPs) kept for the report."""
        config = request.config
        profiles, sol, total = plan.detail
        logger.info("alds (%s, %s error): largest layer error %.4g, size %.0f",
                    config.solver, config.error, sol.max_error, sol.size)
        for ref, prof, choice in zip(request.layers, profiles, sol.choices):
            if choice.j == 0:
                continue
            encoder, decoder = factorize(ref.module.weight, choice.k, choice.j)
            device = ref.module.weight.device
            layer = LowRankLayer(ref.module, encoder.to(device), decoder.to(device),
                                 choice.k, self._factor_dtype(ref, config))
            layer.error_bounds = {m: layer_error(prof, choice, m) for m in ERROR_MODES}
            set_module(model, ref.name, layer)
        return kept_notes(model, total, config.keep_ratio, request.data)


def kept_notes(model: nn.Module, total: int, keep_ratio: float | None, data: Any) -> Notes:
    """The share of all `total` parameters the factorised `model` keeps (with the requested
    `keep_ratio`, which then names the report's target) and the FLOPs it keeps on the first
    input of `data` (not measured without data)."""
    example = _first_input(data)
    if example is None:
        return _kept_notes(total, parameter_count(model), keep_ratio, None)
    try:
        macs, dense = _macs(model, example)
    except Exception as e:  # the report must not stop compression
        return _kept_notes(total, parameter_count(model), keep_ratio,
                           f"{type(e).__name__}: {e}")
    return _kept_notes(total, parameter_count(model), keep_ratio,
                       (macs, dense, list(example.shape[1:])))


def _kept_notes(total: int, kept: int, keep_ratio: float | None,
                flops: tuple[int, int, list[int]] | str | None) -> Notes:
    """The line and facts of `kept_notes`; `flops` is (MACs kept, MACs dense, input
    shape), the reason they were not measured, or None without data."""
    facts: dict[str, Any] = {"params_total": total, "params_kept": kept,
                             "params_kept_share": round(kept / total, 6)}
    if keep_ratio is not None:
        facts["keep_ratio"] = keep_ratio
        line = (f"alds keep_ratio {keep_ratio}: kept {kept} of {total} parameters "
                f"({kept / total:.4f})")
    else:
        line = f"alds kept {kept} of {total} parameters ({kept / total:.4f})"
    if flops is None:
        line += "; FLOPs kept not measured (compress was given no data)"
    elif isinstance(flops, str):
        line += f"; FLOPs kept not measured ({flops})"
    else:
        macs, dense, shape = flops
        facts.update(macs_kept=macs, macs_dense=dense)
        line += (f"; FLOPs kept {macs / max(dense, 1):.4f} ({macs} of {dense} "
                 f"multiply-adds per input of shape {shape})")
    target = f"keep_ratio {keep_ratio}" if keep_ratio is not None else None
    return Notes([line], facts, target)


def _first_input(data: Any) -> torch.Tensor | None:
    """One input (batch of 1) from a DataLoader or iterable of batches; the global RNG is
    restored (a shuffling loader draws its seed from it), so fine-tuning is unchanged."""
    if data is None:
        return None
    with torch.random.fork_rng(devices=[]):
        inputs, _ = _split_batch(next(iter(data)))
    return inputs[:1]


def _macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, MACs before factorisation) of one eval-mode forward pass (BN statistics and
    the training mode stay as they were)."""
    from .flops import count_macs

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        x = example.to(device)
        return count_macs(model, x), count_macs(model, x, dense=True)
    finally:
        model.train(was_training)


register_method(AldsMethod())
