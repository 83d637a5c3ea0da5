"""The differentiable k-means layer's forward pass (Cho et al., ICLR 2022, §3.2), twice.

`naive_dkm` is the paper's algorithm written with plain autograd ops: every iteration's
(N/d x k) distance and attention tensors stay alive for backward, memory
O(iterations x N/d x 2^b) (docs/methods/dkm.md#memory). It is the reference the tests compare
against.

`dkm` computes the same function with a custom `torch.autograd.Function` that never holds
an (N/d x k) tensor: forward and backward walk the vectors in chunks, backward recomputes
each chunk's attention from the saved centroids C_0..C_T (k x d each) and the weights.
The rows of A are independent given C, so the gradients are exact (equal to the unrolled
version up to float summation order) and memory is O(N + T k d + chunk x k).

With `unique=True` (d = 1) the points are first reduced to their distinct values with
multiplicities (eDKM, Cho et al. 2023): every iteration runs on U distinct values instead
of N weights (at most 65,536 for 16-bit weights) and the per-weight result is a gather.

One iteration, for points x_i (d-vectors) with multiplicity c_i and centroids C (k x d):

    D_ij = |x_i - C_j|^2,   A_i = softmax(-D_i / tau),
    C'_j = sum_i c_i A_ij x_i / sum_i c_i A_ij          (kept at C_j if the sum is ~0)

repeated until max |C' - C| <= epsilon (paper) or, with stop="inertia", until the inertia
sum_i c_i min_j D_ij changes by <= epsilon relative (coremltools), at most `iters` times.
The output is W~_i = A(x_i, C_T) C_T with the final centroids C_T.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_TINY = 1e-30  # attention mass below which a centroid is kept (no points attend to it)
DEFAULT_CHUNK_ELEMENTS = 1 << 18  # chunk rows x k x d elements per temporary


def _distances(x: Tensor, c: Tensor) -> Tensor:
    """Squared distances D (n, k) of points x (n, d) to centroids c (k, d)."""
    if x.shape[1] == 1:
        return (x - c[:, 0]).square_()
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _attention(x: Tensor, c: Tensor, tau: float) -> Tensor:
    """A = softmax(-D / tau) over centroids."""
    return torch.softmax(_distances(x, c).mul_(-1.0 / tau), dim=1)


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _distinct(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct values (U,) fp32, per-point index (n,) int32, counts (U,)) of scalars.

    16-bit inputs are counted by bit pattern (one bincount over 65,536 bins, no sort):
    eDKM's table of at most 2^16 values. Other dtypes fall back to torch.unique.
    """
    if x.dtype in _SIXTEEN_BIT:
        bits = x.view(torch.int16).to(torch.int32) + 32768
        counts = torch.bincount(bits, minlength=1 << 16)
        present = counts.nonzero().squeeze(1)
        table = torch.zeros(1 << 16, dtype=torch.int32, device=x.device)
        table[present] = torch.arange(len(present), dtype=torch.int32, device=x.device)
        values = (present - 32768).to(torch.int16).view(x.dtype).float()
        return values, table[bits.long()], counts[present]
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return values, inverse.to(torch.int32), counts


def _update(c: Tensor, s: Tensor, m: Tensor) -> Tensor:
    """C' = S / m, keeping centroids that no point attends to."""
    live = m > _TINY
    return torch.where(live[:, None], s / torch.where(live, m, 1.0)[:, None], c)


def _converged(c_old: Tensor, c_new: Tensor, inertia_old: float | None, inertia: float,
               stop: str, eps: float) -> bool:
    if stop == "centroids":
        return float((c_new - c_old).abs().max()) <= eps
    return inertia_old is not None and abs(inertia_old - inertia) <= eps * max(inertia_old, 1e-30)


def naive_dkm(x: Tensor, c0: Tensor, tau: float, iters: int = 5, eps: float = 1e-4,
              stop: str = "centroids") -> tuple[Tensor, Tensor, int]:
    """The unrolled reference: (W~ (n, d), final centroids (detached), iterations run)."""
    c = c0.detach()
    inertia_old = None
    steps = 0
    for _ in range(iters):
        steps += 1
        d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        a = torch.softmax(-d2 / tau, dim=1)
        inertia = float(d2.detach().min(1).values.sum())
        c_new = _update(c, a.T @ x, a.sum(0))
        done = _converged(c.detach(), c_new.detach(), inertia_old, inertia, stop, eps)
        c, inertia_old = c_new, inertia
        if done:
            break
    a = torch.softmax(-((x[:, None, :] - c[None, :, :]) ** 2).sum(-1) / tau, dim=1)
    return a @ c, c.detach(), steps


