"""Exact KNN search (gen_ad.baselines.search): equal to a float64 brute force, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen_ad.baselines.search import (
    ArraySource,
    ExactKNN,
    brute_force,
    error_bound,
    exact_distances,
    faiss_knn,
    faiss_module,
    full_fp32,
)
from gen_ad.errors import ConfigError, DataError

BACKENDS = ["torch"] + (["faiss"] if faiss_module() is not None else [])
needs_faiss = pytest.mark.skipif(faiss_module() is None, reason="needs faiss")


def numpy_reference(q: np.ndarray, bank: np.ndarray, k: int, metric: str = "l2",
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 brute force (NumPy), ties by index."""
    q64, b64 = q.astype(np.float64), bank.astype(np.float64)
    if metric == "l2":
        d = ((q64[:, None, :] - b64[None]) ** 2).sum(-1)
    else:
        d = 1.0 - (q64[:, None, :] * b64[None]).sum(-1)
    idx = np.broadcast_to(np.arange(len(bank)), d.shape)
    order = np.stack([np.lexsort((ii, dd)) for dd, ii in zip(d, idx)])[:, :k]
    return np.take_along_axis(d, order, 1), order


def _data(n: int, d: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32),
            rng.normal(size=(q, d)).astype(np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("budget", [1 << 30, 40_000])  # resident / streamed blocks of ~96 rows
def test_equals_float64_brute_force(backend: str, metric: str, budget: int) -> None:
    bank, q = _data(1500, 35, 30)
    if metric == "cosine":
        bank, q = _unit(bank), _unit(q)
    knn = ExactKNN(ArraySource(bank), metric=metric, memory_budget_bytes=budget, backend=backend)
    assert knn.resident == (budget > 1 << 20)
    d, i = knn.search(q, 40)
    rd, ri = numpy_reference(q, bank, 40, metric)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-12, atol=1e-12)
    bd, bi = brute_force(q, bank, 40, metric)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_array_equal(d, bd)  # the same float64 formula: bitwise equal
    # the default margin covers the bound at once; only rows near the k-th are re-ranked
    assert knn.stats["widened"] == 0 and knn.stats["reranked"] < len(q) * (40 + 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [1 << 30, 20_000])
def test_ties_go_to_the_lower_index(backend: str, budget: int) -> None:
    bank, q = _data(800, 33, 12, seed=1)
    bank[100:160] = bank[7]  # 61 copies of one row, at distance 0 from queries equal to it
    bank[400:420] = bank[3]
    q[:4] = bank[7]
    q[4:6] = bank[3] + 1e-3
    knn = ExactKNN(ArraySource(bank), memory_budget_bytes=budget, backend=backend, margin=0)
    d, i = knn.search(q, 30)
    rd, ri = numpy_reference(q, bank, 30)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(i[0], [7, *range(100, 129)])  # tie order = index order
    np.testing.assert_allclose(d, rd, rtol=1e-12, atol=1e-12)
    assert knn.stats["widened"] > 0  # margin 0 inside a tie: verified, then widened


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 199, 200])
def test_k_up_to_the_bank_size(k: int, backend: str) -> None:
    bank, q = _data(200, 16, 7, seed=2)
    bank[50:60] = bank[0]
    d, i = ExactKNN(ArraySource(bank), memory_budget_bytes=12_000, backend=backend).search(q, k)
    rd, ri = numpy_reference(q, bank, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(d, rd, rtol=1e-12, atol=1e-12)
    if k == 200:
        assert sorted(i[0]) == list(range(200))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_norms_and_close_neighbours(backend: str) -> None:
    """Vectors far from the origin (fp32 cancellation) with neighbours closer than fp32 resolves."""
    rng = np.random.default_rng(3)
    centre = rng.normal(size=64) * 300
    bank = (centre + rng.normal(size=(600, 64)) * 1e-2).astype(np.float32)
    q = (centre + rng.normal(size=(9, 64)) * 1e-2).astype(np.float32)
    knn = ExactKNN(ArraySource(bank), margin=2, backend=backend)
    _, i = knn.search(q, 20)
    np.testing.assert_array_equal(i, numpy_reference(q, bank, 20)[1])
    assert knn.stats["widened"] > 0  # fp32 could not separate them: the check widened


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_error_bound_holds(metric: str) -> None:
    rng = np.random.default_rng(4)
    bank = (rng.normal(size=(2000, 96)) * rng.lognormal(0, 1.5, size=(2000, 1)) + 5.0)
    q = rng.normal(size=(25, 96)) * 4 + 5.0
    bank, q = bank.astype(np.float32), q.astype(np.float32)
    if metric == "cosine":
        bank, q = _unit(bank), _unit(q)
    knn = ExactKNN(ArraySource(bank), metric=metric)
    tq = torch.from_numpy(q)
    with full_fp32():
        v, ids = knn._scan(tq, len(bank))
    const = tq.double().pow(2).sum(1, keepdim=True) if metric == "l2" else 1.0
    approx = v.double() + const
    exact = knn._rerank(tq, ids)
    bound = error_bound(tq.double().norm(dim=1), knn.b_max(), 96, metric)
    err = (approx - exact).abs().max(dim=1).values
    assert torch.all(err <= bound) and torch.all(err > 0)
    # worst case (D u) vs the typical random-walk error (sqrt(D) u): loose, but not vacuous
    assert torch.all(bound < 1e5 * err)


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("own_norms", [True, False])
def test_error_bound_holds_for_faiss_scores(metric: str, own_norms: bool) -> None:
    """faiss' fp32 scores (its norms or ours, clamped at 0) stay within the same bound."""
    rng = np.random.default_rng(6)
    bank = (rng.normal(size=(1500, 96)) * rng.lognormal(0, 1.5, size=(1500, 1)) + 5.0)
    q = rng.normal(size=(20, 96)) * 4 + 5.0
    bank, q = bank.astype(np.float32), q.astype(np.float32)
    bank[:5] = q[:5]  # distance 0: fp32 may go negative, faiss clamps
    if metric == "cosine":
        bank, q = _unit(bank), _unit(q)
    norms = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32) if own_norms else None
    v, ids = faiss_knn(faiss_module(), q, bank, len(bank), metric, norms)  # type: ignore[arg-type]
    tq, tb = torch.from_numpy(q), torch.from_numpy(bank)
    exact = exact_distances(tq, tb[ids], metric)
    bound = error_bound(tq.double().norm(dim=1), float(tb.double().norm(dim=1).max()), 96, metric)
    err = (v - exact).abs().max(dim=1).values
    assert torch.all(err <= bound) and torch.all(err > 0)
    assert sorted(ids[0].tolist()) == list(range(len(bank)))  # k = N: every row, once


