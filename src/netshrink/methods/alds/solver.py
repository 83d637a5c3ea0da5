"""ALDS's allocation: groups k and rank j per layer under one global size budget.

docs/methods/alds.md#solver (Liebenwein et al. 2021, §3.3, Algorithm 1): minimise the
largest relative layer error subject to the budget, alternating

- global step (k fixed per layer): one common error level eps, found by bisection, such
  that with every layer at the smallest rank meeting eps (at least 1; dense when no
  factorisation smaller than the weight meets it) the total size fits. The errors are a
  finite set of values, so the bisection runs over their sorted list and is exact (the
  official code runs Brent's method on a continuous relaxation);
- local step: each layer keeps its current size and takes the group count k' whose
  largest affordable rank j' (not j' - 1, the official code's off-by-one) has the lowest
  error,

for `iters` rounds from several starts (k nearest 3, 5, 7, 9, then seeded random
divisors, as the official code; netshrink adds k = 1 everywhere and the cheapest split per
layer, so the result is never worse than the best k = 1 allocation), keeping the lowest
eps. What the chosen ranks leave of the budget is then
spent greedily, one rank step at a time on the worst layer that still fits, so that the
final size is within one rank step of the budget.

Baselines (docs/methods/alds.md#baselines: Table 1's SVD and SVD-Energy), all at k = 1: `svd` gives
every
layer the same relative rank j / jmax; `svd-energy` the smallest rank whose residual
energy share is at most one common threshold; `alds-k1` ALDS's minimax ranks at k = 1.
Sizes are in any additive unit (bits, or parameters for the paper's keep ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .profile import LayerProfile

SOLVERS = ("alds", "alds-k1", "svd", "svd-energy")
START_KS = (3, 5, 7, 9)


class InfeasibleBudget(ValueError):
    """Even the smallest choices exceed the budget; `min_size` says what they take."""

    def __init__(self, min_size: float) -> None:
        super().__init__(f"the smallest factorisation takes {min_size}")
        self.min_size = min_size


@dataclass
class Choice:
    """One layer's decision: k groups at rank j (j = 0: kept dense)."""

    k: int
    j: int


@dataclass
class Solution:
    choices: list[Choice]
    size: float
    max_error: float


def layer_error(prof: LayerProfile, c: Choice, mode: str) -> float:
    if c.j == 0:
        return 0.0
    return float(prof.tables[c.k].err(mode)[c.j - 1])


def total_size(profiles: Sequence[LayerProfile], choices: Sequence[Choice]) -> float:
    return sum(p.size(c.k, c.j) for p, c in zip(profiles, choices))


def min_size(profiles: Sequence[LayerProfile]) -> float:
    """The smallest total: each layer at its cheapest rank-1 split (or dense)."""
    return sum(min([p.dense_size] + [p.size(k, 1) for k in p.ks]) for p in profiles)


def _solution(profiles: Sequence[LayerProfile], choices: list[Choice], mode: str) -> Solution:
    return Solution(choices, total_size(profiles, choices),
                    max((layer_error(p, c, mode) for p, c in zip(profiles, choices)),
                        default=0.0))


def _bisect_levels(levels: np.ndarray, fits: Callable[[float], bool], smallest: bool
                   ) -> float | None:
    """The smallest (or largest) level in ascending `levels` for which `fits` holds, when
    `fits` is monotone (true above / below some level); None if none fits."""
    lo, hi = 0, len(levels) - 1
    if smallest:
        if not fits(float(levels[hi])):
            return None
        while lo < hi:  # invariant: fits(levels[hi])
            mid = (lo + hi) // 2
            if fits(float(levels[mid])):
                hi = mid
            else:
                lo = mid + 1
        return float(levels[hi])
    if not fits(float(levels[lo])):
        return None
    while lo < hi:  # invariant: fits(levels[lo])
        mid = (lo + hi + 1) // 2
        if fits(float(levels[mid])):
            lo = mid
        else:
            hi = mid - 1
    return float(levels[lo])


