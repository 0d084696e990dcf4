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
resample chunk.

**Large sets.** Up to :data:`EXACT_PIXELS` pooled pixels the point estimates use every distinct
map value (one sort of all pixels, about 120 bytes of memory per pixel). A larger set (e.g.
100,000 maps of 64 px: 410 million pixels) is streamed in chunks of images, never pooled: pass 1
counts pixels and region weights per class in a histogram whose bins are the float32 values
sharing their sign, exponent and top 12 mantissa bits (relative bin width ``2**-12``, one bin for
every value in a bin of width 2.4e-4 x the value, whatever the range), and the point estimates
are computed from it, values in one bin counted as tied; ``approximation.auroc_max_error`` bounds
the pixel AUROC's difference from the exact one (half the fraction of normal/anomalous pixel
pairs that share a bin). Pass 2 fills the per-image bootstrap counts on a grid of bin edges.
Pass 0 finds the range of the values, so the histograms hold only the occupied bins (about 4096
per factor of 2 between the smallest and the largest value; 48 MB at most). Memory: one chunk of
images, the histograms and the ``[images, grid]`` counts (float32, at most :data:`_STREAM_CELLS`
cells each).
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
_BOOT_CHUNK = 256  # resamples scored per matrix product (fewer for many clusters)
_BOOT_CELLS = 4_000_000  # ... so that one chunk's count matrix [chunk, clusters] stays this small
EXACT_PIXELS = 2**23  # larger sets are streamed (histogram point estimates), never pooled
_KEY_SHIFT = 11  # streaming bins: float32 values equal in their top 32 - 11 bits share a bin
_STREAM_CELLS = 8_000_000  # [images, grid] float32 count matrices of the streamed bootstrap
_STREAM_PIXELS = 2**20  # pixels per streamed chunk


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
    chunk = max(1, min(_BOOT_CHUNK, _BOOT_CELLS // max(tp.shape[0], 1)))
    for start in range(0, n_boot, chunk):
        c = resample_counts(rng, tp[:, -1] > 0, min(chunk, n_boot - start)).astype(tp.dtype)
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
                  ci: float = 0.95, exact: bool | None = None) -> dict[str, Any]:
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
        exact: every distinct value a point (pools all pixels), or streamed in chunks of images
            with histogram point estimates (see the module text); default: exact up to
            :data:`EXACT_PIXELS` pixels. ``maps``/``masks`` may be arrays, tensors or
            :class:`~gen_ad.scoring.store.MapStore` objects (read chunk by chunk when streamed).
    Returns:
        dict ``auroc, aupr, aupro, aupro_fpr_limit, best_dice, best_dice_threshold, n_pixels,
        n_anomalous_pixels, n_regions``, ``ci`` (``{auroc, aupr, aupro: [low, high], ...}``)
        when ``n_boot > 0``, and ``dice`` when ``map_threshold`` is given (``None`` entries
        where undefined, e.g. without anomalous pixels); streamed: ``approximation`` too.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if exact is None:
        exact = _n_pixels(maps, masks) <= EXACT_PIXELS
    if not exact:
        return json_safe(_streamed(_Pairs(maps, masks), map_threshold, fpr_limit, n_boot,
                                   seed, ci))
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


# ----------------------------------------------------------------------------- large sets


def _n_pixels(maps: Any, masks: Any) -> int:
    shape = tuple(getattr(maps, "shape", np.shape(maps)))
    return int(np.prod(shape)) if shape else 0


class _Pairs:
    """Maps and masks read together in chunks of whole images (arrays, tensors or stores)."""

    def __init__(self, maps: Any, masks: Any) -> None:
        self.maps, self.masks = maps, masks
        ms, gs = tuple(getattr(maps, "shape", ())), tuple(getattr(masks, "shape", ()))
        if ms != gs or len(ms) != 3:
            raise DataError(f"maps and masks must both be [B,H,W] of equal shape, got {ms} "
                            f"and {gs}")
        self.n, self.hw = int(ms[0]), int(ms[1]) * int(ms[2])

    @staticmethod
    def _read(x: Any, start: int, stop: int) -> Any:
        return x.read(start, stop) if hasattr(x, "read") else x[start:stop]

    def chunks(self) -> Any:
        """``(start, maps [C,H,W] float32, masks [C,H,W] bool)`` in order; finite maps checked."""
        step = max(1, _STREAM_PIXELS // max(self.hw, 1))
        for start in range(0, self.n, step):
            m = _np(self._read(self.maps, start, start + step), np.float32)
            if not np.all(np.isfinite(m)):
                raise DataError(f"{int((~np.isfinite(m)).sum())} map values are NaN or infinite "
                                f"(images {start}..{start + len(m) - 1})")
            g = _np(self._read(self.masks, start, start + step), np.float32) > 0.5
            yield start, m, g


def value_keys(m: np.ndarray) -> np.ndarray:
    """Order-preserving bin of each float32 value, in ``[0, 2**(32 - _KEY_SHIFT))``: the values
    sharing sign, exponent and the top mantissa bits share a bin (relative width ``2**-12``)."""
    f = np.ascontiguousarray(m, dtype=np.float32) + np.float32(0.0)  # -0.0 joins 0.0
    bits = f.view(np.int32).astype(np.int64)
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, lower
    return (bits + 2**31) >> _KEY_SHIFT


def key_edges(keys: np.ndarray) -> np.ndarray:
    """The smallest float32 value of each bin of :func:`value_keys` (as float64)."""
    bits = (np.asarray(keys, np.int64) << _KEY_SHIFT) - 2**31
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits).astype(np.int32)
    return bits.view(np.float32).astype(np.float64)


def _key_range(pairs: _Pairs) -> tuple[int, int]:
    """Pass 0: the lowest and highest bin of the map values (and every value checked finite)."""
    lo, hi = np.inf, -np.inf
    for _, m, _ in pairs.chunks():
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    k = value_keys(np.array([lo, hi], np.float32))
    return int(k[0]), int(k[1])


def _hist_pass(pairs: _Pairs, map_threshold: float | None) -> dict[str, Any]:
    """Pass 1: per-bin normal / anomalous pixel counts and region weights, regions per image
    (bins indexed from the lowest occupied one)."""
    k0, k1 = _key_range(pairs)
    nb = k1 - k0 + 1
    pos, neg = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
    wsum = np.zeros(nb, np.float64)
    regions = np.zeros(pairs.n, np.int64)
    inter = pred = 0
    for start, m, g in pairs.chunks():
        k, y = value_keys(m).reshape(-1) - k0, g.reshape(-1)
        w, r = region_weights(g)
        pos += np.bincount(k[y], minlength=nb)
        neg += np.bincount(k[~y], minlength=nb)
        wsum += np.bincount(k, weights=w.reshape(-1), minlength=nb)
        regions[start:start + len(m)] = r
        if map_threshold is not None:
            p = m > float(map_threshold)
            inter, pred = inter + int((p & g).sum()), pred + int(p.sum())
    return {"pos": pos, "neg": neg, "w": wsum, "regions": regions, "inter": inter, "pred": pred,
            "k0": k0}


def _hist_points(h: dict[str, Any], limit: float) -> tuple[dict[str, Any], np.ndarray]:
    """Point estimates from the bins (descending), and the non-empty bins in that order."""
    nz = np.flatnonzero(h["pos"] + h["neg"])[::-1]
    pos, neg = h["pos"][nz], h["neg"][nz]
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    a, ap = curve_metrics(tps[None], fps[None])
    d = 2.0 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(d))
    ends = np.arange(nz.size)
    bound = float((pos.astype(np.float64) * neg).sum() / (2.0 * tps[-1] * fps[-1]))
    return {"auroc": float(a[0]), "aupr": float(ap[0]),
            "aupro": exact_aupro(h["w"][nz], ends, fps, float(h["regions"].sum()), limit),
            "best_dice": float(d[best]),
            "best_dice_threshold": float(key_edges(nz[best] + h["k0"])),
            "approximation": {
                "method": "streamed histogram: map values within a relative 2**-12 are tied",
                "bins": int(nz.size), "relative_bin_width": 2.0 ** -(23 - _KEY_SHIFT),
                "auroc_max_error": bound}}, nz


