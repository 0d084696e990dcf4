"""KNN anomaly baseline: a feature bank of normal patches and nearest-neighbour distances.

Pipeline (Juturu et al. 2025): embed normal patches with a frozen foundation model, keep the
vectors in a :class:`~gen_ad.baselines.bank.FeatureBank` on disk (its files, and how a fit or an
extend publishes them whole: :mod:`gen_ad.baselines.bank`), and score a query by its distance to
the ``k`` nearest normal vectors (default ``k=200``; mean of the ``k`` distances, or the
``k``-th).

Distances. ``l2`` scores are **Euclidean** distances (faiss' L2 indexes return squared distances;
they are square-rooted here, everywhere). ``cosine`` scores are cosine distances ``1 - cos`` (the
vectors are L2-normalised and searched by inner product).

Threshold. When a bank is fitted, a random subset of its own vectors (``calib_size``) is scored
*leave-one-out*: each against the other bank vectors, leaving out its own row **and every row
identical to it** (the same vector: Euclidean distance exactly 0, as the float64 re-rank gives
it), so neither a point nor a duplicate of its image finds itself and the whole bank stays
usable. The label-free threshold is ``Q3 + 1.5*IQR`` of these normal scores; it is saved with the
bank, recording the vectors it was calibrated on (one that does not match them is re-calibrated
at load, with a warning). Near-duplicates (overlapping tiles of one slide) are *not* left out and
still make this threshold optimistic; a threshold from held-out normal patches avoids that.

Precision. Features are embedded in fp32 unless a bank records ``bf16`` (and the device has
it); the precision is recorded in ``bank.json`` (``extractor.precision``) and queries are embedded
in the bank's precision, with a warning when the device cannot match it.

Exact search (``flat``) is :class:`gen_ad.baselines.search.ExactKNN`: fp32 matrix-product
candidates, then a float64 re-rank, so the neighbours equal a float64 brute force (ties to the
lower index). Memory: queries are searched in chunks and, when the bank does not fit in
``memory_budget_mb``, it is streamed from disk block by block, so peak memory stays bounded
whatever the bank size. IVF (faiss) holds the whole bank in memory and is meant for millions of
vectors that fit.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from gen_ad.baselines.bank import CALIB as CALIB
from gen_ad.baselines.bank import META as META
from gen_ad.baselines.bank import THRESH as THRESH
from gen_ad.baselines.bank import FeatureBank as FeatureBank
from gen_ad.baselines.bank import calibration_ids, saved_threshold
from gen_ad.baselines.bank import check_no_bank as check_no_bank
from gen_ad.baselines.search import ArraySource, ExactKNN, error_bound, faiss_has_gpu
from gen_ad.data.folders import DECODER_VERSION
from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.thresholds import Threshold, calibrate

Metric = Literal["l2", "cosine"]
Reduction = Literal["mean", "kth"]
IndexKind = Literal["flat", "ivf"]
Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")


def _faiss() -> Any | None:
    """The faiss module, or ``None`` when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _gpu_faiss(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


# ----------------------------------------------------------------------------- search


@dataclass
class SearchSettings:
    """How to search the bank.

    Attributes:
        metric: ``l2`` (Euclidean) or ``cosine`` (``1 - cos``).
        index: ``flat`` (exact) or ``ivf`` (faiss IVF-Flat, approximate).
        memory_budget_mb: bound on the memory the search allocates (bank blocks, distance tiles,
            query chunks). An exact search over a bank larger than this streams it from disk.
        nlist: IVF lists (``None``: ``4*sqrt(N)``, at most ``N/39``).
        nprobe: IVF lists probed per query; ``None`` tunes it on the first search: the smallest
            of ``nlist/16`` grown by 1.5x steps whose recall@k on 64 bank vectors (against an exact
            search) reaches ``target_recall``.
        target_recall: recall@k the nprobe tuning aims for.
        backend: ``auto`` (faiss when installed), ``faiss`` or ``torch``.
        use_gpu: use a GPU when faiss-gpu (faiss) or CUDA (torch backend) is present.
    """

    metric: Metric = "l2"
    index: IndexKind = "flat"
    memory_budget_mb: float = 2048.0
    nlist: int | None = None
    nprobe: int | None = None
    target_recall: float = 0.95
    backend: Literal["auto", "faiss", "torch"] = "auto"
    use_gpu: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible value."""
        if self.metric not in ("l2", "cosine"):
            raise ConfigError(f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        if self.index not in ("flat", "ivf"):
            raise ConfigError(f"index must be 'flat' or 'ivf', got {self.index!r}")
        if self.backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"backend must be auto, faiss or torch, got {self.backend!r}")
        if not self.memory_budget_mb > 0:
            raise ConfigError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


class KNNIndex:
    """Exact or IVF k-nearest-neighbour search over a :class:`FeatureBank` or an array.

    :meth:`search` returns *distances* (Euclidean for ``l2``, ``1 - cos`` for ``cosine``) sorted
    ascending, and global bank indices.
    """

    def __init__(self, source: FeatureBank | np.ndarray, settings: SearchSettings | None = None,
                 seed: int = 0) -> None:
        self.settings = settings or SearchSettings()
        self.settings.validate()
        self.source = ArraySource(source) if isinstance(source, np.ndarray) else source
        self.count, self.dim = int(self.source.count), int(self.source.dim)
        self.seed = seed
        faiss = _faiss()
        want = self.settings.backend
        if want == "faiss" and faiss is None:
            raise ConfigError("backend 'faiss' requested but faiss is not installed "
                              "(pip install faiss-cpu, or faiss-gpu-cu12)")
        self.faiss = None if want == "torch" else faiss
        if self.settings.index == "ivf" and self.faiss is None:
            raise ConfigError("the IVF index needs faiss (pip install faiss-cpu); use --index flat")
        self._index: Any = None
        self._exact: ExactKNN | None = None
        self.tuned: dict[str, Any] = {}

    # -- sizes
    @property
    def budget_bytes(self) -> int:
        return int(self.settings.memory_budget_mb * 2**20)

    @property
    def in_memory(self) -> bool:
        """Whether the whole bank is held in memory (IVF, or a flat bank within half the budget)."""
        return self.settings.index == "ivf" or self.count * self.dim * 4 <= self.budget_bytes // 2

    def _block_rows(self) -> int:
        return max(1, min(self.count, self.budget_bytes // 3 // (self.dim * 4)))

    def _query_rows(self, k: int, block_rows: int) -> int:
        # torch tiles are float64 + float32 per (query, block row); results and merge buffers
        per_query = 12 * block_rows + 24 * (k + 1) * 2 + 8 * self.dim
        return max(1, self.budget_bytes // 3 // per_query)

    # -- building
    def _tune_nprobe(self, index: Any, k: int) -> int:
        """Smallest probe count (growing by 1.5x from ``nlist/16``) reaching the target recall@k."""
        rng = np.random.default_rng(self.seed + 1)
        q = self.source.rows(np.sort(rng.choice(self.count, min(self.count, 64), replace=False)))
        if self.settings.metric == "cosine":
            q = _normalise(q)
        _, exact = self._exact_index().search(q, k)
        nprobe = max(1, index.nlist // 16)
        while True:
            index.nprobe = nprobe
            _, approx = index.search(q, k)
            hits = sum(len(np.intersect1d(a, b)) for a, b in zip(exact, approx))
            recall = hits / exact.size
            if recall >= self.settings.target_recall or nprobe >= index.nlist:
                break
            nprobe = min(index.nlist, max(nprobe + 1, int(math.ceil(nprobe * 1.5))))
        self.tuned = {"nprobe": int(nprobe), "recall_at_k": float(recall), "k": int(k)}
        return nprobe

    def _build(self, k: int) -> Any:
        faiss, s = self.faiss, self.settings
        ip = s.metric == "cosine"
        if s.index == "flat":
            index = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        else:
            nlist = s.nlist or max(1, int(round(4 * math.sqrt(self.count))))
            nlist = max(1, min(nlist, self.count // 39 or 1))
            quant = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
            metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
            index = faiss.IndexIVFFlat(quant, self.dim, nlist, metric)
            rng = np.random.default_rng(self.seed)
            n_train = min(self.count, nlist * 40)
            train = self.source.rows(np.sort(rng.choice(self.count, n_train, replace=False)))
            index.train(_normalise(train) if ip else train)
        for _, block in self.source.blocks(self._block_rows()):
            index.add(_normalise(block) if ip else block)
        if s.index == "ivf":
            index.nprobe = s.nprobe or self._tune_nprobe(index, k)
        if s.use_gpu and _gpu_faiss(faiss):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def _get_index(self, k: int) -> Any:
        if self._index is None:
            self._index = self._build(k)
        return self._index

    # -- searching
    def search(self, queries: np.ndarray | torch.Tensor, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest bank vectors of each query.

        Args:
            queries: ``[Q, D]`` float.
            k: neighbours per query (``1 <= k <= N``, ``k <= N-1`` with ``exclude``).
            exclude: optional ``[Q]`` bank index per query to leave out (leave-one-out); bank
                rows identical to the query (the same vector) are left out with it.
        Returns:
            ``(dist [Q,k] float32 ascending, idx [Q,k] int64)``; distances are Euclidean for
            ``l2`` and ``1 - cos`` for ``cosine``.
        """
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries must be [Q, {self.dim}], got {q.shape}")
        limit = self.count - (1 if exclude is not None else 0)
        if not 1 <= k <= limit:
            raise ConfigError(f"k={k} needs a bank of at least {k + (exclude is not None)} "
                              f"vectors; this one has {self.count}")
        if self.settings.metric == "cosine":
            q = _normalise(q)
        if exclude is None:
            d, i = self._search_raw(q, k)
        else:
            d, i = self._search_leave_out(q, k, np.asarray(exclude, dtype=np.int64))
        return self._to_distance(d), i

    def _search_leave_out(self, q: np.ndarray, k: int,
                          self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``k`` nearest rows of each query other than its own row and rows identical to it.

        Searches ``k+1`` candidates, then twice as many for the queries whose duplicates used
        them up, up to the whole bank.

        Raises:
            DataError: fewer than ``k`` bank rows differ from some query.
        """
        out_d = np.empty((len(q), k), dtype=np.float64)
        out_i = np.empty((len(q), k), dtype=np.int64)
        todo, kk = np.arange(len(q)), min(self.count, k + 1)
        while len(todo):
            d, i = self._search_raw(q[todo], kk)
            drop = (i == self_ids[todo, None]) | self._identical(q[todo], d, i)
            ok = (~drop).sum(axis=1) >= k
            if kk >= self.count and not ok.all():
                raise DataError(
                    f"the bank has fewer than k={k} vectors that differ from bank vector "
                    f"{int(self_ids[todo[~ok][0]])} (duplicated images): remove the duplicates "
                    "or use a smaller k")
            keep = np.argsort(drop[ok], axis=1, kind="stable")[:, :k]  # first k not dropped
            out_d[todo[ok]] = np.take_along_axis(d[ok], keep, axis=1)
            out_i[todo[ok]] = np.take_along_axis(i[ok], keep, axis=1)
            todo, kk = todo[~ok], min(self.count, 2 * kk)
        return out_d, out_i

    def _identical(self, q: np.ndarray, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        """``[Q, C]`` mask of candidates ``i`` whose bank row equals the query exactly.

        Only candidates whose raw distance could be that of an identical row are read and
        compared, a block at a time: for ``l2`` on the exact (float64) search those at exactly 0;
        else (cosine, IVF's fp32 scores) those within the fp32 error bound of an identical row.
        """
        if self.settings.metric == "l2" and self.settings.index == "flat":
            tol = np.zeros((len(q), 1))
        else:  # an identical row has the query's norm: ||q|| + ||b|| = 2 ||q|| (1 + 1 if cosine)
            qn = torch.from_numpy(np.linalg.norm(q.astype(np.float64), axis=1))
            b_max = 0.0 if self.settings.metric == "l2" else 1.0
            scale = 2.0 if self.settings.metric == "l2" else 1.0
            tol = error_bound(scale * qn, b_max, self.dim, self.settings.metric).numpy()[:, None]
        rows, cols = np.nonzero((d <= tol) & (i >= 0))
        same = np.zeros(d.shape, dtype=bool)
        step = self._block_rows()
        for s in range(0, len(rows), step):
            r, c = rows[s:s + step], cols[s:s + step]
            cand = self.source.rows(i[r, c])
            if self.settings.metric == "cosine":
                cand = _normalise(cand)
            same[r, c] = np.all(cand == q[r], axis=1)
        return same

    def _to_distance(self, raw: np.ndarray) -> np.ndarray:
        """Internal ascending scores -> reported distances (sqrt of squared L2; 1-cos as is)."""
        if self.settings.metric == "l2":
            return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)
        return np.maximum(raw, 0.0).astype(np.float32)

    def _search_raw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Internal search: squared L2 or ``1 - ip`` ascending, chunked over queries."""
        if self.settings.index == "flat":
            return self._exact_index().search(q, k)
        step = self._query_rows(k, 0)  # IVF: the whole bank is in one faiss index
        out_d = np.empty((len(q), k), dtype=np.float64)
        out_i = np.empty((len(q), k), dtype=np.int64)
        for s in range(0, len(q), step):
            d, i = self._get_index(k).search(q[s:s + step], k)
            out_d[s:s + step] = 1.0 - d if self.settings.metric == "cosine" else d
            out_i[s:s + step] = i
        short = np.nonzero((out_i < 0).any(axis=1))[0]  # faiss pads missing neighbours with -1
        if len(short):
            warnings.warn(
                f"{len(short)} of {len(q)} queries found fewer than k={k} neighbours in the "
                f"{self._get_index(k).nprobe} IVF lists probed; they were searched exactly "
                "(raise nprobe, or use --index flat)", stacklevel=3)
            out_d[short], out_i[short] = self._exact_index().search(q[short], k)
        return out_d, out_i

    def _exact_index(self) -> ExactKNN:
        """The exact search (built once; it keeps the bank resident when it fits)."""
        if self._exact is None:
            device = self._torch_device()
            if self.settings.backend == "faiss" and not faiss_has_gpu(self.faiss):
                device = torch.device("cpu")
            self._exact = ExactKNN(self.source, self.settings.metric, device, self.budget_bytes,
                                   self.settings.backend,
                                   normalise=self.settings.metric == "cosine")
        return self._exact

    def _torch_device(self) -> torch.device:
        cuda = self.settings.use_gpu and torch.cuda.is_available()
        return torch.device("cuda" if cuda else "cpu")


def reduce_distances(dist: np.ndarray, reduction: Reduction = "mean") -> np.ndarray:
    """``[Q,k]`` ascending distances -> ``[Q]`` scores (mean of the k, or the k-th)."""
    if reduction == "mean":
        return dist.mean(axis=1)
    if reduction == "kth":
        return dist[:, -1]
    raise ConfigError(f"reduction must be 'mean' or 'kth', got {reduction!r}")


# ----------------------------------------------------------------------------- features


def _device_of(extractor: torch.nn.Module) -> torch.device:
    """Where the extractor's tensors live (CPU for one without any)."""
    t = next(itertools.chain(extractor.parameters(), extractor.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def bf16_supported(device: torch.device) -> bool:
    """Whether embeddings can be computed under bf16 autocast on ``device`` (CUDA with bf16)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def usable_precision(wanted: str | None, device: torch.device,
                     where: str = "the bank") -> Precision:
    """The precision to embed with on ``device`` so as to match ``wanted`` (a bank's record).

    ``None`` (a bank from before the record) and ``fp32`` give fp32; ``bf16`` gives bf16 where
    the device has it, else fp32 with a warning (the vectors then differ slightly).
    """
    if wanted is None:
        warnings.warn(f"{where} does not record its embedding precision (built by an earlier "
                      "gen_ad: bf16 autocast on a GPU, fp32 on a CPU); embedding in fp32",
                      stacklevel=3)
        return "fp32"
    if wanted not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {wanted!r}")
    if wanted == "bf16" and not bf16_supported(device):
        warnings.warn(f"{where} was embedded in bf16 but {device} has no bf16 autocast: "
                      "embedding in fp32, so vectors differ slightly from the bank's",
                      stacklevel=3)
        return "fp32"
    return "bf16" if wanted == "bf16" else "fp32"


def _autocast(device: torch.device, precision: Precision = "fp32") -> Any:
    """bf16 autocast for ``bf16`` on a device that has it; else autocast off (fp32)."""
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    if precision == "bf16" and bf16_supported(device):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return torch.autocast(kind, enabled=False)


@torch.no_grad()
def embed_batches(extractor: torch.nn.Module, batches: Iterable[Any], total: int | None = None,
                  desc: str = "embedding", precision: Precision = "fp32",
                  ) -> Iterator[tuple[np.ndarray, list[str], list[int]]]:
    """Stream batches through the extractor, with a progress bar.

    Args:
        extractor: a :class:`~gen_ad.baselines.extractors.FeatureExtractor`.
        batches: tensors ``[B,3,H,W]`` in ``[-1,1]`` or dataset dict batches (``image``,
            optional ``path`` and ``label``).
        total: number of batches for the progress bar.
        precision: ``fp32`` or ``bf16`` (autocast; CUDA only, see :func:`usable_precision`).
    Yields:
        ``(features [B, D] float32, paths, labels)`` per batch (paths ``""``, labels ``-1`` when
        the batches are bare tensors).
    """
    device = _device_of(extractor)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        if isinstance(batch, dict):
            x = batch["image"]
            paths = [str(p) for p in batch.get("path", [""] * len(x))]
            labels = [int(v) for v in batch.get("label", [-1] * len(x))]
        else:
            x, paths, labels = batch, [""] * len(batch), [-1] * len(batch)
        with _autocast(device, precision):
            f = extractor(x.to(device, non_blocking=True))
        yield f.float().cpu().numpy(), paths, labels


def calibrate_bank(index: KNNIndex, k: int, reduction: Reduction = "mean",
                   calib_size: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out scores of a random subset of the bank.

    Each chosen row is scored against the bank without its own row and without the rows
    identical to it (the same vector, Euclidean distance exactly 0: a duplicated image), which
    would otherwise score it at 0. Near-duplicates stay, so the threshold can be optimistic.

    Returns:
        ``(ids [n], scores [n])``: the bank rows used and their scores against the other rows.
    """
    ids = calibration_ids(index.count, calib_size, seed)
    dist, _ = index.search(index.source.rows(ids), k, exclude=ids)
    return ids, reduce_distances(dist, reduction)


# ----------------------------------------------------------------------------- the scorer


class KNNScorer(AnomalyScorer):
    """Anomaly score = distance of an image's embedding to its ``k`` nearest normal embeddings.

    Args:
        extractor: frozen feature extractor (``forward``: ``[B,3,H,W]`` in ``[-1,1]`` -> ``[B,D]``).
        bank: a :class:`FeatureBank` (or ``[N,D]`` array) of normal features; ``None`` until
            :meth:`fit`.
        k: neighbours (default 200). reduction: ``mean`` or ``kth``.
        settings: search settings (metric, index, memory budget, backend).
        calib_size: normal vectors scored leave-one-out for the threshold.
        precision: embedding precision (``fp32``, or ``bf16`` on CUDA); a
            :class:`FeatureBank` given to :meth:`set_bank` sets it to the bank's.
    """

    name = "knn"

    def __init__(self, extractor: torch.nn.Module, bank: FeatureBank | np.ndarray | None = None,
                 k: int = 200, reduction: Reduction = "mean",
                 settings: SearchSettings | None = None, calib_size: int = 5000,
                 seed: int = 0, precision: Precision = "fp32") -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.extractor = extractor
        self.precision = usable_precision(precision, _device_of(extractor), "KNNScorer")
        self.k, self.reduction = int(k), reduction
        self.settings = settings or SearchSettings()
        self.calib_size, self.seed = int(calib_size), int(seed)
        self.index: KNNIndex | None = None
        self.threshold: Threshold | None = None
        self.threshold_source: str | None = None  # where a bank's threshold came from
        self.calib_scores: np.ndarray | None = None
        if bank is not None:
            self.set_bank(bank)

    def set_bank(self, bank: FeatureBank | np.ndarray) -> KNNScorer:
        """Use ``bank`` for search (and its saved threshold and embedding precision).

        A saved threshold calibrated on other vectors than the bank holds is re-calibrated in
        memory, with a warning (:func:`bank_threshold`).
        """
        self.index = KNNIndex(bank, self.settings, seed=self.seed)
        if isinstance(bank, FeatureBank):
            self.precision = usable_precision(bank.meta["extractor"].get("precision"),
                                              _device_of(self.extractor), f"bank {bank.root}")
            self.threshold, self.threshold_source = bank_threshold(bank, self.index)
        return self

    def fit(self, normal_batches: Iterable[Any]) -> KNNScorer:
        """Embed normal batches into an in-memory bank and calibrate the threshold."""
        feats = [f for f, _, _ in embed_batches(self.extractor, normal_batches,
                                                precision=self.precision)]
        if not feats:
            raise DataError("no normal batches to fit the KNN bank on")
        self.set_bank(np.concatenate(feats, axis=0))
        return self.calibrate()

    def calibrate(self) -> KNNScorer:
        """Leave-one-out scores of bank vectors -> ``Q3 + 1.5*IQR`` threshold."""
        if self.index is None:
            raise ConfigError("KNNScorer has no bank: call fit() or set_bank() first")
        _, self.calib_scores = calibrate_bank(self.index, self.k, self.reduction,
                                              self.calib_size, self.seed)
        self.threshold = calibrate(self.calib_scores, method="iqr")
        self.threshold_source = "leave-one-out, calibrated in memory"
        return self

    def fit_scores(self) -> np.ndarray | None:
        """The bank's leave-one-out calibration scores (``None`` before :meth:`calibrate`)."""
        return self.calib_scores

    def score_features(self, feats: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[B, D]`` features -> ``[B]`` scores."""
        if self.index is None:
            raise ConfigError("KNNScorer has no bank: call fit() or set_bank() first")
        dist, _ = self.index.search(feats, self.k)
        return reduce_distances(dist, self.reduction)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Score images ``[B,3,H,W]`` in ``[-1,1]`` -> :class:`ScoreBatch` (no maps)."""
        device = _device_of(self.extractor)
        with _autocast(device, self.precision):
            f = self.extractor(x.to(device))
        return ScoreBatch(scores=torch.from_numpy(self.score_features(f.float())).float())


# ----------------------------------------------------------------------------- bank workflows


def build_bank(extractor: torch.nn.Module, batches: Iterable[Any], out: str | os.PathLike[str],
               extractor_info: dict[str, Any], k: int = 200, reduction: Reduction = "mean",
               settings: SearchSettings | None = None, total: int | None = None,
               shard_rows: int = 65536, calib_size: int = 5000, seed: int = 0,
               precision: Precision = "fp32") -> FeatureBank:
    """Embed normal batches into a new bank at ``out`` and calibrate its threshold.

    Features are flushed to disk every ``shard_rows`` rows, so memory stays bounded. The
    precision used (``precision`` where the device has it, else fp32) is recorded in
    ``bank.json`` as ``extractor.precision``. Nothing is published before the end: an
    interrupted fit leaves no bank at ``out`` (see :mod:`gen_ad.baselines.bank`).
    """
    settings = settings or SearchSettings()
    settings.validate()
    dim = int(extractor.dim)
    stored = {"k": int(k), "reduction": reduction, "metric": settings.metric,
              "index": settings.index, "nlist": settings.nlist, "nprobe": settings.nprobe,
              "calib_size": int(calib_size), "seed": int(seed)}
    used = usable_precision(precision, _device_of(extractor), "the requested precision")
    bank = FeatureBank.create(out, dim, {**extractor_info, "precision": used}, stored,
                              staged=True)
    extend_bank(bank, extractor, batches, total=total, shard_rows=shard_rows,
                settings=settings)  # the memory budget and backend apply to calibration too
    return bank


def extend_bank(bank: FeatureBank, extractor: torch.nn.Module, batches: Iterable[Any],
                total: int | None = None, shard_rows: int = 65536,
                settings: SearchSettings | None = None) -> FeatureBank:
    """Append more normal data to ``bank`` (existing shards untouched) and re-calibrate.

    Images whose path is already in the bank are skipped (with a warning: a second copy of an
    image would be its own nearest neighbour). Embeds in the bank's recorded precision. The
    write is staged and committed at the end: until then, and if it fails or is killed, the
    bank as read (vectors and threshold) is the previous one.
    """
    dim = int(extractor.dim)
    if dim != bank.dim:
        raise ConfigError(f"extractor gives {dim}-d features but the bank holds {bank.dim}-d")
    built = int(bank.meta.get("decoder", 1))  # banks of before the decoder version: 1
    if built != DECODER_VERSION:
        raise ConfigError(f"the bank at {bank.root} was built with image decoding version "
                          f"{built}, this gen_ad decodes with version {DECODER_VERSION} (e.g. "
                          "TIFF orientation): extending it would mix features of both; fit a "
                          "new bank")
    precision = usable_precision(bank.meta["extractor"].get("precision"),
                                 _device_of(extractor), f"bank {bank.root}")
    bank.stage()
    try:
        skipped = _embed_into(bank, extractor, batches, total, shard_rows, precision)
        if bank.count == 0:
            raise DataError("no normal images were embedded; the bank is empty")
        recalibrate(bank, settings)
    except BaseException:
        bank.abort()
        raise
    if skipped:
        warnings.warn(f"skipped {skipped} images already in the bank at {bank.root}",
                      stacklevel=2)
    return bank


def _embed_into(bank: FeatureBank, extractor: torch.nn.Module, batches: Iterable[Any],
                total: int | None, shard_rows: int, precision: Precision) -> int:
    """Embed the batches whose paths are not in ``bank`` yet into shards of ``shard_rows``
    rows. Returns how many images were skipped as already in the bank."""
    known = {resolved(p) for p in bank.paths if p}
    buf: list[np.ndarray] = []
    buf_paths: list[str] = []
    skipped = 0
    for f, paths, _ in embed_batches(extractor, batches, total=total, desc="feature bank",
                                     precision=precision):
        new = np.array([not p or resolved(p) not in known for p in paths], dtype=bool)
        skipped += int((~new).sum())
        buf.append(f[new])
        buf_paths.extend(p for p, n in zip(paths, new) if n)
        known.update(resolved(p) for p, n in zip(paths, new) if n and p)
        if sum(len(b) for b in buf) >= shard_rows:
            bank.append(np.concatenate(buf), buf_paths)
            buf, buf_paths = [], []
    if buf:
        bank.append(np.concatenate(buf), buf_paths)
    return skipped


def resolved(path: str) -> str:
    """``path`` made absolute with symlinks resolved: how bank paths are compared."""
    return str(Path(path).expanduser().resolve())


def shared_indices(paths: Iterable[str], others: Iterable[str]) -> set[int]:
    """Indices of ``paths`` that name a file among ``others`` (compared :func:`resolved`)."""
    pool = {resolved(p) for p in others}
    return {i for i, p in enumerate(paths) if resolved(p) in pool}


def shared_files(paths: Iterable[str], others: Iterable[str]) -> int:
    """How many of ``paths`` name a file among ``others`` (compared :func:`resolved`)."""
    return len(shared_indices(paths, others))


def bank_settings(bank: FeatureBank, **overrides: Any) -> SearchSettings:
    """Search settings stored with ``bank``, with non-``None`` ``overrides`` applied."""
    st = bank.settings
    kw = {"metric": st.get("metric", "l2"), "index": st.get("index", "flat"),
          "nlist": st.get("nlist"), "nprobe": st.get("nprobe")}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return SearchSettings(**kw)


def recalibrate(bank: FeatureBank, settings: SearchSettings | None = None) -> Threshold:
    """Leave-one-out calibration of ``bank``, committed with it: the calibration file, the
    threshold in ``bank.json`` (with the vectors it was calibrated on), then ``threshold.json``
    (:meth:`~gen_ad.baselines.bank.FeatureBank.commit`)."""
    st = bank.settings
    settings = settings or bank_settings(bank)
    k = int(st.get("k", 200))
    if bank.count <= k:
        raise DataError(f"the bank has {bank.count} normal vectors; k={k} needs at least {k + 1} "
                        "(use more normal data or a smaller --k)")
    index = KNNIndex(bank, settings, seed=int(st.get("seed", 0)))
    ids, scores = calibrate_bank(index, k, st.get("reduction", "mean"),
                                 int(st.get("calib_size", 5000)), int(st.get("seed", 0)))
    thr = calibrate(scores, method="iqr")
    bank.commit(thr, ids, scores)
    return thr


def bank_threshold(bank: FeatureBank, index: KNNIndex) -> tuple[Threshold | None, str | None]:
    """The threshold saved with ``bank`` and where it came from (``None``, ``None`` without one).

    One calibrated on other vectors than the bank holds (an interrupted ``--extend`` of an
    earlier gen_ad, an edited bank) is re-calibrated on ``index`` in memory, with the bank's
    ``k``, reduction, calibration size and seed, and a warning; the bank folder is not written.
    """
    thr, problem = saved_threshold(bank)
    if not problem:
        return thr, None if thr is None else "saved at fit"
    warnings.warn(f"the threshold saved with the bank at {bank.root} does not belong to its "
                  f"vectors: {problem}; it is re-calibrated in memory (leave-one-out; the bank "
                  "folder is not written)", stacklevel=3)
    st = bank.settings
    _, scores = calibrate_bank(index, int(st.get("k", 200)), st.get("reduction", "mean"),
                               int(st.get("calib_size", 5000)), int(st.get("seed", 0)))
    return calibrate(scores, method="iqr"), f"re-calibrated at load: {problem}"


# ----------------------------------------------------------------------------- bank metadata


def extractor_from_info(info: dict[str, Any], device: str | torch.device = "cpu",
                        weights: str | None = None) -> torch.nn.Module:
    """Rebuild the extractor recorded in a bank's metadata (``weights`` overrides the path).

    The weights file found (``weights``, the recorded path, or the caches) must have the sha256
    recorded at fit (``weights_identity``); a bank without that record loads with a warning.

    Raises:
        ConfigError: the bank was built by an earlier definition of that extractor (another
            architecture or embedding size), whose vectors this version cannot reproduce.
        CheckpointError: the weights found now differ from those the bank was fitted with.
    """
    from gen_ad.baselines.extractors import build_extractor, check_weights_identity, get_spec

    name = info["name"]
    arch = get_spec(name).arch
    rebuild = (f"rebuild the bank with `gen-ad knn fit --extractor {name}` (its vectors cannot be "
               "compared with this version's)")
    if info.get("arch", arch) != arch:
        raise ConfigError(f"this bank was built with extractor '{name}' as {info['arch']}; this "
                          f"version of gen_ad defines '{name}' as {arch}: {rebuild}")
    ext = build_extractor(name, weights=weights or info.get("weights"),
                          random_init=bool(info.get("random_init", False)), device=device,
                          tiny=bool(info.get("tiny", False)), seed=int(info.get("seed", 0)))
    if "dim" in info and int(info["dim"]) != ext.dim:
        raise ConfigError(f"this bank holds {info['dim']}-d vectors of extractor '{name}'; this "
                          f"version of gen_ad computes {ext.dim}-d ones: {rebuild}")
    check_weights_identity(info.get("weights_identity"), ext,
                           random_init=bool(info.get("random_init", False)),
                           seed=int(info.get("seed", 0)), where=f"this bank (extractor '{name}')")
    return ext