def _rows(k: int, d: int, chunk_elements: int) -> int:
    """Points per chunk so that a (rows, k, d) temporary holds about chunk_elements."""
    return max(1, chunk_elements // max(1, k * max(d, 2)))


def _iterate(x: Tensor, w: Tensor | None, c: Tensor, tau: float, rows: int,
             with_inertia: bool) -> tuple[Tensor, Tensor, float]:
    """One centroid update over chunks: (C', attention mass m, inertia at C (0.0 unless
    asked for)). w: multiplicities, None for all ones."""
    s = torch.zeros_like(c)
    m = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
    inertia = 0.0
    for i in range(0, x.shape[0], rows):
        xc = x[i:i + rows]
        a = _attention(xc, c, tau)
        if w is not None:
            wc = w[i:i + rows]
            a = a * wc[:, None]
        s += a.T @ xc
        m += a.sum(0)
        if with_inertia:
            best = _distances(xc, c).min(1).values
            inertia += float((best if w is None else best * wc).sum())
    return _update(c, s, m), m, inertia


def _softmax_distance_backward(xc: Tensor, c: Tensor, a: Tensor, g_a: Tensor, tau: float,
                               wc: Tensor | None) -> tuple[Tensor, Tensor]:
    """Through A = softmax(-D/tau), D = |x - C|^2: (dL/dx per copy, dL/dC weighted by c).

    With G = dL/dZ (Z = -D/tau): dL/dx_i = (2/tau) (G_i C - x_i sum_j G_ij) and the row sums
    of a softmax's input gradient vanish, so only G C remains; dL/dC_j =
    (2/tau) sum_i c_i G_ij (x_i - C_j).
    """
    ag = a * g_a
    g_z = torch.addcmul(ag, a, ag.sum(1, keepdim=True), value=-1.0)
    g_x = (g_z @ c).mul_(2.0 / tau)
    if wc is not None:
        g_z.mul_(wc[:, None])
    g_c = (g_z.T @ xc - c * g_z.sum(0)[:, None]).mul_(2.0 / tau)
    return g_x, g_c


def _iteration_backward(x: Tensor, w: Tensor | None, c: Tensor, c_new: Tensor, m: Tensor,
                        g_new: Tensor, tau: float, rows: int) -> tuple[Tensor, Tensor]:
    """VJP of one update C -> C' (attention mass m) at points x: (dL/dx per copy, dL/dC)."""
    live = m > _TINY
    safe = torch.where(live, m, 1.0)
    g_s = torch.where(live[:, None], g_new / safe[:, None], 0.0)
    g_m = torch.where(live, -(g_new * c_new).sum(1) / safe, 0.0)
    g_c = torch.where(live[:, None], 0.0, g_new)  # kept centroids pass straight through
    g_x = torch.empty_like(x)
    for i in range(0, x.shape[0], rows):
        xc, wc = x[i:i + rows], (None if w is None else w[i:i + rows])
        a = _attention(xc, c, tau)
        g_a = torch.addmm(g_m, xc, g_s.T)
        gx_soft, gc = _softmax_distance_backward(xc, c, a, g_a, tau, wc)
        g_x[i:i + rows] = a @ g_s + gx_soft
        g_c += gc
    return g_x, g_c


def _output_backward(x: Tensor, c: Tensor, g_out: Tensor, tau: float, rows: int
                     ) -> tuple[Tensor, Tensor]:
    """VJP of W~ = A(x, C) C: (dL/dx, dL/dC)."""
    g_x = torch.empty_like(x)
    g_c = torch.zeros_like(c)
    for i in range(0, x.shape[0], rows):
        xc, go = x[i:i + rows], g_out[i:i + rows]
        a = _attention(xc, c, tau)
        gx, gc = _softmax_distance_backward(xc, c, a, go @ c.T, tau, None)
        g_x[i:i + rows] = gx
        g_c += gc + a.T @ go
    return g_x, g_c


class _DKMFunction(torch.autograd.Function):
    """Forward: the iterations and W~ in chunks; saves only the points, the centroids
    C_0..C_T and the attention masses m_1..m_T (k values each). Backward: the output's VJP,
    then each iteration's VJP from the last to the first (paper §3.2: gradients flow to W
    through D and through every centroid update), each recomputing A chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, c0: Tensor, tau: float, iters: int, eps: float,
                stop: str, unique: bool, chunk_elements: int) -> tuple[Tensor, Tensor]:
        k, d = c0.shape
        inverse = None
        ctx.in_dtype = x.dtype
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        ctx.cdt = cdt
        if unique:
            values, inverse, counts = _distinct(x[:, 0])
            points, w = values[:, None].to(cdt), counts.to(cdt)
        else:
            points, w = x.to(cdt), None
        rows = _rows(k, d, chunk_elements)
        cs = [c0.detach().to(cdt).clone()]  # the caller updates its centroids in place
        ms = []
        inertia_old = None
        for _ in range(iters):
            c_new, m, inertia = _iterate(points, w, cs[-1], tau, rows, stop == "inertia")
            done = _converged(cs[-1], c_new, inertia_old, inertia, stop, eps)
            cs.append(c_new)
            ms.append(m)
            inertia_old = inertia
            if done:
                break
        c = cs[-1]
        out = torch.empty_like(points)
        for i in range(0, points.shape[0], rows):
            out[i:i + rows] = _attention(points[i:i + rows], c, tau) @ c
        if unique:
            out = out.index_select(0, inverse)
            ctx.save_for_backward(points, w, inverse, *cs, *ms)
        else:
            ctx.save_for_backward(points, *cs, *ms)
        ctx.tau, ctx.rows, ctx.unique, ctx.steps = tau, rows, unique, len(ms)
        steps = torch.tensor(len(ms))
        ctx.mark_non_differentiable(c, steps)
        return out, c.clone(), steps

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, _g_c: Tensor, _g_steps: Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        g_out = g_out.to(ctx.cdt)
        if ctx.unique:
            points, w, inverse, *rest = saved
            # d = 1: a weighted bincount sums the gradients per value (index_add_ is far
            # slower on the CPU)
            g_sum = torch.bincount(inverse, weights=g_out[:, 0], minlength=points.shape[0]
                                   ).to(points.dtype)[:, None]
            cs, ms = rest[:ctx.steps + 1], rest[ctx.steps + 1:]
            _, g_c = _output_backward(points, cs[-1], g_sum, ctx.tau, ctx.rows)
            # per weight: g_out_i times the derivative of W~ at its value (d = 1, linear)
            slope, _ = _output_backward(points, cs[-1], torch.ones_like(points), ctx.tau,
                                        ctx.rows)
        else:
            points, *rest = saved
            w = None
            cs, ms = rest[:ctx.steps + 1], rest[ctx.steps + 1:]
            g_direct, g_c = _output_backward(points, cs[-1], g_out, ctx.tau, ctx.rows)
        g_iter = torch.zeros_like(points)
        for t in range(ctx.steps, 0, -1):
            gx, g_c = _iteration_backward(points, w, cs[t - 1], cs[t], ms[t - 1], g_c,
                                          ctx.tau, ctx.rows)
            g_iter += gx
        if ctx.unique:
            g_x = g_out * slope.index_select(0, inverse) + g_iter.index_select(0, inverse)
        else:
            g_x = g_direct + g_iter
        return g_x.to(ctx.in_dtype), None, None, None, None, None, None, None


def dkm(x: Tensor, c0: Tensor, tau: float, iters: int = 5, eps: float = 1e-4,
        stop: str = "centroids", unique: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor, int]:
    """Soft-clustered points W~ (n, d), the final centroids (detached) and the number of
    iterations run, with lean memory.

    x: (n, d) points (gradients flow to them; any float dtype, computed in float32, or
    float64 when x is float64); c0: (k, d) starting centroids (treated as a constant, as
    the paper's warm start is detached). unique=True needs d = 1.
    """
    if unique and x.shape[1] != 1:
        raise ValueError("uniquification (eDKM) needs scalar clusters (d = 1)")
    if stop not in ("centroids", "inertia"):
        raise ValueError(f"stop must be 'centroids' or 'inertia', got {stop!r}")
    out, c, steps = _DKMFunction.apply(x, c0.detach(), float(tau), int(iters), float(eps),
                                       stop, bool(unique), int(chunk_elements))
    return out, c, int(steps)
