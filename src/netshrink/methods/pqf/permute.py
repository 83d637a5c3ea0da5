"""PQF's permutation step (docs/methods/pqf.md#permutation-objective,
docs/methods/pqf.md#permutation-search;
Martinez et al. 2021, Sec. 3.2): reorder the channels of each coupled group so that the
readers' subvectors are easier to quantize.

Objective of a group: the sum over its scored readers of log det of the d x d covariance of
the reader's subvectors (mean removed, N-1 normaliser; a tiny ridge keeps dead channels
finite). A reader is scored when its subvector spans c = d / (kh*kw) >= 2 whole input
channels and the group's channels start and end on subvector boundaries; with d = kh*kw a
permutation only reorders whole subvectors and cannot change the objective.

Search: greedy start (channels ranked by their variance over output channels, or the
log det of their (C_out, kh*kw) covariance for kxk kernels; the ranking is split into c
consecutive buckets and subvector j takes the j-th channel of each bucket), then
stochastic local search: a random pair of positions is swapped and the swap kept only when
the objective strictly drops; finally the identity is kept if it scores better.

Incremental covariance: with the Gram matrix G of the group's input columns (blocks
G[a, b] = W_a^T W_b of (kh*kw)^2 entries, precomputed) and column sums, the scatter matrix
of a reader is a sum over subvector positions of d x d blocks gathered from G, so a swap
that touches two positions updates it in O(d^2) (`ReaderState.swap_delta`). Where G would
exceed `_GRAM_LIMIT` entries, the two positions' blocks are recomputed from the weights
instead (O(C_out d^2)).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .groups import Analysis, Group, Member, analyse

logger = logging.getLogger(__name__)

_GRAM_LIMIT = 1 << 22
_RIDGE = 1e-9


def _reader_matrix(module: nn.Module) -> np.ndarray:
    """The reader's weight as (C_out, C_in, kh*kw) float64 (linear: kh*kw = 1)."""
    w = module.weight.detach().double().cpu()
    return w.reshape(w.shape[0], w.shape[1], -1).numpy()


