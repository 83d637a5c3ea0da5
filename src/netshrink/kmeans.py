"""The library's one k-means: seeded, deterministic, memory-bounded, scalar or vector.

Lloyd's algorithm with k-means++ (or random) initialisation. Distances are computed in
chunks of rows, so memory is O(chunk x k) whatever the number of points. For scalars
(d = 1) the nearest centroid is found by binary search between sorted centroid midpoints,
O(n log k) per iteration, which makes palettizing large layers cheap. `kmeans_batched`
clusters one point set per layer, each independently seeded. Empty
clusters are re-seeded with the point farthest from its centroid. Same input and seed ->
same result, bit for bit. PQF (product quantization) and DKM (initial centroids) build on
this module.

`anneal=I` switches Lloyd's updates to SR-C, the stochastic relaxation of Zeger, Vaisey &
Gersho (1992) that PQF uses (docs/methods/pqf.md#annealed-k-means): I+1 passes; pass i
assigns the clean points, then moves each centroid to the mean of its points perturbed by
fresh Gaussian noise of per-dimension std times (1 - i/I)^0.5, so the last pass is a plain
noise-free Lloyd step (the noise of a cluster's mean is drawn directly, `_sr_c`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 1 << 15


@dataclass
class KMeansResult:
    """centroids: (k, d); labels: (n,) int64; inertia: sum of squared distances."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float


def _as_points(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"points must be (n,) or (n, d), got shape {tuple(x.shape)}")
    return x


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = DEFAULT_CHUNK,
           x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared L2) of every point: (labels (n,), squared distances (n,)).

    x_sq: the points' squared norms, if the caller already has them (k-means reuses them
    across iterations)."""
    x = _as_points(x)
    centroids = _as_points(centroids)
    if x.shape[1] == 1:
        return _assign_scalar(x[:, 0], centroids[:, 0])
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    c_sq = squared_norms(centroids)
    c_t = centroids.T.contiguous()
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: the nearest centroid minimises the last two
    # terms (one fused addmm per block); ||x||^2 is added to the minimum, clamped against
    # round-off.
    if x.device.type == "cpu":
        # Blocks of about 2^18 distances (1 MiB in float32) stay in cache and are several
        # times faster than `chunk`-row blocks, whose (chunk, k) matrix goes to memory;
        # there the nearest centroid is also found by `_first_argmin`'s cached element-wise
        # passes. On one intra-op thread (`one_thread`).
        block = min(chunk, max(256, (1 << 18) // centroids.shape[0]))
        found = torch.empty_like(dists)  # labels as floats, exact below 2^24
        with one_thread():
            _assign_rows(x, c_sq, c_t, block, dists, found)
        labels = found.long()
    else:
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], chunk):
            torch.min(torch.addmm(c_sq, x[s:s + chunk], c_t, alpha=-2), 1,
                      out=(dists[s:s + chunk], labels[s:s + chunk]))
    dists.add_(squared_norms(x) if x_sq is None else x_sq).clamp_min_(0)
    return labels, dists


def _assign_rows(x: torch.Tensor, c_sq: torch.Tensor, c_t: torch.Tensor, block: int,
                 dists: torch.Tensor, found: torch.Tensor) -> None:
    """Nearest centroid of every row of x in cache-sized blocks: the blocks' minima into
    `dists`, the first index of each minimum (as a float) into `found`."""
    buffer = x.new_empty(block, c_t.shape[1])  # reused: no page faults per block
    index = torch.arange(c_t.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], block):
        xc = x[s:s + block]
        partial = torch.addmm(c_sq, xc, c_t, alpha=-2, out=buffer[:len(xc)])
        best = torch.amin(partial, 1, out=dists[s:s + block])
        _first_argmin(partial, best[:, None], index, out=found[s:s + block])


@contextmanager
def one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on one torch intra-op thread (CPU only; restored afterwards).

    k-means is a long series of small ops (a few hundred thousand points against k <= 2^16
    centroids, in cache-sized blocks); with torch's threads each op is an OpenMP fork/join
    barrier, which on a loaded machine costs far more than the parallelism saves. Measured
    on 2 shared, busy cores (SmolLM2's gate_proj: 221,184 subvectors, d = 4, k = 256, SR-C
    with I = 20): one thread 3.1-3.7 s, two threads 7.0-7.5 s, the same result bit for
    bit; per pass, the assignment took 108 ms on one thread, 192 ms split over two Python
    threads (one intra-op thread each) and 1.4 s on torch's two threads over 32,768-row
    blocks (the path two threads took before), the centroid update 9-12 ms against
    66-84 ms. torch's thread count is process-wide: other threads running torch ops meanwhile
    also get one thread. Layers are independent, so a caller that wants more cores can
    cluster several layers at once, one Python thread each.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 of every point (row) of an (n, d) tensor."""
    return (x * x).sum(1)


