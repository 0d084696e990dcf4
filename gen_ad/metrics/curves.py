"""Shared pieces of the ranking metrics: input checks, tie groups, curve areas, JSON safety.

Scores are sorted once (descending); tied scores form groups, and cumulative counts at the end of
each group are the curve's points. :mod:`gen_ad.metrics.detection` (image level) and
:mod:`gen_ad.metrics.localisation` (pixel level) both build on these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gen_ad.errors import DataError


def json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by ``None`` and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A NumPy array of ``dtype`` from a tensor (any device) or array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def check_binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate ``scores`` (finite floats) and ``labels`` (0/1, both present)."""
    s = to_numpy(scores).reshape(-1)
    y_raw = to_numpy(labels).reshape(-1)
    if s.shape != y_raw.shape:
        raise DataError(f"scores and labels differ in length: {s.size} vs {y_raw.size}")
    if not np.all(np.isfinite(s)):
        raise DataError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if not np.all((y_raw == 0) | (y_raw == 1)):
        raise DataError("labels must be 0 (normal) or 1 (anomalous)")
    y = y_raw.astype(bool)
    if y.all() or not y.any():
        raise DataError(f"AUROC/AUPR need both classes; got {int(y.sum())} anomalous and "
                        f"{int((~y).sum())} normal")
    return s, y


def sorted_groups(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort descending; return (order, group end indices, label sorted)."""
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    ends = np.flatnonzero(np.diff(ss) != 0)
    ends = np.append(ends, ss.size - 1)
    return order, ends, y[order]


def curve_metrics(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP from cumulative counts at group ends.

    Args:
        tps, fps: ``[B, G]`` cumulative true/false positives at each distinct threshold.
    Returns:
        ``(auroc [B], ap [B])``; ``NaN`` where a row lacks a class.
    """
    tps = tps.astype(np.float64)
    fps = fps.astype(np.float64)
    p, n = tps[:, -1], fps[:, -1]
    tp_prev = np.concatenate([np.zeros_like(tps[:, :1]), tps[:, :-1]], axis=1)
    dfp = np.diff(fps, axis=1, prepend=0.0)
    dtp = tps - tp_prev
    with np.errstate(divide="ignore", invalid="ignore"):
        area = (dfp * (tp_prev + tps)).sum(axis=1) / 2.0
        auroc = area / (p * n)
        prec = np.where(tps + fps > 0, tps / np.maximum(tps + fps, 1.0), 0.0)
        ap = (dtp * prec).sum(axis=1) / p
    bad = (p == 0) | (n == 0)
    auroc[bad] = np.nan
    ap[bad] = np.nan
    return auroc, ap


def percentile_interval(values: np.ndarray, ci: float) -> tuple[float, float, int]:
    """Percentile interval of the finite ``values``: ``(low, high, n_finite)`` (NaN when none)."""
    ok = values[np.isfinite(values)]
    if not ok.size:
        return math.nan, math.nan, 0
    lo, hi = np.percentile(ok, [50.0 * (1.0 - ci), 100.0 - 50.0 * (1.0 - ci)])
    return float(lo), float(hi), int(ok.size)


def resample_counts(rng: np.random.Generator, strata: np.ndarray, b: int,
                    stratified: bool = True) -> np.ndarray:
    """Draw ``b`` bootstrap resamples of ``N`` items as a ``[b, N]`` int32 count matrix.

    Stratified: the items with ``strata`` True and those with False are drawn separately (in that
    order), each stratum keeping its size; an empty stratum draws nothing. Otherwise items are
    drawn from the pooled set.
    """
    n = strata.size
    if stratified:
        groups = [g for g in (np.flatnonzero(strata), np.flatnonzero(~strata)) if g.size]
        idx = np.concatenate([g[rng.integers(0, g.size, size=(b, g.size))] for g in groups],
                             axis=1)
    else:
        idx = rng.integers(0, n, size=(b, n))
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.int32)