def _gram(x: np.ndarray) -> np.ndarray:
    """x^T x through torch (numpy's threaded BLAS is pathologically slow on tall-skinny
    products on a loaded machine)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return (t.T @ t).numpy()


def _logdet(scatter: np.ndarray, total: np.ndarray, count: int) -> float:
    """log det of the covariance (scatter - total total^T / count) / (count - 1) plus a
    ridge on its diagonal. Called once per proposed swap: written with the fewest numpy
    calls (the ridge added to the diagonal in place, the same numbers as adding
    ridge * I)."""
    cov = (scatter - total[:, None] * total / count) / max(count - 1, 1)
    diagonal = cov.reshape(-1)[::len(cov) + 1]  # a view
    ridge = _RIDGE * max(float(diagonal.sum()) / len(cov), 1e-30)
    diagonal += ridge
    sign, value = np.linalg.slogdet(cov)
    return float(value) if sign > 0 else -math.inf


class ReaderState:
    """The subvector covariance of one reader under a permutation of a group's channels.

    `perm[j]` is the original channel (relative to the group) now at position j. Positions
    are grouped c at a time into subvectors (`chunk` = position // c).
    """

    def __init__(self, member: Member, size: int, d: int) -> None:
        w = _reader_matrix(member.module)
        self.k2 = w.shape[2]
        self.c = d // self.k2
        self.d = d
        out, cin = w.shape[0], w.shape[1]
        self.count = out * cin * self.k2 // d
        part = w[:, member.offset:member.offset + size, :]  # (O, n, k2)
        self.part = part
        self.colsum = part.sum(0)  # (n, k2)
        lo = member.offset * self.k2 // d
        hi = (member.offset + size) * self.k2 // d
        # subvectors outside the group's channels: a constant part of the scatter
        subs = w.reshape(out, -1, d)
        outside = np.concatenate([subs[:, :lo], subs[:, hi:]], axis=1).reshape(-1, d)
        self.const_scatter = _gram(outside) if len(outside) else np.zeros((d, d))
        self.const_total = outside.sum(0)
        flat = part.reshape(out, size * self.k2)
        self.gram = _gram(flat) if (size * self.k2) ** 2 <= _GRAM_LIMIT else None
        self.offsets = np.arange(self.k2)
        self.scatter = np.zeros((d, d))
        self.total = np.zeros(d)

    def block(self, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scatter (d, d) and sum (d,) of the subvectors made of `channels` (c of them)."""
        if self.gram is not None:
            idx = (channels[:, None] * self.k2 + self.offsets).reshape(-1)
            scatter = self.gram[idx[:, None], idx]  # as np.ix_(idx, idx), without its checks
        else:
            x = self.part[:, channels, :].reshape(self.part.shape[0], self.d)
            scatter = np.einsum("ni,nj->ij", x, x)
        return scatter, self.colsum[channels].reshape(self.d)

    def reset(self, perm: np.ndarray) -> float:
        """Recompute the scatter from scratch for `perm`; return the log det."""
        self.scatter = self.const_scatter.copy()
        self.total = self.const_total.copy()
        self.chunks = [self.block(perm[j * self.c:(j + 1) * self.c])
                       for j in range(len(perm) // self.c)]
        for s, t in self.chunks:
            self.scatter += s
            self.total += t
        return self.value()

    def value(self, scatter: np.ndarray | None = None, total: np.ndarray | None = None
              ) -> float:
        return _logdet(self.scatter if scatter is None else scatter,
                       self.total if total is None else total, self.count)

    def swap_delta(self, perm: np.ndarray, i: int, j: int) -> Update:
        """Scatter, sum and new subvector blocks after swapping positions i and j of
        `perm` (not applied; `accept` applies it): O(d^2) with the Gram matrix."""
        new = perm.copy()
        new[i], new[j] = new[j], new[i]
        scatter, total = self.scatter.copy(), self.total.copy()
        blocks = {}
        for ch in {i // self.c, j // self.c}:
            s_old, t_old = self.chunks[ch]
            blocks[ch] = self.block(new[ch * self.c:(ch + 1) * self.c])
            scatter += blocks[ch][0] - s_old
            total += blocks[ch][1] - t_old
        return Update(scatter, total, blocks)

    def accept(self, update: Update) -> None:
        self.scatter, self.total = update.scatter, update.total
        for ch, block in update.blocks.items():
            self.chunks[ch] = block


@dataclass
class Update:
    """A proposed swap's effect on one reader."""

    scatter: np.ndarray
    total: np.ndarray
    blocks: dict[int, tuple[np.ndarray, np.ndarray]]


def scorable(member: Member, size: int, d: int | None) -> bool:
    """Whether the reader's objective depends on the order of the group's channels."""
    if member.role != "reader" or d is None:
        return False
    w = member.module.weight
    k2 = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
    if d % k2 or d // k2 < 2:
        return False
    c = d // k2
    row = w[0].numel()
    return row % d == 0 and member.offset % c == 0 and size % c == 0


def greedy_start(state: ReaderState, size: int) -> np.ndarray:
    """The greedy start (docs/methods/pqf.md#permutation-search): rank channels, c buckets,
    subvector j = j-th of each."""
    if state.k2 == 1:
        score = state.part[:, :, 0].var(0)
    else:
        score = np.array([_logdet(state.part[:, a].T @ state.part[:, a], state.colsum[a],
                                  state.part.shape[0]) for a in range(size)])
    ranked = np.argsort(-score, kind="stable")
    buckets = ranked.reshape(state.c, size // state.c)
    return buckets.T.reshape(-1).copy()


@dataclass
class GroupResult:
    """What the search did for one group."""

    index: int
    description: str
    readers: int
    identity: float
    greedy: float
    final: float
    accepted: int
    seconds: float
    perm: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))


def search(group: Group, dims: dict[str, int], iters: int = 10_000, seed: int = 0,
           check_every: int = 0, index: int = 0) -> GroupResult | None:
    """Greedy start + stochastic local search for one group (None: no scored reader).

    dims: the subvector length d of each reader, by module name (readers without one, i.e.
    not product-quantized, are not scored). check_every > 0 recomputes the objective from
    scratch that often and raises if the incremental value drifted (used by tests).
    """
    start = time.perf_counter()
    n = group.size
    states = [ReaderState(m, n, dims[m.name]) for m in group.readers()
              if scorable(m, n, dims.get(m.name))]
    if not states:
        return None
    identity = np.arange(n)
    id_value = sum(s.reset(identity) for s in states)
    main = max(states, key=lambda s: s.part.size)
    perm = greedy_start(main, n)
    current = sum(s.reset(perm) for s in states)
    greedy = current
    rng = np.random.default_rng(seed)
    accepted = 0
    for it in range(iters):
        i, j = (int(v) for v in rng.integers(n, size=2))
        if i == j:
            continue
        updates = [s.swap_delta(perm, i, j) for s in states]
        value = sum(s.value(u.scatter, u.total) for s, u in zip(states, updates))
        if value < current:
            perm[i], perm[j] = perm[j], perm[i]
            for s, u in zip(states, updates):
                s.accept(u)
            current = value
            accepted += 1
        if check_every and (it + 1) % check_every == 0:
            fresh = sum(s.reset(perm) for s in states)
            if not math.isclose(fresh, current, rel_tol=1e-6, abs_tol=1e-6):
                raise AssertionError(f"incremental log det {current} != {fresh}")
    if id_value <= current:
        perm, current = identity, id_value
    return GroupResult(index, group.describe(), len(states), id_value, greedy, current, accepted,
                       time.perf_counter() - start, perm)


def apply_permutation(group: Group, perm: np.ndarray) -> None:
    """Reorder the group's channels in every member (in place; the function is unchanged)."""
    idx = torch.as_tensor(perm, dtype=torch.long)
    with torch.no_grad():
        for m in group.members:
            mod = m.module
            sl = slice(m.offset, m.offset + len(perm))
            at = idx.to(_device(mod)) + m.offset
            if m.role in ("writer", "depthwise"):
                axis = 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) else 0
                _permute(mod.weight, axis, sl, at)
                if getattr(mod, "bias", None) is not None:
                    _permute(mod.bias, 0, sl, at)
            elif m.role == "norm":
                for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var):
                    if t is not None:
                        _permute(t, 0, sl, at)
            elif m.role == "reader":
                _permute(mod.weight, 1, sl, at)


def _device(module: nn.Module) -> torch.device:
    return module.weight.device


def _permute(t: torch.Tensor, axis: int, sl: slice, at: torch.Tensor) -> None:
    moved = t.data.movedim(axis, 0)
    moved[sl] = moved.index_select(0, at).clone()


@dataclass
class PermutationReport:
    """Whole-network permutation: groups searched, objective before/after, time."""

    traced: bool
    reason: str
    groups: list[GroupResult]
    blocked: list[str]
    seconds: float
    parts: list[str] = field(default_factory=list)
    """Submodules traced one by one because the whole model could not be (`reason`
    says why); empty when the whole model was traced."""

    @property
    def improvement(self) -> float:
        """Total log det drop (nats) over all groups (>= 0)."""
        return sum(g.identity - g.final for g in self.groups)

    def summary(self) -> str:
        if not self.traced:
            return f"no permutation: the model cannot be traced ({self.reason})"
        line = (f"{len(self.groups)} groups permuted, log det -{self.improvement:.2f} in "
                f"total, {self.seconds:.1f} s; {len(self.blocked)} blocking ops")
        if self.parts:
            line += (f"; the model cannot be traced as a whole ({self.reason}): groups from "
                     f"{len(self.parts)} traced parts")
        return line


def permute_model(model: nn.Module, dims: dict[str, int], iters: int = 10_000,
                  seed: int = 0, analysis: Analysis | None = None) -> PermutationReport:
    """Find the model's groups (or take `analysis`, made by `analyse(model)` on this very
    model), search a permutation for each, apply them in place."""
    start = time.perf_counter()
    if analysis is None:
        analysis = analyse(model)
    results = []
    for gi, group in enumerate(tqdm(analysis.groups, desc="pqf permute", unit="group",
                                    disable=None, leave=False)):
        res = search(group, dims, iters=iters, seed=seed + gi, index=gi)
        if res is None:
            continue
        if not np.array_equal(res.perm, np.arange(group.size)):
            apply_permutation(group, res.perm)
        logger.debug("group %s: log det %.3f -> %.3f (greedy %.3f)", res.description,
                     res.identity, res.final, res.greedy)
        results.append(res)
    report = PermutationReport(analysis.traced, analysis.reason, results, analysis.blocked,
                               time.perf_counter() - start, analysis.parts)
    logger.info("pqf permutation: %s", report.summary())
    return report
