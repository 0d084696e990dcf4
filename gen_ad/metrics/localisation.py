"""Pixel-level (localisation) metrics: pooled pixel AUROC/AUPR, best Dice, AUPRO, image-level CIs.

Pooled pixel AUROC/AUPR treat every pixel of every image as one item, so large anomalous areas
dominate them. **AUPRO** weighs every anomalous *region* equally (Bergmann et al., "The MVTec
anomaly detection dataset", IJCV 129, 2021; the MVTec AD evaluation code): at a threshold ``t``,
the per-region overlap ``PRO(t)`` is the mean, over all connected ground-truth regions
(8-connected components of each image's mask), of the fraction of the region's pixels with
``map >= t``; it is plotted against the false-positive rate of the normal pixels (every pixel
outside the masks, in every image) and integrated from FPR 0 up to ``fpr_limit`` (0.3 by
default, linear interpolation at the limit), divided by ``fpr_limit``: 1 is perfect, a map
unrelated to the masks gives about ``fpr_limit / 2``. In pathology terms: a missed
micro-metastasis costs as much as a missed large tumour area.

Exactly: a region pixel carries the weight ``1 / (|region| x number of regions)``, so ``PRO(t)``
is the cumulative weight of the region pixels at or above ``t`` — the same sorted pass over the
pooled pixels as the ROC curve, every distinct map value a point.

Confidence intervals resample *images*, not pixels (pixels of one image are not independent),
stratified into images with and without anomalous pixels. Each resample is scored on a grid of at
most ``grid`` thresholds (quantiles of the normal and of the anomalous pixel values; every
distinct value when there are fewer) through per-image cumulative counts, one matrix product per
resample chunk. Point estimates always use every distinct value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from gen_ad.errors import DataError
from gen_ad.metrics.curves import (
    check_binary,
    curve_metrics,
    json_safe,
    percentile_interval,
    resample_counts,
    sorted_groups,
)
from gen_ad.metrics.curves import to_numpy as _np

FPR_LIMIT = 0.3  # the MVTec AD integration limit
_GRID = 1024  # at most this many thresholds for the bootstrap curves
_GRID_CELLS = 20_000_000  # per-image count matrices [images, grid] of at most this many cells
_BOOT_CHUNK = 256  # resamples scored per matrix product


def dice(pred: Any, target: Any) -> float:
    """Pooled Dice ``2|A∩B| / (|A|+|B|)`` of two equal-shape boolean masks (1 if both empty)."""
    p = _np(pred, bool)
    t = _np(target, bool)
    if p.shape != t.shape:
        raise DataError(f"mask shapes differ: {p.shape} vs {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel region weights ``1 / |region|`` and the number of regions of each image.

    Args:
        masks: ``[B,H,W]`` boolean ground truth.
    Returns:
        ``(weights [B,H,W] float64`` (0 outside the masks), ``regions [B] int64)``; regions are
        8-connected components within one image (never across images).
    """
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = 1  # 8-connectivity inside each image, none along the batch axis
    labels, n = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    inv = np.zeros_like(sizes)
    inv[1:] = 1.0 / np.maximum(sizes[1:], 1.0)
    image_of = np.zeros(n + 1, dtype=np.int64)  # the image each region lies in
    image_of[labels.reshape(masks.shape[0], -1)] = np.arange(masks.shape[0])[:, None]
    regions = np.bincount(image_of[1:], minlength=masks.shape[0])
    return inv[labels], regions.astype(np.int64)