# ---------------------------------------------------------------------------------------
# ALDS


def _rank_at(prof: LayerProfile, k: int | None, eps: float, mode: str) -> int:
    """Smallest rank with error <= eps (errors fall with j), 0 (dense) when none."""
    if k is None:
        return 0
    table = prof.tables[k]
    err = table.err(mode)
    above = int(np.searchsorted(-err, -eps, side="left"))  # count of err > eps
    j = above + 1
    return j if j <= table.jcap else 0


def global_step(profiles: Sequence[LayerProfile], ks: Sequence[int | None], budget: float,
                mode: str) -> Solution | None:
    """Common error level for fixed group counts (None: even rank 1 does not fit)."""
    levels = [np.zeros(1)] + [p.tables[k].err(mode) for p, k in zip(profiles, ks)
                              if k is not None]
    grid = np.unique(np.concatenate(levels))

    def choices_at(eps: float) -> list[Choice]:
        return [Choice(k or 1, _rank_at(p, k, eps, mode)) for p, k in zip(profiles, ks)]

    eps = _bisect_levels(grid, lambda e: total_size(profiles, choices_at(e)) <= budget,
                         smallest=True)
    return None if eps is None else _solution(profiles, choices_at(eps), mode)


def local_step(profiles: Sequence[LayerProfile], choices: Sequence[Choice], mode: str
               ) -> list[int | None]:
    """Per layer, at its current size, the group count with the lowest error."""
    ks: list[int | None] = []
    for p, c in zip(profiles, choices):
        if not p.tables:
            ks.append(None)
            continue
        if c.j == 0:  # dense: error already 0
            ks.append(c.k if c.k in p.tables else p.ks[0])
            continue
        size = p.size(c.k, c.j)
        best_k, best_err = c.k, layer_error(p, c, mode)
        for k in p.ks:
            table = p.tables[k]
            j = min(table.jcap, math.floor(size / (table.step * p.unit_size) + 1e-9))
            if j >= 1:
                err = float(table.err(mode)[j - 1])
                if err < best_err:
                    best_k, best_err = k, err
        ks.append(best_k)
    return ks


def fill(profiles: Sequence[LayerProfile], choices: list[Choice], budget: float, mode: str
         ) -> list[Choice]:
    """Spend what is left of the budget: one rank step at a time on the layer with the
    largest error whose next step fits, until no layer's next step fits."""
    choices = [Choice(c.k, c.j) for c in choices]
    used = total_size(profiles, choices)
    while True:
        best, best_err, best_next = -1, -1.0, Choice(0, 0)
        for i, (p, c) in enumerate(zip(profiles, choices)):
            if c.j == 0:
                continue
            nxt = Choice(c.k, c.j + 1 if c.j < p.tables[c.k].jcap else 0)
            extra = p.size(nxt.k, nxt.j) - p.size(c.k, c.j)
            err = layer_error(p, c, mode)
            if used + extra <= budget and err > best_err:
                best, best_err, best_next = i, err, nxt
        if best < 0:
            return choices
        used += profiles[best].size(best_next.k, best_next.j) - profiles[best].size(
            choices[best].k, choices[best].j)
        choices[best] = best_next


def _nearest(ks: list[int], target: int) -> int:
    return min(ks, key=lambda k: (abs(k - target), k))


