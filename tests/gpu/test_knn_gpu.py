"""KNN search on CUDA returns the CPU search's neighbours (torch backend; faiss when present)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gen_ad.baselines.knn import KNNIndex, SearchSettings

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed"))]


def _data(n: int = 3000, dim: int = 64, q: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, dim)).astype(np.float32)
    bank = centres[rng.integers(0, 16, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return bank.astype(np.float32), bank[:q] + 0.05 * rng.normal(size=(q, dim)).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gpu_search_returns_the_cpu_neighbours(device: str, backend: str, metric: str) -> None:
    bank, queries = _data()
    k = 10
    settings = {"metric": metric, "index": "flat", "backend": backend}
    d_cpu, i_cpu = KNNIndex(bank, SearchSettings(**settings, use_gpu=False)).search(queries, k)
    d_dev, i_dev = KNNIndex(bank, SearchSettings(**settings, use_gpu=device == "cuda")).search(
        queries, k)
    # float32 distances summed in another order on the GPU (the search runs at 'highest' matmul
    # precision, no TF32): equal to ~1e-5 relative
    np.testing.assert_allclose(d_dev, d_cpu, rtol=1e-4, atol=1e-4)
    # the same neighbours; a swap is allowed only between two bank vectors at the same distance
    # (to the tolerance above), where either order is correct
    differ = i_dev != i_cpu
    assert differ.mean() < 0.02
    for qi, ki in zip(*np.nonzero(differ), strict=True):
        a, b = bank[i_dev[qi, ki]], bank[i_cpu[qi, ki]]
        assert abs(_dist(queries[qi], a, metric) - _dist(queries[qi], b, metric)) < 1e-4


def _dist(q: np.ndarray, x: np.ndarray, metric: str) -> float:
    if metric == "l2":
        return float(np.linalg.norm(q - x))
    return float(1 - q @ x / (np.linalg.norm(q) * np.linalg.norm(x)))