def pro_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> np.ndarray:
    """Normalised area under PRO(FPR) from 0 to ``limit`` (trapezoids, interpolated at the limit).

    Args:
        fpr, pro: ``[R, G]`` curve points in order of falling threshold (``fpr`` non-decreasing,
            ending at 1); a ``(0, 0)`` start is prepended here.
        limit: integration limit in ``(0, 1]``.
    Returns:
        ``[R]`` areas divided by ``limit`` (NaN where a row is not finite).
    """
    x = np.concatenate([np.zeros_like(fpr[:, :1]), fpr], axis=1)
    y = np.concatenate([np.zeros_like(pro[:, :1]), pro], axis=1)
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    x1c = np.minimum(x1, limit)
    width = np.clip(x1c - x0, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(x1 > x0, (x1c - x0) / (x1 - x0), 0.0)
    y1c = y0 + (y1 - y0) * frac
    return (width * (y0 + y1c) / 2.0).sum(axis=1) / limit


def _pooled(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _np(maps)
    g = _np(masks) > 0.5
    if m.shape != g.shape or m.ndim != 3:
        raise DataError(f"maps and masks must both be [B,H,W] of equal shape, got {m.shape} "
                        f"and {g.shape}")
    if not np.all(np.isfinite(m)):
        raise DataError(f"{int((~np.isfinite(m)).sum())} map values are NaN or infinite")
    return m, g


def exact_aupro(w_sorted: np.ndarray, ends: np.ndarray, fps: np.ndarray, n_regions: float,
                limit: float) -> float:
    """AUPRO on every distinct value: region weights in descending-score order ``w_sorted``,
    tie-group ends ``ends`` and the cumulative false positives there ``fps``."""
    pro = np.cumsum(w_sorted)[ends] / n_regions
    return float(pro_area((fps / fps[-1])[None], pro[None], limit)[0])


def _exact(m: np.ndarray, g: np.ndarray, w: np.ndarray, n_regions: int,
           limit: float) -> dict[str, Any]:
    """Point estimates on every distinct map value."""
    s, y = m.reshape(-1), g.reshape(-1)
    order, ends, ys = sorted_groups(s, y)
    tps = np.cumsum(ys, dtype=np.int64)[ends]
    fps = np.cumsum(~ys, dtype=np.int64)[ends]
    a, ap = curve_metrics(tps[None], fps[None])
    d = 2.0 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(d))
    return {"auroc": float(a[0]), "aupr": float(ap[0]),
            "aupro": exact_aupro(w.reshape(-1)[order], ends, fps, n_regions, limit),
            "best_dice": float(d[best]), "best_dice_threshold": float(s[order][ends[best]])}


def threshold_grid(s: np.ndarray, y: np.ndarray, size: int = _GRID) -> np.ndarray:
    """At most ``size`` thresholds, descending: every distinct value, or class-wise quantiles."""
    distinct = np.unique(s)
    if distinct.size <= size:
        return distinct[::-1]
    q = np.linspace(0.0, 1.0, size // 2)
    return np.unique(np.concatenate([np.quantile(s[~y], q), np.quantile(s[y], q)]))[::-1]


def cluster_counts(s: np.ndarray, y: np.ndarray, w: np.ndarray, clusters: np.ndarray,
                   n_clusters: int, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per cluster (image, slide) and grid threshold: positives, negatives and weight at or above.

    Args:
        s, y, w: ``[P]`` values, labels (bool) and weights (e.g. ``1/|region|``).
        clusters: ``[P]`` cluster index of each item in ``[0, n_clusters)``.
        n_clusters: number of clusters.
        grid: ``[G]`` descending thresholds whose last value is the smallest value.
    Returns:
        ``(tp [C,G], fp [C,G], weight [C,G])`` float64, cumulative along the grid.
    """
    k = grid.size
    idx = np.searchsorted(grid[::-1], s, side="right") - 1  # largest threshold <= value
    flat = (k - 1 - idx) + k * clusters  # position in descending order, per cluster

    def cum(weights: np.ndarray) -> np.ndarray:
        hist = np.bincount(flat, weights=weights, minlength=n_clusters * k)
        return np.cumsum(hist.reshape(n_clusters, k), axis=1)

    return cum(y.astype(np.float64)), cum((~y).astype(np.float64)), cum(w)


def _resampled(counts: tuple[np.ndarray, ...], regions: np.ndarray, n_boot: int, seed: int,
               limit: float | None) -> dict[str, np.ndarray]:
    """AUROC, AUPR (and AUPRO with ``limit``) of ``n_boot`` stratified cluster resamples."""
    tp, fp, ov = counts
    rng = np.random.default_rng(seed)
    vals: dict[str, list[np.ndarray]] = {"auroc": [], "aupr": [], "aupro": []}
    for start in range(0, n_boot, _BOOT_CHUNK):
        c = resample_counts(rng, tp[:, -1] > 0, min(_BOOT_CHUNK, n_boot - start))
        tps, fps = c @ tp, c @ fp
        a, ap = curve_metrics(tps, fps)
        vals["auroc"].append(a)
        vals["aupr"].append(ap)
        if limit is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                pro = (c @ ov) / (c @ regions.astype(np.float64))[:, None]
                vals["aupro"].append(pro_area(fps / fps[:, -1:], pro, limit))
    return {k: np.concatenate(v) for k, v in vals.items() if v}


def _grid_for(s: np.ndarray, y: np.ndarray, n_clusters: int) -> np.ndarray:
    return threshold_grid(s, y, int(min(_GRID, max(64, _GRID_CELLS // max(n_clusters, 1)))))


def _bootstrap(m: np.ndarray, g: np.ndarray, w: np.ndarray, regions: np.ndarray, n_boot: int,
               seed: int, ci: float, limit: float) -> dict[str, Any]:
    """Image-level stratified bootstrap CIs of pixel AUROC, AUPR and AUPRO."""
    b = m.shape[0]
    s, y = m.reshape(-1), g.reshape(-1)
    grid = _grid_for(s, y, b)
    images = np.repeat(np.arange(b), s.size // b)
    draws = _resampled(cluster_counts(s, y, w.reshape(-1), images, b, grid), regions, n_boot,
                       seed, limit)
    out: dict[str, Any] = {}
    for name, values in draws.items():
        lo, hi, n_valid = percentile_interval(values, ci)
        out[name] = [lo, hi]
        out["n_valid"] = min(out.get("n_valid", n_valid), n_valid)
    out.update(n_boot=n_boot, seed=seed, ci=ci, thresholds=int(grid.size),
               resampled="images, stratified (with / without anomalous pixels)")
    return out


def clustered_metrics(scores: Any, labels: Any, clusters: Sequence[Any], n_boot: int = 2000,
                      seed: int = 0, ci: float = 0.95, weights: Any = None,
                      fpr_limit: float = FPR_LIMIT) -> dict[str, Any]:
    """AUROC and AUPR (and AUPRO) of items that come in clusters (tiles of slides), with
    cluster-level CIs.

    Tiles of one slide are not independent, so the interval resamples whole clusters (stratified
    into clusters with and without positives); the point estimates are exact (as scikit-learn).

    Args:
        scores: ``[N]`` scores, higher = more anomalous.
        labels: ``[N]`` 0/1, both present.
        clusters: ``[N]`` cluster id of each item (e.g. its slide).
        n_boot, seed, ci: bootstrap settings (``n_boot = 0``: point estimates only).
        weights: optional ``[N]`` region weights ``1/|region|`` of the positives (0 for the
            negatives; see :func:`region_weights`): adds AUPRO, every region weighing the same.
        fpr_limit: AUPRO integration limit.
    Returns:
        ``{"auroc": {value, low, high, n_boot, n_valid}, "aupr": {...}, ["aupro": {...},
        "n_regions", "aupro_fpr_limit"], "n", "n_clusters", "resampled", "thresholds"}``.
    """
    s, y = check_binary(scores, labels)
    names, ids = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    w = np.zeros_like(s) if weights is None else _np(weights).reshape(-1)
    if ids.size != s.size or w.size != s.size:
        raise DataError(f"clusters, weights and scores differ in length: {ids.size}, {w.size} "
                        f"and {s.size}")
    order, ends, ys = sorted_groups(s, y)
    tps, fps = np.cumsum(ys)[ends], np.cumsum(~ys)[ends]
    a, ap = curve_metrics(tps[None], fps[None])
    points = {"auroc": float(a[0]), "aupr": float(ap[0])}
    out: dict[str, Any] = {"n": int(s.size), "n_clusters": int(names.size),
                           "resampled": "clusters, stratified (with / without positives)"}
    regions = np.bincount(ids, weights=w, minlength=names.size)  # each region's weights sum to 1
    limit = fpr_limit if weights is not None else None
    if limit is not None:
        points["aupro"] = exact_aupro(w[order], ends, fps, regions.sum(), limit)
        out.update(n_regions=int(round(regions.sum())), aupro_fpr_limit=limit)
    draws: dict[str, np.ndarray] = {}
    if n_boot > 0:
        grid = _grid_for(s, y, names.size)
        counts = cluster_counts(s, y, w, ids, names.size, grid)
        draws = _resampled(counts, regions, n_boot, seed, limit)
        out["thresholds"] = int(grid.size)
    for name, value in points.items():
        lo, hi, n_valid = percentile_interval(draws[name], ci) if draws else (None, None, 0)
        out[name] = {"value": value, "low": lo, "high": hi, "n_boot": n_boot, "n_valid": n_valid}
    return json_safe(out)


def pixel_metrics(maps: Any, masks: Any, map_threshold: float | None = None,
                  fpr_limit: float = FPR_LIMIT, n_boot: int = 0, seed: int = 0,
                  ci: float = 0.95) -> dict[str, Any]:
    """Pixel-level AUROC, AUPR, AUPRO and Dice over all pixels of all images.

    Best Dice ("DICE at the best threshold", as commonly reported) scans every distinct map value
    ``v`` with prediction ``map >= v`` on the pooled pixels and keeps the maximum; it uses the
    labels, so it is an upper bound, not a deployable operating point. With ``map_threshold`` the
    pooled Dice of ``map > map_threshold`` is reported too.

    Args:
        maps: ``[B,H,W]`` anomaly maps (finite).
        masks: ``[B,H,W]`` ground-truth masks (bool or 0/1).
        map_threshold: optional fixed threshold on map values.
        fpr_limit: AUPRO integration limit in ``(0, 1]``.
        n_boot, seed, ci: image-level bootstrap (``n_boot = 0``: point estimates only).
    Returns:
        dict ``auroc, aupr, aupro, aupro_fpr_limit, best_dice, best_dice_threshold, n_pixels,
        n_anomalous_pixels, n_regions``, ``ci`` (``{auroc, aupr, aupro: [low, high], ...}``)
        when ``n_boot > 0``, and ``dice`` when ``map_threshold`` is given (``None`` entries
        where undefined, e.g. without anomalous pixels).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, g = _pooled(maps, masks)
    w, regions = region_weights(g)
    out: dict[str, Any] = {"n_pixels": int(g.size), "n_anomalous_pixels": int(g.sum()),
                           "n_regions": int(regions.sum()), "aupro_fpr_limit": fpr_limit}
    if g.any() and not g.all():
        out.update(_exact(m, g, w, int(regions.sum()), fpr_limit))
        if n_boot > 0:
            out["ci"] = _bootstrap(m, g, w, regions, n_boot, seed, ci, fpr_limit)
    else:
        out.update(auroc=None, aupr=None, aupro=None, best_dice=None, best_dice_threshold=None)
    if map_threshold is not None:
        out["dice"] = dice(m > float(map_threshold), g)
        out["map_threshold"] = float(map_threshold)
    return json_safe(out)