def _hist_grid(h: dict[str, Any], nz: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` descending bin edges: every non-empty bin, or class-wise quantiles; the
    last is the lowest bin's edge (at or below every value)."""
    if nz.size <= size:
        return key_edges(nz + h["k0"])
    asc = nz[::-1]
    picks = [asc[:1]]
    for counts in (h["neg"][asc], h["pos"][asc]):
        cum = np.cumsum(counts)
        q = np.linspace(0.0, 1.0, size // 2) * (cum[-1] - 1)
        picks.append(asc[np.searchsorted(cum, q, side="right")])
    return key_edges(np.unique(np.concatenate(picks)) + h["k0"])[::-1]


def _count_pass(pairs: _Pairs, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pass 2: per-image cumulative counts on ``grid`` (float32 ``[images, G]`` each)."""
    tp, fp, ov = (np.zeros((pairs.n, grid.size), np.float32) for _ in range(3))
    for start, m, g in pairs.chunks():
        c = len(m)
        w, _ = region_weights(g)
        images = np.repeat(np.arange(c), pairs.hw)
        counts = cluster_counts(m.reshape(-1).astype(np.float64), g.reshape(-1),
                                w.reshape(-1), images, c, grid)
        for dst, src in zip((tp, fp, ov), counts):
            dst[start:start + c] = src
    return tp, fp, ov


def _streamed(pairs: _Pairs, map_threshold: float | None, limit: float, n_boot: int,
              seed: int, ci: float) -> dict[str, Any]:
    """:func:`pixel_metrics` of a set too large to pool: two passes over chunks of images."""
    h = _hist_pass(pairs, map_threshold)
    n_pos, n_neg = int(h["pos"].sum()), int(h["neg"].sum())
    out: dict[str, Any] = {"n_pixels": n_pos + n_neg, "n_anomalous_pixels": n_pos,
                           "n_regions": int(h["regions"].sum()), "aupro_fpr_limit": limit}
    if n_pos and n_neg:
        points, nz = _hist_points(h, limit)
        out.update(points)
        if n_boot > 0:
            size = int(min(_GRID, max(64, _STREAM_CELLS // max(pairs.n, 1))))
            grid = _hist_grid(h, nz, size)
            draws = _resampled(_count_pass(pairs, grid), h["regions"], n_boot, seed, limit)
            out["ci"] = _intervals(draws, ci)
            out["ci"].update(n_boot=n_boot, seed=seed, ci=ci, thresholds=int(grid.size),
                             resampled="images, stratified (with / without anomalous pixels)")
    else:
        out.update(auroc=None, aupr=None, aupro=None, best_dice=None, best_dice_threshold=None)
    if map_threshold is not None:
        denom = h["pred"] + n_pos
        out["dice"] = 1.0 if denom == 0 else 2.0 * h["inter"] / denom
        out["map_threshold"] = float(map_threshold)
    return out


def _intervals(draws: dict[str, np.ndarray], ci: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in draws.items():
        lo, hi, n_valid = percentile_interval(values, ci)
        out[name] = [lo, hi]
        out["n_valid"] = min(out.get("n_valid", n_valid), n_valid)
    return out
