"""Exact k-nearest-neighbour search at matrix-product speed, equal to a float64 brute force.

Each query batch goes through two phases:

1. **Candidates.** Approximate scores from fp32 matrix products, ``||b||^2 - 2 q.b`` (``l2``) or
   ``-q.b`` (``cosine``), with the bank resident on the device (or streamed in blocks when it
   does not fit the memory budget), and the ``kc = k + margin`` smallest per query: faiss' flat
   search (``knn_L2sqr`` / ``knn_inner_product``, which fuse the product with the selection) when
   faiss is installed, on CPU, and faiss-gpu's on CUDA; else ``torch.topk`` per block, merged.
2. **Exact re-rank.** The float64 distances, ``sum((q - b)^2)`` (``l2``, squared) or ``1 - q.b``
   (``cosine``), of the candidates whose fp32 score is within ``v_k + 2 E_q`` (below), ordered by
   ``(distance, bank index)``: ties go to the lower index.

**Why the result equals a float64 brute force.** Let ``E_q`` bound the error of the fp32 score of
query ``q`` against *any* bank row (:func:`error_bound`: the textbook dot-product bound
``gamma_D ||q|| ||b||`` with ``||b|| <= max ||b||``, the rounding of the norms and sums, and the
float64 rounding, doubled for safety), and ``v_k`` be the ``k``-th smallest fp32 score. The ``k``
rows scoring ``<= v_k`` are within ``v_k + E_q`` exactly, so the ``k``-th float64 distance ``d_k``
is ``<= v_k + E_q``; a row scoring above ``v_k + 2 E_q`` is exactly farther than ``v_k + E_q >=
d_k``, strictly, so it can neither enter the top ``k`` nor tie with its last member. Every row
left out of the scan's candidates scores ``>= T_q`` (the largest candidate score, as ``topk`` keeps
the smallest); when ``T_q > v_k + 2 E_q`` the candidates within the limit are therefore all the rows
that can matter, and only they are re-ranked. Queries where this does not hold are scanned again
with twice the candidates, up to the whole bank (where the result is exact by definition).
fp32 matrix products run at full fp32 precision (TF32 and bf16 reductions are switched off for
the call), so the bound holds on CPU and CUDA alike; faiss' GPU flat search uses full fp32 too.

**The faiss candidates obey the same bound.** faiss' CPU flat search computes, in fp32,
``||q||^2 + ||b||^2 - 2 q.b`` (an sgemm for ``q.b``; the bank norms are ours, the float64 norms
rounded once to fp32, or its own fp32 sums on a streamed block) and clamps a negative result to
0, or ``q.b`` for ``cosine`` (we take ``1 - q.b`` in float64); below 20 queries it sums
``(q_i - b_i)^2`` in fp32 directly, whose error is smaller still. Each of the three sums has
error ``<= gamma_D`` times its magnitude whatever the summation order or FMA use, and the two
additions add ``2u (||q|| + ||b||)^2``: in all ``<= gamma_{D+2} (||q|| + ||b||)^2`` (``l2``),
``<= gamma_D ||q|| ||b||`` (``cosine``), below :func:`error_bound`'s ``gamma_{D+8}`` terms, which
are also doubled; clamping at 0 only moves a score towards the true distance, which is ``>= 0``.
faiss' selection (heap or reservoir) keeps exactly the ``kc`` smallest of its fp32 scores, so
every row left out scores ``>= T_q`` as with ``topk``, and the re-rank and rescan rule above
apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import numpy as np
import torch

from gen_ad.errors import ConfigError, DataError

Metric = Literal["l2", "cosine"]
Backend = Literal["auto", "torch", "faiss"]
FAISS_GPU_MAX_K = 2048  # faiss' GPU k-selection limit
U32 = 2.0 ** -24  # fp32 unit roundoff
U64 = 2.0 ** -53


class BankSource(Protocol):
    """Read access to an ``[count, dim]`` float32 bank (in memory or on disk)."""

    @property
    def count(self) -> int: ...  # read-only: FeatureBank's are properties

    @property
    def dim(self) -> int: ...

    def blocks(self, max_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(offset, rows [n, dim] float32)`` in order."""
        ...

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows with global indices ``ids`` ``[n]`` -> ``[n, dim]`` float32."""
        ...

    def load(self) -> np.ndarray:
        """The whole bank ``[count, dim]`` float32."""
        ...


class ArraySource:
    """An in-memory ``[N, D]`` float32 array seen through the :class:`BankSource` interface."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.arr.ndim != 2:
            raise DataError(f"a feature bank must be [N, D], got {self.arr.shape}")
        if not np.all(np.isfinite(self.arr)):  # as FeatureBank.append: one rule, every backend
            bad = int((~np.isfinite(self.arr)).any(axis=1).sum())
            raise DataError(f"{bad} feature rows contain NaN or infinite values")
        self.count, self.dim = self.arr.shape

    def blocks(self, max_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.count, max_rows):
            yield s, self.arr[s:s + max_rows]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.arr[np.asarray(ids, dtype=np.int64)]

    def load(self) -> np.ndarray:
        return self.arr