@pytest.mark.parametrize("chunk", [None, 1, 3, 50])
def test_exact_distances_do_not_depend_on_chunking(chunk: int | None) -> None:
    bank, q = _data(60, 37, 11, seed=7)
    cand = torch.from_numpy(bank)[torch.randint(0, 60, (11, 25))]
    for metric in ("l2", "cosine"):
        ref = exact_distances(torch.from_numpy(q), cand, metric, chunk=11)  # type: ignore[arg-type]
        got = exact_distances(torch.from_numpy(q), cand, metric, chunk=chunk)  # type: ignore[arg-type]
        assert torch.equal(got, ref)


def test_auto_backend_takes_faiss_candidates_on_cpu_when_installed() -> None:
    bank, q = _data(300, 16, 5, seed=8)
    auto = ExactKNN(ArraySource(bank))
    assert (auto.faiss is not None) == (faiss_module() is not None)
    assert ExactKNN(ArraySource(bank), backend="torch").faiss is None
    d, i = auto.search(q, 10)
    dt, it = ExactKNN(ArraySource(bank), backend="torch").search(q, 10)
    np.testing.assert_array_equal(i, it)
    np.testing.assert_array_equal(d, dt)  # both re-rank in float64 with the same formula


def test_bad_input_is_a_clear_error() -> None:
    bank, q = _data(50, 8, 3)
    knn = ExactKNN(ArraySource(bank))
    with pytest.raises(ConfigError, match="k=51"):
        knn.search(q, 51)
    with pytest.raises(DataError, match=r"\[Q, 8\]"):
        knn.search(q[:, :4], 5)
    q[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        knn.search(q, 5)
    with pytest.raises(ConfigError, match="metric"):
        ExactKNN(ArraySource(bank), metric="manhattan")  # type: ignore[arg-type]
    bank[7, 0] = np.inf  # an in-memory bank is checked like a saved one, whatever the backend
    with pytest.raises(DataError, match="1 feature rows contain NaN"):
        ArraySource(bank)
    with pytest.raises(DataError, match=r"\[N, D\]"):
        ArraySource(bank[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_equals_cpu(backend: str) -> None:
    if backend == "faiss" and not hasattr(faiss_module(), "StandardGpuResources"):
        pytest.skip("faiss-cpu is installed, not faiss-gpu: no faiss search on CUDA")
    bank, q = _data(5000, 64, 50, seed=5)
    bank[10:40] = bank[0]
    q[0] = bank[0]
    cpu = ExactKNN(ArraySource(bank), backend="torch").search(q, 100)
    gpu = ExactKNN(ArraySource(bank), device="cuda", backend=backend).search(q, 100)
    np.testing.assert_array_equal(gpu[1], cpu[1])
    # float64 sums in another order on the GPU: equal to ~1e-13 relative
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-12, atol=1e-12)