def _first_argmin(values: torch.Tensor, row_min: torch.Tensor, index: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """Index of the first minimum of each row, the same as `values.min(1).indices`, from
    vectorised element-wise passes, written as floats to `out` (overwrites `values`).

    On CPU torch's indexed min reduction is not vectorised: over a (rows, 256) block it
    took about 3/4 of an assignment pass, against 1/8 for the value-only `amin`. Here
    (v > min) * k + j is below k exactly at a row's minima, so its row minimum is the first
    such j (exact while k < 2^24 in float32). The comparison writes floats directly: a
    bool result is several times slower to produce.
    """
    torch.gt(values, row_min, out=values)
    torch.add(index, values, alpha=len(index), out=values)
    return torch.amin(values, 1, out=out)


def _assign_scalar(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D nearest centroid by binary search on midpoints of the sorted centroids."""
    sorted_c, order = torch.sort(c)
    mids = (sorted_c[1:] + sorted_c[:-1]) / 2
    pos = torch.bucketize(x, mids)  # index into sorted centroids
    labels = order[pos]
    return labels, (x - c[labels]) ** 2


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int
                      ) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with
    probability proportional to the squared distance to the nearest chosen centre.

    Seeds from a random sample of at most max(2^16, 64 k) points (as faiss does), so the
    k sequential passes stay cheap on layers with millions of weights.
    """
    n = x.shape[0]
    limit = max(1 << 16, 64 * k)
    if n > limit:
        x = x[torch.randperm(n, generator=gen)[:limit].to(x.device)]
        n = limit
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    closest = _sq_dist_to(x, x[first], chunk)
    for _ in range(1, k):
        cdf = torch.cumsum(closest.to(torch.float64), 0)
        total = float(cdf[-1])
        if total <= 0:  # fewer distinct points than k: duplicate a point
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
            idx = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype,
                                                                device=cdf.device))), n - 1)
        centroids.append(x[idx])
        closest = torch.minimum(closest, _sq_dist_to(x, x[idx], chunk))
    return torch.stack(centroids)


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """Squared distance of every point to one centre c (d,)."""
    if x.shape[1] == 1:
        return (x[:, 0] - c[0]) ** 2
    return assign(x, c[None], chunk)[1]


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 30,
    seed: int = 0,
    init: str | torch.Tensor = "kmeans++",
    tol: float = 0.0,
    chunk: int = DEFAULT_CHUNK,
    anneal: int = 0,
    sample: int | None = None,
    weights: torch.Tensor | None = None,
) -> KMeansResult:
    """Cluster points x ((n,) or (n, d)) into k centroids with Lloyd's algorithm.

    init: "kmeans++", "random" (k distinct random points, as PQF's code does) or a (k, d)
    tensor of starting centroids. Stops after `iters` iterations or when no label changes
    (vectors also when the inertia improves by at most `tol`, relative; scalars always run
    to a fixed point). Computation runs in float32 (or
    float64 if x is float64) on x's device; sums are accumulated in float64.

    anneal: I > 0 runs SR-C annealing instead (module docstring): exactly I+1 passes,
    `iters` and `tol` are ignored; the noise comes from the seeded generator.

    sample: learn the centroids from at most this many points, drawn without replacement
    by the seeded generator (faiss does the same with 256 points per centroid); the labels
    and inertia are then those of all n points for the learned centroids. None, or
    n <= sample: all points, and the same result, bit for bit, as without the option
    (the generator is not touched).

    weights: an importance >= 0 per point (n,): centroids are weighted means and the
    inertia is the weighted sum of squared distances (importance-weighted clustering, as
    in SqueezeLLM's and coremltools' sensitive k-means). Seeding is not weighted; not with
    `anneal` or `sample`. None: every point weighs 1 (the same result as before).
    """
    x = _as_points(x.detach())
    if not x.is_floating_point():
        raise ValueError("k-means needs floating-point points")
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means needs finite points (found NaN or infinity)")
    n, d = x.shape
    if n == 0 or k < 1:
        raise ValueError(f"need at least one point and k >= 1 (n={n}, k={k})")
    if weights is not None:
        weights = weights.detach().reshape(-1).to(x.device, torch.float64)
        if weights.numel() != n or not bool(torch.isfinite(weights).all()) or bool(
                (weights < 0).any()):
            raise ValueError(f"weights must be {n} finite values >= 0")
        if anneal or sample is not None:
            raise ValueError("weights are not supported with anneal or sample")
    gen = torch.Generator().manual_seed(seed)
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be >= 1 or None, got {sample}")
    with one_thread(x.device):
        if sample is not None and n > sample:
            pick = torch.sort(torch.randperm(n, generator=gen)[:sample]).values
            learned = _fit(x[pick.to(x.device)], k, gen, iters, init, tol, chunk, anneal)
            labels, dists = assign(x, learned.centroids, chunk)
            return KMeansResult(learned.centroids, labels,
                                float(dists.sum(dtype=torch.float64)))
        return _fit(x, k, gen, iters, init, tol, chunk, anneal, weights)