def solve_alds(profiles: Sequence[LayerProfile], budget: float, mode: str = "paper", *,
               seed: int = 0, iters: int = 4, random_starts: int = 11,
               only_k1: bool = False) -> Solution:
    """ALDS's alternating minimisation (see the module docstring); deterministic for a
    seed. Raises InfeasibleBudget when no choice fits."""
    smallest = min_size(profiles)
    if smallest > budget:
        raise InfeasibleBudget(smallest)
    rng = np.random.default_rng(seed)
    starts: list[list[int | None]] = []
    if only_k1:
        starts.append([1 if 1 in p.tables else None for p in profiles])
    else:
        for t in START_KS:
            starts.append([_nearest(p.ks, t) if p.tables else None for p in profiles])
        for _ in range(random_starts):
            starts.append([int(rng.choice(p.ks)) if p.tables else None for p in profiles])
        # k = 1 everywhere: the result is never worse than the k = 1 minimax (alds-k1)
        starts.append([1 if 1 in p.tables else None for p in profiles])
        # the cheapest split per layer always admits a solution when any does
        starts.append([min(p.ks, key=lambda k, p=p: p.tables[k].step) if p.tables else None
                       for p in profiles])
    best: Solution | None = None
    for ks in starts:
        for it in range(1 if only_k1 else iters + 1):
            sol = global_step(profiles, ks, budget, mode)
            if sol is None:
                break
            if best is None or (sol.max_error, sol.size) < (best.max_error, best.size):
                best = sol
            if it < iters and not only_k1:
                ks = local_step(profiles, sol.choices, mode)
    if best is None:
        raise InfeasibleBudget(smallest)
    return _solution(profiles, fill(profiles, best.choices, budget, mode), mode)


# ---------------------------------------------------------------------------------------
# k = 1 baselines


def _k1(prof: LayerProfile) -> bool:
    return 1 in prof.tables


def solve_uniform_svd(profiles: Sequence[LayerProfile], budget: float, mode: str = "paper"
                      ) -> Solution:
    """Every layer at k = 1 and rank ceil(r · jmax) for the largest common r that fits."""
    def choices_at(r: float) -> list[Choice]:
        out = []
        for p in profiles:
            if not _k1(p):
                out.append(Choice(1, 0))
                continue
            t = p.tables[1]
            j = max(1, math.ceil(r * t.jmax - 1e-9))
            out.append(Choice(1, j if j <= t.jcap else 0))
        return out

    levels = np.unique(np.concatenate(
        [np.zeros(1)] + [np.arange(1, p.tables[1].jcap + 2) / p.tables[1].jmax
                         for p in profiles if _k1(p)]))
    r = _bisect_levels(levels, lambda v: total_size(profiles, choices_at(v)) <= budget,
                       smallest=False)
    if r is None:
        raise InfeasibleBudget(total_size(profiles, choices_at(0.0)))
    return _solution(profiles, choices_at(r), mode)


def solve_svd_energy(profiles: Sequence[LayerProfile], budget: float, mode: str = "paper"
                     ) -> Solution:
    """Every layer at k = 1 and the smallest rank whose residual energy share
    sum_{i>j} sigma_i^2 / sum sigma_i^2 is at most one common threshold t; the smallest t
    that fits."""
    def choices_at(t: float) -> list[Choice]:
        out = []
        for p in profiles:
            if not _k1(p):
                out.append(Choice(1, 0))
                continue
            energy = p.tables[1].energy
            above = int(np.searchsorted(-energy, -t, side="left"))
            j = above + 1
            out.append(Choice(1, j if j <= p.tables[1].jcap else 0))
        return out

    levels = np.unique(np.concatenate(
        [np.ones(1)] + [p.tables[1].energy for p in profiles if _k1(p)]))
    t = _bisect_levels(levels, lambda v: total_size(profiles, choices_at(v)) <= budget,
                       smallest=True)
    if t is None:
        raise InfeasibleBudget(total_size(profiles, choices_at(1.0)))
    return _solution(profiles, choices_at(t), mode)


def solve(solver: str, profiles: Sequence[LayerProfile], budget: float, mode: str, *,
          seed: int = 0, iters: int = 4, random_starts: int = 11) -> Solution:
    """Dispatch on the solver name (one of SOLVERS)."""
    if solver == "alds":
        return solve_alds(profiles, budget, mode, seed=seed, iters=iters,
                          random_starts=random_starts)
    if solver == "alds-k1":
        return solve_alds(profiles, budget, mode, seed=seed, only_k1=True)
    if solver == "svd":
        return solve_uniform_svd(profiles, budget, mode)
    if solver == "svd-energy":
        return solve_svd_energy(profiles, budget, mode)
    raise ValueError(f"unknown solver {solver!r}")
