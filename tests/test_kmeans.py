import pytest
import torch

from netshrink.kmeans import assign, kmeans, kmeans_batched, update_centroids


def _blobs(n_per=200, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[-5.0] * d, [0.0] * d, [5.0] * d])
    return torch.cat([c + 0.1 * torch.randn(n_per, d, generator=g) for c in centers]), centers


def test_recovers_separated_clusters_vector():
    x, centers = _blobs(d=3)
    r = kmeans(x, 3, seed=0)
    found = r.centroids[torch.argsort(r.centroids[:, 0])]
    assert torch.allclose(found, centers, atol=0.05)
    assert r.labels.shape == (600,)
    assert len(set(r.labels.tolist())) == 3


def test_scalar_path_matches_bruteforce_assignment():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g)
    c = torch.randn(16, generator=g)
    labels, d = assign(x, c)
    brute = ((x[:, None] - c[None]) ** 2)
    assert torch.allclose(d, brute.min(1).values)
    assert torch.equal(brute[torch.arange(5000), labels], brute.min(1).values)


@pytest.mark.parametrize("threads", [1, 2])  # one thread: the element-wise argmin path
def test_vector_assignment_is_the_first_nearest_centroid(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_first_nearest_centroid()
    finally:
        torch.set_num_threads(previous)


def _check_first_nearest_centroid():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3000, 8, generator=g)
    c = torch.randn(64, 8, generator=g)
    c[40] = c[7]  # an exact tie: the first of the two must win, as torch's min does
    x[:5] = c[7]
    for dtype in (torch.float32, torch.float64):
        xs, cs = x.to(dtype), c.to(dtype)
        labels, dists = assign(xs, cs)
        partial = (cs * cs).sum(1) - 2 * xs @ cs.T  # the quantity assign minimises
        assert torch.equal(labels, torch.addmm((cs * cs).sum(1), xs, cs.T.contiguous(),
                                               alpha=-2).min(1).indices)
        assert torch.allclose(partial[torch.arange(3000), labels], partial.min(1).values)
        assert (labels != 40).all() and (labels[:5] == 7).all()
        assert torch.allclose(dists, torch.cdist(xs, cs).min(1).values ** 2, atol=1e-4)


def test_non_finite_points_are_refused():
    x = torch.randn(100, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        kmeans(x, 4)


def test_chunked_equals_unchunked():
    x, _ = _blobs(d=4)
    a = kmeans(x, 5, seed=1, chunk=7)
    b = kmeans(x, 5, seed=1, chunk=1 << 15)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)


def test_deterministic_for_seed_and_seed_matters():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    a, b, c = kmeans(x, 8, seed=5), kmeans(x, 8, seed=5), kmeans(x, 8, seed=6)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.centroids, c.centroids)


def test_inertia_not_above_random_init_and_lloyd_improves():
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    zero_iter = kmeans(x, 16, seed=0, iters=0)
    full = kmeans(x, 16, seed=0, iters=50)
    assert full.inertia < zero_iter.inertia


def test_more_points_than_k_needed_and_duplicates():
    x = torch.tensor([1.0, 1.0, 2.0])
    r = kmeans(x, 8, seed=0)
    assert r.centroids.shape == (8, 1)
    assert set(r.centroids[r.labels].flatten().tolist()) == {1.0, 2.0}
    assert r.inertia == 0


def test_empty_clusters_are_reseeded():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    prev = torch.tensor([[0.0], [100.0]])
    labels = torch.zeros(4, dtype=torch.int64)
    new = update_centroids(x, labels, 2, prev)
    assert new[1, 0] in (10.0, 10.1)  # farthest point becomes the empty centroid


def test_batched_seeds_independent_of_batch():
    xs = [torch.randn(500, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    res = kmeans_batched(xs, [4, 8, 2], seed=10)
    assert torch.equal(res[1].centroids, kmeans(xs[1], 8, seed=11).centroids)
    assert [r.centroids.shape[0] for r in res] == [4, 8, 2]


def test_random_init_and_given_init():
    x, centers = _blobs(d=2)
    r = kmeans(x, 3, init=centers.clone(), iters=5)
    assert torch.allclose(r.centroids, centers, atol=0.05)
    assert kmeans(x, 3, init="random", seed=0).centroids.shape == (3, 2)


def test_same_result_on_any_thread_count_and_setting_restored():
    """k-means runs on one intra-op thread whatever torch's setting (faster on a loaded
    machine): the result is the same bit for bit, and the setting is restored."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, 4, generator=g)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(x, 64, seed=1, init="random", anneal=3)
        torch.set_num_threads(2)
        two = kmeans(x, 64, seed=1, init="random", anneal=3)
        assert torch.get_num_threads() == 2
        labels, dists = assign(x, one.centroids)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one.centroids, two.centroids) and torch.equal(one.labels, two.labels)
    assert torch.equal(labels, one.labels)


def test_sample_learns_from_a_subset_and_labels_every_point():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5000, 4, generator=g)
    for anneal in (0, 3):
        full = kmeans(x, 16, seed=2, init="random", anneal=anneal)
        # at most `sample` points: the option changes nothing, bit for bit
        same = kmeans(x, 16, seed=2, init="random", anneal=anneal, sample=5000)
        assert torch.equal(full.centroids, same.centroids)
        assert torch.equal(full.labels, same.labels) and full.inertia == same.inertia
        sub = kmeans(x, 16, seed=2, init="random", anneal=anneal, sample=1000)
        assert sub.labels.shape == (5000,)
        labels, dists = assign(x, sub.centroids)
        assert torch.equal(sub.labels, labels)
        assert sub.inertia == float(dists.sum(dtype=torch.float64))
        assert sub.inertia < 1.2 * full.inertia
    with pytest.raises(ValueError, match="sample"):
        kmeans(x, 4, sample=0)