def _fit(x: torch.Tensor, k: int, gen: torch.Generator, iters: int,
         init: str | torch.Tensor, tol: float, chunk: int, anneal: int,
         weights: torch.Tensor | None = None) -> KMeansResult:
    """`kmeans` on the points x (n, d), validated, with the seeded generator `gen`."""
    n, d = x.shape
    if isinstance(init, torch.Tensor):
        centroids = _as_points(init.detach()).to(x).clone()
        if centroids.shape != (k, d):
            raise ValueError(f"init centroids must be ({k}, {d}), got {tuple(centroids.shape)}")
    elif init == "kmeans++":
        centroids = _kmeans_plus_plus(x, k, gen, chunk)
    elif init == "random":
        idx = torch.randperm(n, generator=gen)[:k]
        if k > n:
            idx = torch.cat([idx, torch.randint(n, (k - n,), generator=gen)])
        centroids = x[idx.to(x.device)].clone()
    else:
        raise ValueError(f"unknown init {init!r}: use 'kmeans++', 'random' or a tensor")

    if anneal < 0:
        raise ValueError(f"anneal must be >= 0, got {anneal}")
    if anneal > 0:
        return _sr_c(x, k, centroids, anneal, gen, chunk)
    if d == 1 and iters > 0:
        centroids = _lloyd_scalar(x[:, 0], centroids, iters, weights)
        iters = 1  # one generic pass: labels, inertia, re-seeding of any empty cluster
    x_sq = squared_norms(x) if d > 1 else None  # the scalar path does not use them
    labels, dists = assign(x, centroids, chunk, x_sq)
    inertia = _inertia(dists, weights)
    for _ in range(iters):
        centroids = update_centroids(x, labels, k, centroids, dists, weights)
        new_labels, dists = assign(x, centroids, chunk, x_sq)
        new_inertia = _inertia(dists, weights)
        converged = torch.equal(new_labels, labels) or (
            inertia - new_inertia <= tol * max(inertia, 1e-30))
        labels, inertia = new_labels, new_inertia
        if converged:
            break
    return KMeansResult(centroids, labels, inertia)


