"""Image-level detection metrics: AUROC, AUPR with bootstrap CIs, per-class, at a threshold.

The pixel-level metrics (pooled AUROC/AUPR, AUPRO, Dice) live in
:mod:`gen_ad.metrics.localisation` and are re-exported here; :func:`evaluate_scores` gathers both.

All metrics come from one computation: the scores are sorted once (descending), tied scores form
groups, and the cumulative true/false positive counts at the end of each group give the ROC and
precision-recall curves. AUROC is the trapezoidal area under the ROC curve and AUPR is the average
precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, exactly as scikit-learn's
``roc_auc_score`` and ``average_precision_score`` define them (ties included).

Bootstrap: a resample is represented by how often each item is drawn (a count matrix
``[n_boot, N]`` in the sorted order), so all resamples are scored at once with cumulative sums —
no re-sorting, no Python loop per resample. Resampling is *stratified* by default: normals and
anomalies are drawn separately, keeping both class sizes fixed, so no resample has a single class.
With ``stratified=False`` items are drawn from the pooled set and single-class resamples are
dropped (their number is reported as ``n_boot - n_valid``). The CI is the percentile interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gen_ad.errors import DataError
from gen_ad.metrics.curves import (
    check_binary,
    curve_metrics,
    json_safe,
    percentile_interval,
    resample_counts,
    sorted_groups,
    to_numpy,
)
from gen_ad.metrics.localisation import dice, pixel_metrics
from gen_ad.scoring.thresholds import Threshold

__all__ = ["MetricCI", "auroc", "average_precision", "bootstrap_metrics", "dice",
           "evaluate_scores", "per_class_auroc", "pixel_metrics", "threshold_metrics"]

_CHUNK_ELEMS = 4_000_000  # bootstrap works on [chunk, N] count matrices of at most this many cells


@dataclass
class MetricCI:
    """A metric with its bootstrap percentile confidence interval.

    Attributes:
        value: the point estimate on the full data.
        low: lower CI bound (``NaN`` when no bootstrap was run).
        high: upper CI bound.
        n_boot: resamples drawn.
        n_valid: resamples that had both classes (all of them when stratified).
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    n_boot: int = 0
    n_valid: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become ``None``)."""
        return json_safe(asdict(self))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``, ties included).

    Args:
        scores: ``[N]`` higher = more anomalous.
        labels: ``[N]`` 0 normal / 1 anomalous; both classes must be present.
    """
    s, y = check_binary(scores, labels)
    return float(_point(s, y)[0])


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, the AUPR (equals ``sklearn.metrics.average_precision_score``)."""
    s, y = check_binary(scores, labels)
    return float(_point(s, y)[1])


def _point(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    order, ends, ys = sorted_groups(s, y)
    tps = np.cumsum(ys, dtype=np.int64)[ends][None]
    fps = np.cumsum(~ys, dtype=np.int64)[ends][None]
    a, ap = curve_metrics(tps, fps)
    return float(a[0]), float(ap[0])


def bootstrap_metrics(scores: Any, labels: Any, n_boot: int = 2000, seed: int = 0,
                      ci: float = 0.95, stratified: bool = True) -> dict[str, MetricCI]:
    """AUROC and AUPR with percentile bootstrap confidence intervals.

    Args:
        scores: ``[N]`` higher = more anomalous.
        labels: ``[N]`` 0/1, both classes present.
        n_boot: number of resamples (0 = point estimates only).
        seed: seed of the resampling generator (same seed, same CI).
        ci: coverage of the interval (0.95 gives the 2.5 and 97.5 percentiles).
        stratified: resample normals and anomalies separately (class sizes fixed).
    Returns:
        ``{"auroc": MetricCI, "aupr": MetricCI}``.
    """
    s, y = check_binary(scores, labels)
    a0, ap0 = _point(s, y)
    if n_boot <= 0:
        return {"auroc": MetricCI(a0), "aupr": MetricCI(ap0)}
    order, ends, ys = sorted_groups(s, y)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMS // max(s.size, 1)))
    aurocs, aps = [], []
    for start in range(0, n_boot, chunk):
        counts = resample_counts(rng, ys, min(chunk, n_boot - start), stratified)
        tps = np.cumsum(counts * ys, axis=1, dtype=np.int32)[:, ends]
        fps = np.cumsum(counts, axis=1, dtype=np.int32)[:, ends] - tps
        a, ap = curve_metrics(tps, fps)
        aurocs.append(a)
        aps.append(ap)
    out = {}
    for name, val, arr in (("auroc", a0, np.concatenate(aurocs)),
                           ("aupr", ap0, np.concatenate(aps))):
        lo, hi, n_valid = percentile_interval(arr, ci)
        out[name] = MetricCI(val, lo, hi, n_boot=n_boot, n_valid=n_valid)
    return out


def per_class_auroc(scores: Any, labels: Any, classes: Sequence[Any], n_boot: int = 2000,
                    seed: int = 0, ci: float = 0.95) -> dict[str, dict[str, Any]]:
    """AUROC/AUPR of each anomaly class against all normals.

    Args:
        scores: ``[N]`` scores.
        labels: ``[N]`` 0/1.
        classes: ``[N]`` class names; only those of anomalous items (label 1) are used.
        n_boot, seed, ci: bootstrap settings (stratified).
    Returns:
        ``{class: {"n": count, "auroc": {...}, "aupr": {...}}}`` in sorted class order.
    """
    s, y = check_binary(scores, labels)
    cls = np.asarray([str(c) for c in classes])
    if cls.size != s.size:
        raise DataError(f"classes and scores differ in length: {cls.size} vs {s.size}")
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(cls[y].tolist())):
        keep = ~y | (cls == c)
        m = bootstrap_metrics(s[keep], y[keep], n_boot=n_boot, seed=seed, ci=ci)
        out[c] = {"n": int((y & (cls == c)).sum()), "auroc": m["auroc"].to_dict(),
                  "aupr": m["aupr"].to_dict()}
    return out


def threshold_metrics(scores: Any, labels: Any, threshold: float | Threshold) -> dict[str, Any]:
    """Confusion counts and rates at a fixed (label-free, saved) threshold.

    A score ``> threshold`` is called anomalous. Undefined rates (e.g. precision with no
    positive calls) are ``None``.

    Returns:
        dict with ``threshold, tp, fp, tn, fn, sensitivity, specificity, precision, f1,
        balanced_accuracy, accuracy``.
    """
    t = threshold.value if isinstance(threshold, Threshold) else float(threshold)
    s = to_numpy(scores).reshape(-1)
    y_raw = to_numpy(labels).reshape(-1)
    if s.shape != y_raw.shape:
        raise DataError(f"scores and labels differ in length: {s.size} vs {y_raw.size}")
    if not np.all(np.isfinite(s)):  # a NaN would count as "not flagged"
        raise DataError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if not np.all((y_raw == 0) | (y_raw == 1)):
        raise DataError("labels must be 0 (normal) or 1 (anomalous)")
    y = y_raw.astype(bool)
    pred = s > t
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    sens, spec, prec = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return json_safe({
        "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens,
        "specificity": spec, "precision": prec, "f1": f1,
        "balanced_accuracy": (sens + spec) / 2.0, "accuracy": ratio(tp + tn, s.size)})


def evaluate_scores(scores: Any, labels: Any, classes: Sequence[Any] | None = None,
                    threshold: float | Threshold | None = None, maps: Any = None,
                    masks: Any = None, map_threshold: float | None = None, n_boot: int = 2000,
                    seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """All detection metrics of one method on one test set, as a JSON-ready dict.

    Args:
        scores: ``[N]`` image scores, higher = more anomalous.
        labels: ``[N]`` 0 normal / 1 anomalous.
        classes: optional ``[N]`` anomaly sub-class names (per-class AUROC vs all normals).
        threshold: optional saved label-free threshold (value or :class:`Threshold`).
        maps, masks: optional ``[N,H,W]`` anomaly maps and ground-truth masks (pixel metrics,
            AUPRO included; their CIs resample images: :mod:`gen_ad.metrics.localisation`).
        map_threshold: optional threshold on map values for a fixed-threshold Dice.
        n_boot, seed, ci: stratified percentile bootstrap settings.
    Returns:
        ``{"n", "n_normal", "n_anomalous", "auroc", "aupr", "bootstrap"}`` plus ``per_class``,
        ``at_threshold`` and ``pixel`` when the corresponding inputs are given.
    """
    s, y = check_binary(scores, labels)
    m = bootstrap_metrics(s, y, n_boot=n_boot, seed=seed, ci=ci)
    out: dict[str, Any] = {
        "n": int(s.size), "n_normal": int((~y).sum()), "n_anomalous": int(y.sum()),
        "auroc": m["auroc"].to_dict(), "aupr": m["aupr"].to_dict(),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "stratified": True,
                      "interval": "percentile"},
    }
    if classes is not None:
        out["per_class"] = per_class_auroc(s, y, classes, n_boot=n_boot, seed=seed, ci=ci)
    if threshold is not None:
        out["at_threshold"] = threshold_metrics(s, y, threshold)
    if (maps is None) != (masks is None):
        raise DataError("pixel metrics need both maps and masks")
    if maps is not None:
        out["pixel"] = pixel_metrics(maps, masks, map_threshold=map_threshold,
                                     n_boot=n_boot, seed=seed, ci=ci)
    return json_safe(out)
