"""Input-aware encoding of a scalar palette: GPTQ codes, least-squares codebook refit.

A layer's output error on calibration inputs X is ||(W - W^) X||^2 = tr(D H D^T) with
D = W - W^ and H = X X^T (the input second moment, capture.py). With the codebook c (k
values) and the per-row scale s of the plan fixed (so the stored bits do not change):

- `gptq_codes`: GPTQ (Frantar et al., ICLR 2023, Alg. 1): columns are coded one by one,
  each to the nearest codeword (times its row's scale), and the rounding error of a column
  is spread over the not-yet-coded columns through the upper Cholesky factor of H^-1, so
  that later columns compensate it. H is dampened by `damp` x its mean diagonal (the
  paper's 1%); dead inputs (H_jj = 0) get H_jj = 1 and weight 0. Columns in order of
  decreasing H_jj ("act-order"; free here: codes are per weight), lazy batches of 128.
- `refit_codebook` / `refit_scale`: given the codes, the codebook (then the scales) that
  minimise tr(D H D^T): W^ is linear in each, so each is a small least-squares problem.
- `output_error`: tr(D H D^T) summed over the layer's groups.

Everything is batched over G groups of rows that share an H (grouped and depthwise
convolutions: one H per group): W (G, r, n), H (G, n, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kmeans import one_thread


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W^) H (W - W^)^T) summed over groups: W, W^ (G, r, n), H (G, n, n)."""
    d = (w - w_hat).float()
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


def decode(values: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None
           ) -> torch.Tensor:
    """W^ = values[codes] x scale (per row): codes (G, r, n), scale (G, r) or None."""
    w = values[codes]
    return w if scale is None else w * scale[..., None]


class _Nearest:
    """Index of the nearest of `values` (1-D, any order) for every entry of a tensor: the
    number of sorted midpoints below it (a comparison per midpoint for small codebooks,
    cheaper than `bucketize` on the strided columns GPTQ codes)."""

    def __init__(self, values: torch.Tensor) -> None:
        sorted_v, self.order = torch.sort(values)
        self.mids = (sorted_v[1:] + sorted_v[:-1]) / 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.mids) <= 64:
            return self.order[(x[..., None] > self.mids).sum(-1)]
        return self.order[torch.bucketize(x.contiguous(), self.mids)]


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, batched (G, n, n) float64;
    the dampening grows tenfold until H is positive definite."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if not bool(info.any()):
            # cholesky_solve against I: several times faster than cholesky_inverse on CPU
            return torch.linalg.cholesky(torch.cholesky_solve(eye.expand_as(h), chol),
                                         upper=True)
        damp = max(damp * 10, 1e-6)
    raise ValueError("the input second moment H is not positive definite even with "
                     "strong dampening")


@dataclass(frozen=True)
class Factor:
    """H prepared for GPTQ, computed once per layer: the column order, the dead columns
    and the upper Cholesky factor of the dampened H^-1 in that order."""

    perm: torch.Tensor  # (G, n)
    dead: torch.Tensor  # (G, n) bool
    u: torch.Tensor  # (G, n, n) float32


def factor(h: torch.Tensor, *, damp: float = 0.01, act_order: bool = True) -> Factor:
    """`Factor` of H (G, n, n): dead inputs (H_jj = 0) get H_jj = 1, columns sorted by
    decreasing H_jj with act_order, dampening `damp` x the mean diagonal."""
    g, n, _ = h.shape
    h = h.detach().double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True) if act_order else (
        torch.arange(n, device=h.device).expand(g, n))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(g, n, n)), 2,
                     perm[:, None, :].expand(g, n, n))
    return Factor(perm, dead, _inverse_factor(h, damp).float())


def gptq_codes(w: torch.Tensor, f: Factor, values: torch.Tensor,
               scale: torch.Tensor | None, *, block: int = 128) -> torch.Tensor:
    """Codes (G, r, n) of W (G, r, n) into `values` (k,) x per-row `scale` (G, r) chosen
    column by column with GPTQ's error feedback through `f` (module docstring)."""
    g, r, n = w.shape
    w = w.detach().float().masked_fill(f.dead[:, None, :], 0.0)
    perm, u = f.perm, f.u
    w = torch.gather(w, 2, perm[:, None, :].expand(g, r, n))
    values = values.detach().float()
    s = torch.ones(g, r, device=w.device) if scale is None else scale.detach().float()
    safe = torch.where(s != 0, s, torch.ones_like(s))
    codes = torch.empty(g, r, n, dtype=torch.long, device=w.device)
    nearest = _Nearest(values)
    with one_thread(w.device):  # many small ops: no fork/join per op (kmeans.one_thread)
        _columns(w, u, values, s, safe, nearest, codes, block)
    return torch.empty_like(codes).scatter_(2, perm[:, None, :].expand(g, r, n), codes)


def _columns(w: torch.Tensor, u: torch.Tensor, values: torch.Tensor, s: torch.Tensor,
             safe: torch.Tensor, nearest: _Nearest, codes: torch.Tensor, block: int) -> None:
    """GPTQ's loop over the (permuted) columns, in lazy batches of `block` (Alg. 1)."""
    n = w.shape[2]
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i]
            c = nearest(col / safe)
            codes[:, :, i1 + i] = c
            err = (col - values[c] * s) / u1[:, i, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * u1[:, None, i, i:]
            err1[:, :, i] = err
        w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]


def refit_codebook(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, k: int,
                   scale: torch.Tensor | None, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """The k values c minimising tr((W - W^(c)) H (W - W^(c))^T) for fixed codes and
    scales: W^_ij = s_i c[a_ij] is linear in c, so c solves the k x k normal equations
    (sum_i s_i^2 O_i^T H O_i) c = sum_i s_i O_i^T H w_i, O_i the one-hot codes of row i.
    A codeword no weight uses keeps no constraint: a tiny ridge keeps it at 0 (the caller
    keeps its old value)."""
    g, r, n = w.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=w.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=w.device)
    s = torch.ones(g, r, device=w.device) if scale is None else scale.float()
    rows = max(1, chunk_bytes // (4 * n * k))
    for gi in range(g):
        hg = h[gi].float()
        for a in range(0, r, rows):
            sl = slice(a, min(r, a + rows))
            onehot = torch.nn.functional.one_hot(codes[gi, sl], k).float()  # (rc, n, k)
            rc = onehot.shape[0]
            # H O_i for every row in one GEMM: (n, n) @ (n, rc k)
            ho = (hg @ onehot.permute(1, 0, 2).reshape(n, rc * k)).reshape(n, rc, k)
            sg = s[gi, sl]
            weighted = (onehot * (sg * sg)[:, None, None]).permute(1, 0, 2).reshape(-1, k)
            gram += (weighted.T @ ho.reshape(-1, k)).double()
            wh = w[gi, sl].float() @ hg
            rhs += torch.einsum("r,rnk,rn->k", sg, onehot, wh).double()
    ridge = 1e-9 * float(gram.diagonal().abs().max().clamp_min(1e-30))
    eye = torch.eye(k, dtype=torch.float64, device=w.device)
    return torch.linalg.solve(gram + ridge * eye, rhs).float()


def refit_scale(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor,
                values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales s_i = (w_i H v_i) / (v_i H v_i), v_i = values[codes_i], minimising
    each row's output error for fixed codes and codebook; rows with v_i H v_i = 0 or a
    scale of 0 (dead rows) keep theirs."""
    v = values.float()[codes]  # (G, r, n)
    vh = v @ h.float()
    num = (w.float() * vh).sum(-1)
    den = (v * vh).sum(-1)
    ok = (den > 0) & (scale != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), scale.float())