def _sr_c(x: torch.Tensor, k: int, centroids: torch.Tensor, passes: int,
          gen: torch.Generator, chunk: int) -> KMeansResult:
    """SR-C (docs/methods/pqf.md#annealed-k-means): for i = 0..I, labels from the clean points,
    centroids = mean
    of X + (1 - i/I)^0.5 * N(0, 1) * std_dim over each cluster; empty clusters re-seeded.

    The mean of m points each perturbed by independent N(0, s^2) noise is their clean mean
    plus N(0, s^2 / m): the noise is drawn that way, once per centroid (k x d draws
    instead of n x d; the same distribution of updates, not the same random numbers).
    A re-seeded empty cluster counts as one point.
    """
    std = x.std(0, keepdim=True) if x.shape[0] > 1 else torch.zeros_like(x[:1])
    x_sq = squared_norms(x) if x.shape[1] > 1 else None  # the scalar path does not use them
    labels, dists = assign(x, centroids, chunk, x_sq)
    for i in range(passes + 1):
        centroids = update_centroids(x, labels, k, centroids, dists)
        scale = (1.0 - i / passes) ** 0.5
        if scale > 0:
            counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
            noise = torch.randn(centroids.shape, generator=gen, dtype=x.dtype).to(x.device)
            centroids = centroids + noise * (scale * std) / counts.sqrt()[:, None]
        labels, dists = assign(x, centroids, chunk, x_sq)
    return KMeansResult(centroids, labels, float(dists.sum(dtype=torch.float64)))


def _inertia(dists: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Sum of (weighted) squared distances, in float64."""
    if weights is None:
        return float(dists.sum(dtype=torch.float64))
    return float((dists.to(torch.float64) * weights).sum())


def _lloyd_scalar(x: torch.Tensor, centroids: torch.Tensor, iters: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd iterations for scalars on sorted data: each cluster is a contiguous run of the
    sorted points, found by binary search for the midpoints, and its mean comes from prefix
    sums, so an iteration costs O(k log n) after one O(n log n) sort. Exact same fixed
    point as the generic loop; stops when no boundary moves. Empty clusters keep their
    value here and are re-seeded by the caller's final generic pass. With `weights`,
    weighted means (prefix sums of w and w x; a cluster of zero weight counts as empty)."""
    xs, order = torch.sort(x.to(torch.float64))
    w = None if weights is None else weights[order]
    prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs if w is None else xs * w, 0)])
    wprefix = None if w is None else torch.cat([xs.new_zeros(1), torch.cumsum(w, 0)])
    c = torch.sort(centroids[:, 0].to(torch.float64)).values
    bounds = None
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        inner = torch.searchsorted(xs, mids, right=True)
        new_bounds = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), len(xs))])
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        counts = ((bounds[1:] - bounds[:-1]).to(torch.float64) if wprefix is None
                  else wprefix[bounds[1:]] - wprefix[bounds[:-1]])
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        c = torch.sort(c).values
    return c.to(centroids.dtype)[:, None]


def update_centroids(x: torch.Tensor, labels: torch.Tensor, k: int,
                     previous: torch.Tensor, dists: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (weighted mean with `weights`) of the points assigned to each centroid; empty
    clusters (of zero weight) are re-seeded with the points farthest from their centroids
    (deterministic), so no codeword is wasted."""
    x = _as_points(x)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    values = x.to(torch.float64)
    sums.index_add_(0, labels, values if weights is None else values * weights[:, None])
    counts = (torch.bincount(labels, minlength=k) if weights is None
              else torch.bincount(labels, weights, minlength=k))
    centroids = previous.clone()
    filled = counts > 0
    centroids[filled] = (sums[filled] / counts[filled, None]).to(x.dtype)
    empty = (~filled).nonzero().flatten()
    if len(empty):
        if dists is None:
            dists = assign(x, previous)[1]
        far = torch.argsort(dists, descending=True, stable=True)[: len(empty)]
        centroids[empty[: len(far)]] = x[far]
    return centroids


def kmeans_batched(xs: Sequence[torch.Tensor], ks: Sequence[int] | int, *,
                   iters: int = 30, seed: int = 0, init: str = "kmeans++",
                   chunk: int = DEFAULT_CHUNK, anneal: int = 0) -> list[KMeansResult]:
    """Cluster several point sets (e.g. one per layer), each with its own k.

    Each set gets its own generator seeded with seed + its index, so the result for a set
    does not depend on which other sets are in the batch.
    """
    ks = [ks] * len(xs) if isinstance(ks, int) else list(ks)
    if len(ks) != len(xs):
        raise ValueError("one k per point set")
    return [kmeans(x, k, iters=iters, seed=seed + i, init=init, chunk=chunk, anneal=anneal)
            for i, (x, k) in enumerate(zip(xs, ks))]
