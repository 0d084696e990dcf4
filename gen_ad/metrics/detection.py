"""Detection metrics: AUROC, AUPR with bootstrap CIs, per-class and pixel-level metrics, Dice.

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
import torch

from gen_ad.errors import DataError
from gen_ad.scoring.thresholds import Threshold

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
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by ``None`` and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate ``scores`` (finite floats) and ``labels`` (0/1, both present)."""
    s = _to_numpy(scores).reshape(-1)
    y_raw = _to_numpy(labels).reshape(-1)
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


def _sorted_groups(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort descending; return (order, group end indices, label sorted)."""
    order = np.argsort(-s, kind="mergesort")
    ss = s[order]
    ends = np.flatnonzero(np.diff(ss) != 0)
    ends = np.append(ends, ss.size - 1)
    return order, ends, y[order]


def _curve_metrics(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``, ties included).

    Args:
        scores: ``[N]`` higher = more anomalous.
        labels: ``[N]`` 0 normal / 1 anomalous; both classes must be present.
    """
    s, y = _check_binary(scores, labels)
    return float(_point(s, y)[0])


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, the AUPR (equals ``sklearn.metrics.average_precision_score``)."""
    s, y = _check_binary(scores, labels)
    return float(_point(s, y)[1])


def _point(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    order, ends, ys = _sorted_groups(s, y)
    tps = np.cumsum(ys, dtype=np.int64)[ends][None]
    fps = np.cumsum(~ys, dtype=np.int64)[ends][None]
    a, ap = _curve_metrics(tps, fps)
    return float(a[0]), float(ap[0])


def _resample_counts(rng: np.random.Generator, ys: np.ndarray, b: int,
                     stratified: bool) -> np.ndarray:
    """Draw ``b`` bootstrap resamples as a ``[b, N]`` count matrix over the sorted items."""
    n = ys.size
    if stratified:
        pos, neg = np.flatnonzero(ys), np.flatnonzero(~ys)
        idx = np.concatenate([pos[rng.integers(0, pos.size, size=(b, pos.size))],
                              neg[rng.integers(0, neg.size, size=(b, neg.size))]], axis=1)
    else:
        idx = rng.integers(0, n, size=(b, n))
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.int32)


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
    s, y = _check_binary(scores, labels)
    a0, ap0 = _point(s, y)
    if n_boot <= 0:
        return {"auroc": MetricCI(a0), "aupr": MetricCI(ap0)}
    order, ends, ys = _sorted_groups(s, y)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMS // max(s.size, 1)))
    aurocs, aps = [], []
    for start in range(0, n_boot, chunk):
        counts = _resample_counts(rng, ys, min(chunk, n_boot - start), stratified)
        tps = np.cumsum(counts * ys, axis=1, dtype=np.int32)[:, ends]
        fps = np.cumsum(counts, axis=1, dtype=np.int32)[:, ends] - tps
        a, ap = _curve_metrics(tps, fps)
        aurocs.append(a)
        aps.append(ap)
    q = [50.0 * (1.0 - ci), 100.0 - 50.0 * (1.0 - ci)]
    out = {}
    for name, val, arr in (("auroc", a0, np.concatenate(aurocs)), ("aupr", ap0,
                                                                    np.concatenate(aps))):
        ok = arr[np.isfinite(arr)]
        lo, hi = np.percentile(ok, q) if ok.size else (math.nan, math.nan)
        out[name] = MetricCI(val, float(lo), float(hi), n_boot=n_boot, n_valid=int(ok.size))
    return out


def per_class_auroc(scores: Any, labels: Any, classes: Sequence[Any], n_boot: int = 2000,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """AUROC/AUPR of each anomaly class against all normals.

    Args:
        scores: ``[N]`` scores.
        labels: ``[N]`` 0/1.
        classes: ``[N]`` class names; only those of anomalous items (label 1) are used.
        n_boot, seed: bootstrap settings (stratified).
    Returns:
        ``{class: {"n": count, "auroc": {...}, "aupr": {...}}}`` in sorted class order.
    """
    s, y = _check_binary(scores, labels)
    cls = np.asarray([str(c) for c in classes])
    if cls.size != s.size:
        raise DataError(f"classes and scores differ in length: {cls.size} vs {s.size}")
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(cls[y].tolist())):
        keep = ~y | (cls == c)
        m = bootstrap_metrics(s[keep], y[keep], n_boot=n_boot, seed=seed)
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
    s = _to_numpy(scores).reshape(-1)
    y = _to_numpy(labels).reshape(-1).astype(bool)
    pred = s > t
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    sens, spec, prec = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return _json_safe({
        "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens,
        "specificity": spec, "precision": prec, "f1": f1,
        "balanced_accuracy": (sens + spec) / 2.0, "accuracy": ratio(tp + tn, s.size)})


def dice(pred: Any, target: Any) -> float:
    """Pooled Dice ``2|A∩B| / (|A|+|B|)`` of two equal-shape boolean masks (1 if both empty)."""
    p = _to_numpy(pred, bool)
    t = _to_numpy(target, bool)
    if p.shape != t.shape:
        raise DataError(f"mask shapes differ: {p.shape} vs {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def pixel_metrics(maps: Any, masks: Any, map_threshold: float | None = None) -> dict[str, Any]:
    """Pixel-level AUROC, AUPR and Dice over all pixels of all images, pooled.

    Best Dice ("DICE at the best threshold", as commonly reported) scans every distinct map value
    ``v`` with prediction ``map >= v`` on the pooled pixels and keeps the maximum; it uses the
    labels, so it is an upper bound, not a deployable operating point. With ``map_threshold`` the
    pooled Dice of ``map > map_threshold`` is reported too.

    Args:
        maps: ``[B,H,W]`` anomaly maps (>= 0).
        masks: ``[B,H,W]`` ground-truth masks (bool or 0/1).
        map_threshold: optional fixed threshold on map values.
    Returns:
        dict ``auroc, aupr, best_dice, best_dice_threshold, n_pixels, n_anomalous_pixels`` and
        ``dice`` when ``map_threshold`` is given (``None`` entries where undefined).
    """
    m = _to_numpy(maps)
    g = _to_numpy(masks)
    if m.shape != g.shape or m.ndim != 3:
        raise DataError(f"maps and masks must both be [B,H,W] of equal shape, got {m.shape} "
                        f"and {g.shape}")
    s, y = m.reshape(-1), g.reshape(-1) > 0.5
    out: dict[str, Any] = {"n_pixels": int(s.size), "n_anomalous_pixels": int(y.sum())}
    if y.any() and not y.all():
        s, y = _check_binary(s, y)
        order, ends, ys = _sorted_groups(s, y)
        tps = np.cumsum(ys, dtype=np.int64)[ends]
        fps = np.cumsum(~ys, dtype=np.int64)[ends]
        a, ap = _curve_metrics(tps[None], fps[None])
        d = 2.0 * tps / (tps + fps + tps[-1])
        best = int(np.argmax(d))
        out.update(auroc=float(a[0]), aupr=float(ap[0]), best_dice=float(d[best]),
                   best_dice_threshold=float(s[order][ends[best]]))
    else:
        out.update(auroc=None, aupr=None, best_dice=None, best_dice_threshold=None)
    if map_threshold is not None:
        out["dice"] = dice(m > float(map_threshold), g > 0.5)
        out["map_threshold"] = float(map_threshold)
    return _json_safe(out)


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
        maps, masks: optional ``[N,H,W]`` anomaly maps and ground-truth masks (pixel metrics).
        map_threshold: optional threshold on map values for a fixed-threshold Dice.
        n_boot, seed, ci: stratified percentile bootstrap settings.
    Returns:
        ``{"n", "n_normal", "n_anomalous", "auroc", "aupr", "bootstrap"}`` plus ``per_class``,
        ``at_threshold`` and ``pixel`` when the corresponding inputs are given.
    """
    s, y = _check_binary(scores, labels)
    m = bootstrap_metrics(s, y, n_boot=n_boot, seed=seed, ci=ci)
    out: dict[str, Any] = {
        "n": int(s.size), "n_normal": int((~y).sum()), "n_anomalous": int(y.sum()),
        "auroc": m["auroc"].to_dict(), "aupr": m["aupr"].to_dict(),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "stratified": True,
                      "interval": "percentile"},
    }
    if classes is not None:
        out["per_class"] = per_class_auroc(s, y, classes, n_boot=n_boot, seed=seed)
    if threshold is not None:
        out["at_threshold"] = threshold_metrics(s, y, threshold)
    if (maps is None) != (masks is None):
        raise DataError("pixel metrics need both maps and masks")
    if maps is not None:
        out["pixel"] = pixel_metrics(maps, masks, map_threshold=map_threshold)
    return _json_safe(out)