def faiss_module() -> Any | None:
    """The faiss module, or ``None`` when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_has_gpu(faiss: Any | None) -> bool:
    """Whether ``faiss`` is a GPU build and a CUDA device is present."""
    return (faiss is not None and hasattr(faiss, "StandardGpuResources")
            and torch.cuda.is_available() and faiss.get_num_gpus() > 0)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Run fp32 matrix products at full precision (no TF32 / bf16), restoring the setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def error_bound(q_norm: torch.Tensor, b_max: float, dim: int, metric: Metric) -> torch.Tensor:
    """Bound ``[Q]`` float64 on ``|fp32 score + const - float64 distance|`` over all bank rows.

    Args:
        q_norm: ``[Q]`` float64 Euclidean norms of the queries.
        b_max: largest Euclidean norm of a bank row.
        dim: vector dimension ``D``.
        metric: ``l2`` (squared distance via ``||q||^2 + ||b||^2 - 2 q.b``) or ``cosine``.
    """
    n = dim + 8  # D products and sums in the dot product, plus norms, scaling and the final sums
    gamma32 = n * U32 / (1.0 - n * U32)
    gamma64 = n * U64 / (1.0 - n * U64)
    scale = (q_norm + b_max) ** 2 if metric == "l2" else q_norm * b_max + 1.0
    return 2.0 * (2.0 * gamma32 + 2.0 * gamma64) * scale


def faiss_knn(faiss: Any, q: np.ndarray, bank: np.ndarray, k: int, metric: Metric,
              sq_norms32: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss' exact fp32 flat search on CPU: the ``k`` best rows of ``bank`` for each query.

    Args:
        q: ``[Q, D]`` float32 queries; bank: ``[N, D]`` float32 rows, ``k <= N``.
        metric: ``l2`` (squared distances) or ``cosine`` (``1 - q.b``, taken in float64).
        sq_norms32: ``[N]`` float32 squared row norms of ``bank`` (``l2``), so faiss does not
            recompute them on every call; ``None``: faiss computes them.
    Returns:
        ``(scores [Q, k] float64, indices [Q, k] int64)``, ascending scores.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    (nq, dim), nb = q.shape, len(bank)
    d = np.empty((nq, k), dtype=np.float32)
    i = np.empty((nq, k), dtype=np.int64)
    ptr = faiss.swig_ptr
    if metric == "cosine":
        faiss.knn_inner_product(ptr(q), ptr(bank), dim, nq, nb, k, ptr(d), ptr(i))
    elif sq_norms32 is None:
        faiss.knn_L2sqr(ptr(q), ptr(bank), dim, nq, nb, k, ptr(d), ptr(i))
    else:
        norms = np.ascontiguousarray(sq_norms32, dtype=np.float32)
        faiss.knn_L2sqr(ptr(q), ptr(bank), dim, nq, nb, k, ptr(d), ptr(i), ptr(norms))
    if nq and int(i.min()) < 0:  # faiss leaves -1 where a row's score is NaN
        raise DataError("the feature bank or the queries contain NaN or infinite values")
    scores = torch.from_numpy(d).double()
    return (1.0 - scores if metric == "cosine" else scores), torch.from_numpy(i)


def default_margin(k: int) -> int:
    """Extra candidates collected per query by the scan when none is given: ``max(32, k // 2)``.

    Only those within the error bound of the ``k``-th are re-ranked, so a generous margin costs
    little (a larger ``topk``); a query whose candidates do not cover that bound is scanned again
    with twice as many, so the margin only trades speed, never exactness.
    """
    return max(32, k // 2)


def sq_norms(x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Squared row norms ``[N]`` float64 of ``x`` ``[N, D]``, in chunks (no full float64 copy)."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    return torch.cat([x[s:s + chunk].double().pow(2).sum(1) for s in range(0, len(x), chunk)])


def rerank_chunk(candidates: int, dim: int, device: torch.device) -> int:
    """Queries per float64 re-rank step: at most 4 MiB of temporaries on CPU (they stay in
    cache: 2-3x faster than 12 MiB on the 2-core bench machine), 256 MiB on a GPU."""
    target = (256 << 20) if device.type == "cuda" else (4 << 20)
    return max(1, target // max(1, candidates * dim * 8))


def exact_distances(q: torch.Tensor, cand: torch.Tensor, metric: Metric,
                    chunk: int | None = None) -> torch.Tensor:
    """Float64 distances of queries ``[Q, D]`` to their candidate rows ``[Q, C, D]`` -> ``[Q, C]``.

    ``l2``: squared Euclidean ``sum((q - b)^2)``; ``cosine``: ``1 - q.b`` (inputs normalised).
    Computed ``chunk`` queries at a time (``None``: :func:`rerank_chunk`), so the float64
    temporaries stay small; each row's value does not depend on the chunking.
    """
    out = torch.empty(cand.shape[:2], dtype=torch.float64, device=cand.device)
    if chunk is None:
        chunk = rerank_chunk(cand.shape[1], cand.shape[2], cand.device)
    q64 = q.double()[:, None, :]
    for s in range(0, len(q), chunk):
        # a float64 copy (the fp32 -> float64 conversion is exact), then in place
        c64 = cand[s:s + chunk].to(torch.float64, copy=True)
        if metric == "l2":
            c64.sub_(q64[s:s + chunk])
            out[s:s + chunk] = c64.mul_(c64).sum(-1)
        else:
            out[s:s + chunk] = 1.0 - c64.mul_(q64[s:s + chunk]).sum(-1)
    return out


def order_by_distance(d: torch.Tensor, idx: torch.Tensor, k: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` first of ``(d, idx)`` ``[Q, C]`` in ``(distance, index)`` order."""
    by_index = torch.argsort(idx, dim=1, stable=True)
    d, idx = d.gather(1, by_index), idx.gather(1, by_index)
    by_dist = torch.argsort(d, dim=1, stable=True)[:, :k]
    return d.gather(1, by_dist), idx.gather(1, by_dist)


def brute_force(q: np.ndarray, bank: np.ndarray, k: int, metric: Metric = "l2",
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 distances to every bank row, ``(distance, index)`` order.

    Args:
        q: ``[Q, D]`` queries; bank: ``[N, D]`` (normalised beforehand for ``cosine``).
    Returns:
        ``(dist [Q, k] float64, idx [Q, k] int64)``; ``l2`` distances are squared.
    """
    tq, tb = torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(bank))
    idx = torch.arange(len(tb)).expand(len(tq), -1)
    d = exact_distances(tq, tb.expand(len(tq), -1, -1), metric)
    dd, ii = order_by_distance(d, idx, k)
    return dd.numpy(), ii.numpy()


class ExactKNN:
    """Exact ``k``-NN over a :class:`BankSource`; see the module docstring for the method.

    Args:
        source: the bank (``[N, D]`` float32 rows; normalised by the caller for ``cosine``).
        metric: ``l2`` or ``cosine``.
        device: where the products run (``cuda`` keeps the bank there when it fits).
        memory_budget_bytes: the bank is resident when it takes at most half of this; otherwise
            it is streamed in blocks of a third of it. Score tiles take at most a third.
        backend: ``auto`` (faiss' flat search for the candidates when faiss is installed: on
            CPU, and on CUDA when it is faiss-gpu; else torch), ``torch`` or ``faiss``.
        margin: extra candidates per query (``None``: :func:`default_margin`).
        normalise: divide the bank rows by their norm (``cosine`` on a raw bank); queries are
            the caller's to normalise.
    """

    def __init__(self, source: BankSource, metric: Metric = "l2",
                 device: str | torch.device = "cpu", memory_budget_bytes: int = 2 << 30,
                 backend: Backend = "auto", margin: int | None = None,
                 normalise: bool = False) -> None:
        if metric not in ("l2", "cosine"):
            raise ConfigError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        self.source, self.metric, self.margin = source, metric, margin
        self.count, self.dim = int(source.count), int(source.dim)
        self.device = torch.device(device)
        self.budget = int(memory_budget_bytes)
        self.normalise = normalise
        self.faiss = self._pick_backend(backend)
        self.resident = self.count * self.dim * 4 <= self.budget // 2
        self._bank: torch.Tensor | None = None
        self._neg_half_sq: torch.Tensor | None = None  # -||b||^2 / 2, fp32 (l2 scan bias)
        self._sq32: np.ndarray | None = None  # fp32 squared norms for faiss (resident bank)
        self._faiss_index: Any = None
        self._b_max: float | None = None
        self.stats: dict[str, int] = {"widened": 0, "reranked": 0}  # queries scanned again,
        # candidates re-ranked in float64 (summed over queries)

    def _pick_backend(self, backend: Backend) -> Any | None:
        faiss = faiss_module()
        if backend == "faiss" and faiss is None:
            raise ConfigError("backend 'faiss' requested but faiss is not installed "
                              "(pip install faiss-cpu, or faiss-gpu-cu12)")
        if backend not in ("auto", "torch", "faiss"):
            raise ConfigError(f"backend must be auto, torch or faiss, got {backend!r}")
        if backend == "torch":
            return None
        gpu = self.device.type == "cuda"
        if backend == "auto" and (faiss is None or (gpu and not faiss_has_gpu(faiss))):
            return None  # on CPU faiss' fused flat search beats fp32 matmul + topk (bench/knn.py)
        if gpu and not faiss_has_gpu(faiss):
            raise ConfigError("backend 'faiss' on CUDA needs faiss-gpu "
                              "(pip install faiss-gpu-cu12)")
        return faiss

    # -- the bank
    @property
    def _faiss_on_cpu(self) -> bool:
        """Candidates come from faiss' CPU flat search (:func:`faiss_knn`)."""
        return self.faiss is not None and self.device.type == "cpu"

    def _block_rows(self) -> int:
        return max(1, self.budget // 3 // (self.dim * 4))

    def _prepare(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.normalise:
            n = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = (rows / np.maximum(n, 1e-12)).astype(np.float32)
        return rows

    def _blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, rows on the device)``: the resident bank once, or streamed blocks."""
        if self.resident:
            yield 0, self._resident()
            return
        for offset, rows in self.source.blocks(self._block_rows()):
            yield offset, torch.from_numpy(self._prepare(rows)).to(self.device)

    def _resident(self) -> torch.Tensor:
        if self._bank is None:
            self._bank = torch.from_numpy(self._prepare(self.source.load())).to(self.device)
            sq = sq_norms(self._bank)
            self._neg_half_sq = sq.div(-2).float()
            if self._faiss_on_cpu:
                self._sq32 = sq.float().numpy()
            self._b_max = float(sq.max().sqrt()) if self.count else 0.0
        return self._bank

    def b_max(self) -> float:
        """Largest row norm of the bank (one pass over it when streamed)."""
        if self._b_max is None:
            if self.resident:
                self._resident()
            else:
                self._b_max = max(float(sq_norms(b).max().sqrt()) for _, b in self._blocks())
        assert self._b_max is not None
        return self._b_max

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Bank rows ``[n, D]`` (float32, on the device) for global indices ``ids`` ``[n]``."""
        if self.resident:
            return self._resident().index_select(0, ids)
        rows = self._prepare(self.source.rows(ids.cpu().numpy()))
        return torch.from_numpy(rows).to(self.device)

    def _rerank(self, q: torch.Tensor, ids: torch.Tensor, chunk: int | None = None,
                ) -> torch.Tensor:
        """Float64 distances ``[Q, C]`` of ``q`` ``[Q, D]`` to the rows ``ids`` ``[Q, C]``.

        Rows are gathered ``chunk`` queries at a time (``None``: :func:`rerank_chunk`), so the
        temporaries stay in cache.
        """
        out = torch.empty(ids.shape, dtype=torch.float64, device=self.device)
        if chunk is None:
            chunk = rerank_chunk(ids.shape[1], self.dim, self.device)
        for s in range(0, len(q), chunk):
            sel = ids[s:s + chunk]
            rows = self._rows(sel.reshape(-1)).reshape(*sel.shape, self.dim)
            out[s:s + chunk] = exact_distances(q[s:s + chunk], rows, self.metric, chunk)
        return out

    # -- phase 1: candidates
    def _block_candidates(self, q: torch.Tensor, block: torch.Tensor, kc: int, use_faiss: bool,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``kc`` fp32 scores of ``q`` in one block and their in-block indices.

        torch: ``||b||^2 - 2 q.b`` / ``-q.b`` (without the ``||q||^2`` / ``1`` constant);
        faiss (CPU): its squared L2 / ``1 - ip`` (float64).
        """
        kb = min(kc, len(block))
        if use_faiss:
            norms = self._sq32 if self.resident else None
            return faiss_knn(self.faiss, q.numpy(), block.numpy(), kb, self.metric, norms)
        if self.metric == "l2":  # rank by q.b - ||b||^2/2: the bias is added in the product's
            # epilogue (cuBLASLt fuses a 1-D addmm bias on CUDA), no second pass over the tile
            bias = self._neg_half_sq if self.resident else sq_norms(block).div(-2).float()
            s = torch.addmm(bias, q, block.T)
        else:
            s = q @ block.T
        v, i = torch.topk(s, kb, dim=1, largest=True, sorted=False)
        return v.mul_(-2.0 if self.metric == "l2" else -1.0), i

    def _scan(self, q: torch.Tensor, kc: int, use_faiss: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``kc`` of every block, merged: scores ``[Q, kc]`` and global indices."""
        best_v: torch.Tensor | None = None
        best_i = torch.empty(0)
        for offset, block in self._blocks():
            v, i = self._block_candidates(q, block, kc, use_faiss)
            i = i + offset
            if best_v is None:
                best_v, best_i = v, i
                continue
            best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            best_v, pick = torch.topk(best_v, min(kc, best_v.shape[1]), dim=1, largest=False,
                                      sorted=False)
            best_i = best_i.gather(1, pick)
        assert best_v is not None
        return best_v, best_i

    def _gpu_faiss_candidates(self, q: torch.Tensor, kc: int,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss-gpu flat search over the resident bank: squared L2 / ``1 - ip``, indices."""
        faiss, ip = self.faiss, self.metric == "cosine"
        if self._faiss_index is None:
            index = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(),
                                           self.device.index or 0, index)
            for _, rows in self.source.blocks(self._block_rows()):
                index.add(self._prepare(rows))
            self._faiss_index = index
        d, i = self._faiss_index.search(q.cpu().numpy(), kc)
        d = torch.from_numpy(d).to(self.device)
        return (1.0 - d if ip else d), torch.from_numpy(i).to(self.device)

    def _candidates(self, q: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[Q, kc]`` float64 comparable to exact distances, and indices."""
        gpu = self.device.type == "cuda"
        if self.faiss is not None and gpu and self.resident and kc <= FAISS_GPU_MAX_K:
            v, i = self._gpu_faiss_candidates(q, kc)
            return v.double(), i
        if self._faiss_on_cpu:
            return self._scan(q, kc, use_faiss=True)  # float64 already
        with full_fp32():
            v, i = self._scan(q, kc)
        const = q.double().pow(2).sum(1, keepdim=True) if self.metric == "l2" else 1.0
        return v.double() + const, i

    # -- search
    def _margin(self, k: int) -> int:
        return default_margin(k) if self.margin is None else max(0, int(self.margin))

    def _query_rows(self, kc: int) -> int:
        # the score tile of a block (faiss on CPU: its own fixed 4096 x 1024 tile instead)
        tile_rows = self.count if self.resident else self._block_rows()
        per_query = 0 if self._faiss_on_cpu else 4 * tile_rows
        per_query += 4 * kc * (self.dim + 4)  # candidates; float64 rows 4 MiB at a time
        return max(1, self.budget // 3 // per_query)

    def _search_batch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top ``k`` of ``q`` ``[Q, D]`` (on the device) -> float64 distances, indices."""
        kc = min(self.count, k + self._margin(k))
        bound = error_bound(q.double().norm(dim=1), self.b_max(), self.dim, self.metric)
        out_d = torch.empty(len(q), k, dtype=torch.float64, device=self.device)
        out_i = torch.empty(len(q), k, dtype=torch.long, device=self.device)
        todo = torch.arange(len(q), device=self.device)
        while len(todo):
            v, i = self._candidates(q[todo], kc)
            v, order = torch.sort(v, dim=1)
            i = i.gather(1, order)
            limit = v[:, k - 1] + 2.0 * bound[todo]  # every true neighbour scores <= this
            ok = v[:, -1] > limit if kc < self.count else torch.ones_like(limit, dtype=torch.bool)
            if bool(ok.any()):
                done, vi, ii = todo[ok], v[ok], i[ok]
                m = max(k, int((vi <= limit[ok, None]).sum(1).max()))  # re-rank only these
                d, idx = order_by_distance(self._rerank(q[done], ii[:, :m]), ii[:, :m], k)
                self.stats["reranked"] += m * len(done)
                out_d[done], out_i[done] = d, idx
            todo = todo[~ok]
            if len(todo):
                self.stats["widened"] += len(todo)
                kc = min(self.count, 2 * kc)
        return out_d, out_i

    def search(self, queries: np.ndarray | torch.Tensor, k: int,
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest bank rows of each query, exactly as a float64 brute force.

        Args:
            queries: ``[Q, D]`` float (normalised by the caller for ``cosine``).
            k: neighbours, ``1 <= k <= N``.
        Returns:
            ``(dist [Q, k] float64 ascending, idx [Q, k] int64)``: squared Euclidean for ``l2``,
            ``1 - q.b`` for ``cosine``; ties in ``(distance, index)`` order.
        """
        q = torch.as_tensor(queries).detach().to(self.device, torch.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries must be [Q, {self.dim}], got {tuple(q.shape)}")
        if not 1 <= k <= self.count:
            raise ConfigError(f"k={k} needs a bank of at least {k} vectors; this one has "
                              f"{self.count}")
        if not bool(torch.isfinite(q).all()):
            raise DataError("queries contain NaN or infinite values")
        step = self._query_rows(k + self._margin(k))
        parts = [self._search_batch(q[s:s + step], k) for s in range(0, len(q), step)]
        d = torch.cat([p[0] for p in parts]).cpu().numpy()
        i = torch.cat([p[1] for p in parts]).cpu().numpy()
        return d, i
