"""Per-layer error and size tables for ALDS's solver (docs/methods/alds.md#error).

For a layer folded to W (f x c·kh·kw) with k input-channel groups W_1..W_k and every group
at rank j, the relative operator-norm error ||W - W^||_2 / ||W||_2 is bounded by

    code (torchprune):  max_i sigma_{j+1}(W_i) / sigma_1(W)            (a lower bound)
    paper (Theorem 1):  sqrt(k) · max_i sigma_{j+1}(W_i) / sigma_1(W)  (an upper bound)

because W - W^ = [E_1 ... E_k] with ||E_i||_2 = sigma_{j+1}(W_i) (Eckart-Young-Mirsky), and
max_i ||E_i|| <= ||[E_1 ... E_k]|| <= sqrt(sum_i ||E_i||^2) <= sqrt(k) max_i ||E_i||.
Both are equal to the true error at k = 1. `LayerProfile` holds, for every allowed k,
these errors for j = 1..jcap, where jcap is the largest rank whose factorisation is still
smaller than the dense weight (beyond it the layer stays dense, error 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

ERROR_MODES = ("paper", "code")


def divisors(n: int) -> list[int]:
    """All divisors of n, ascending (ALDS's candidate group counts,
    docs/methods/alds.md#decomposition)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class GroupTable:
    """One group count k of one layer: per-rank errors and sizes.

    err_code[j - 1] is max_i sigma_{j+1}(W_i) / sigma_1(W) for j = 1..jcap (0 beyond the
    group rank); energy[j - 1] (k = 1 only) is the residual energy share
    sum_{i>j} sigma_i^2 / sum_i sigma_i^2 (SVD-Energy baseline).
    """

    k: int
    jmax: int
    jcap: int
    step: int  # weights per unit of rank: k·f + c·kh·kw
    err_code: np.ndarray
    energy: np.ndarray | None = None

    def err(self, mode: str) -> np.ndarray:
        return self.err_code * (math.sqrt(self.k) if mode == "paper" else 1.0)


@dataclass
class LayerProfile:
    """Everything the solver needs about one layer, sizes in the solver's unit.

    unit_size: size of one factor weight (bits, or 1 when counting parameters);
    dense_size: size of the layer kept dense.
    """

    name: str
    shape: tuple[int, ...]
    unit_size: float
    dense_size: float
    tables: dict[int, GroupTable] = field(default_factory=dict)

    @property
    def ks(self) -> list[int]:
        return sorted(self.tables)

    def size(self, k: int, j: int) -> float:
        """Size at group count k and rank j; j = 0 means the layer stays dense."""
        return self.dense_size if j == 0 else j * self.tables[k].step * self.unit_size


def measured_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """The true relative operator-norm error ||W - W^||_2 / ||W||_2 of the folded weights."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    a = approx.detach().double().reshape(weight.shape[0], -1)
    top = float(torch.linalg.matrix_norm(w, ord=2))
    return float(torch.linalg.matrix_norm(w - a, ord=2)) / max(top, 1e-300)


def profile_layer(name: str, weight: torch.Tensor, unit_size: float, dense_size: float,
                  max_groups: int | None = None, only_k1: bool = False) -> LayerProfile:
    """Singular values of every group split of one weight (float64, on the CPU)."""
    w = weight.detach().double().cpu()
    f, c = w.shape[0], w.shape[1]
    kernel = math.prod(w.shape[2:])
    folded = w.reshape(f, -1)
    top = float(torch.linalg.matrix_norm(folded, ord=2))
    top = top if top > 0 else 1.0
    prof = LayerProfile(name, tuple(w.shape), unit_size, dense_size)
    ks = [1] if only_k1 else [k for k in divisors(c) if max_groups is None or k <= max_groups]
    for k in ks:
        per = c // k * kernel
        jmax = min(f, per)
        step = k * f + c * kernel
        # largest j with j·step·unit < dense (strictly smaller), at most jmax
        jcap = min(jmax, math.ceil(dense_size / (step * unit_size)) - 1)
        if jcap < 1:
            continue
        blocks = folded.reshape(f, k, per).transpose(0, 1).contiguous()
        sv = torch.linalg.svdvals(blocks)  # (k, jmax)
        nxt = torch.zeros(k, jcap, dtype=torch.float64)
        upto = min(jcap, sv.shape[1] - 1)
        nxt[:, :upto] = sv[:, 1:upto + 1]  # sigma_{j+1} for j = 1..jcap
        err = (nxt.amax(0) / top).numpy()
        energy = None
        if k == 1:
            sq = sv[0] ** 2
            tail = sq.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{m >= i} sigma_m^2
            total = float(tail[0]) if float(tail[0]) > 0 else 1.0
            energy = np.zeros(jcap)
            energy[:upto] = (tail[1:upto + 1] / total).numpy()
        prof.tables[k] = GroupTable(k, jmax, jcap, step, np.maximum.accumulate(
            err[::-1])[::-1].copy(), energy)
    return prof
