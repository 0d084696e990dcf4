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
100,000 maps of 64 px: 410 million pixels) is streamed in chunks of images, never pooled. Pass 0
finds the range ``[lo, hi]`` of the values. Pass 1 counts pixels and region weights per class in
a histogram whose bins are the intersection of two order-preserving binnings: ``n_range``
equal-width bins over ``[lo, hi]`` (one per 32 pixels, a power of 2 from 2**15 up to
:data:`_RANGE_BINS` = 2**20: at the switch, 2**18 bins of 3.8e-6 x the range) and the float32
values sharing their sign, exponent and top 12 mantissa bits (width at most 2**-12 x the value).
So a bin is never wider than ``(hi - lo) / n_range``, whatever offset the maps carry (1000 + U
or -1e6 + U is binned as finely as U), and never wider than the magnitude bins alone. The point
estimates are computed from the histogram, the values in one bin counted as tied, and
``approximation`` records, for every streamed metric, a **rigorous** range for the exact value
given only the bin counts (any order of the pixels within a bin, any ties among them):
AUROC +- half the fraction of normal/anomalous pairs sharing a bin; AUPR between "in every bin,
the negatives first, then the positives one by one" and "the positives first, tied"; AUPRO
between the PRO curve stepping right-then-up and up-then-right across every bin; best Dice
between the binned maximum (bin ends are exact thresholds) and the best Dice a bin's end could
reach with all its positives and none of its negatives (the AUPR's lower end slightly below that
order's value; the other ends are reached, tested). Only bins holding anomalous pixels widen a
range, and not those known to be exact: a bin of one pixel, or (float32 or narrower maps) a bin
narrower than the float32 spacing, checked through the mean anomalous value of each bin
(``exactly_tied_bins`` counts them; their pixels truly tie, as on the exact path). Exactly tied
values in a wider bin still count as undecided, so maps with few distinct values get
conservative ranges. ``<metric>_max_error`` is the larger distance from the reported value to
its range's ends, ``bounds`` the ranges; ``range_bin_width`` is ``1 / n_range`` (a bin's width
at most, as a fraction of ``hi - lo``, recorded as ``value_range``), ``relative_bin_width``
``2**-12`` (of the value). The best-Dice threshold is the smallest float32 value of its bin (the
exact one may lie elsewhere when the Dice curve is flat). Pass 2 fills the per-image bootstrap
counts on a grid of bins. Memory: one chunk of images, the histograms (32 bytes a bin: at most
2**20 plus the occupied magnitude bins, about 4096 per factor of 2 between the smallest and
largest value, 2**21 at most) and the ``[images, grid]`` counts (float32, at most
:data:`_STREAM_CELLS` cells each).
"""

from __future__ import annotations

from collections.abc import Iterable
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
_RANGE_BINS = 2**20  # ... and at most this many equal-width bins over the values' range
_STREAM_CELLS = 8_000_000  # [images, grid] float32 count matrices of the streamed bootstrap
_STREAM_PIXELS = 2**20  # pixels per streamed chunk
# map dtypes that float32 holds exactly: a streamed bin of one float32 value is then exact
_EXACT32 = {"float32", "float16", "bfloat16", "bool", "uint8", "int8", "uint16", "int16"}


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


def clustered_metrics(scores: Any, labels: Any, clusters: Iterable[Any], n_boot: int = 2000,
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
        return json_safe(_streamed(MapMaskChunks(maps, masks), map_threshold, fpr_limit, n_boot,
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


class MapMaskChunks:
    """Maps and masks read together in chunks of whole images (arrays, tensors or stores):
    the streamed pixel metrics and :func:`gen_ad.metrics.pixel_threshold.at_pixel_threshold`."""

    def __init__(self, maps: Any, masks: Any) -> None:
        self.maps, self.masks = maps, masks
        ms, gs = tuple(getattr(maps, "shape", ())), tuple(getattr(masks, "shape", ()))
        if ms != gs or len(ms) != 3:
            raise DataError(f"maps and masks must both be [B,H,W] of equal shape, got {ms} "
                            f"and {gs}")
        self.n, self.hw = int(ms[0]), int(ms[1]) * int(ms[2])
        self.lossless = True  # every chunk read so far held values float32 holds exactly

    @staticmethod
    def _read(x: Any, start: int, stop: int) -> Any:
        return x.read(start, stop) if hasattr(x, "read") else x[start:stop]

    def chunks(self) -> Any:
        """``(start, maps [C,H,W] float32, masks [C,H,W] bool)`` in order; finite maps checked."""
        step = max(1, _STREAM_PIXELS // max(self.hw, 1))
        for start in range(0, self.n, step):
            raw = self._read(self.maps, start, start + step)
            self.lossless &= str(getattr(raw, "dtype", "")).removeprefix("torch.") in _EXACT32
            m = _np(raw, np.float32)
            if not np.all(np.isfinite(m)):
                raise DataError(f"{int((~np.isfinite(m)).sum())} map values are NaN or infinite "
                                f"(images {start}..{start + len(m) - 1})")
            g = _np(self._read(self.masks, start, start + step), np.float32) > 0.5
            yield start, m, g


def value_keys(m: np.ndarray) -> np.ndarray:
    """Order-preserving bin of each float32 value, in ``[0, 2**(32 - _KEY_SHIFT))``: the values
    sharing sign, exponent and the top mantissa bits share a bin (relative width ``2**-12``)."""
    return _magnitude_keys(m).astype(np.int64) + 2 ** (31 - _KEY_SHIFT)


def _magnitude_keys(m: np.ndarray) -> np.ndarray:
    """:func:`value_keys` less ``2**(31 - _KEY_SHIFT)``, as ``int32`` (int32 arithmetic)."""
    f = np.ascontiguousarray(m, dtype=np.float32) + np.float32(0.0)  # -0.0 joins 0.0
    bits = f.view(np.int32)
    bits = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)  # negatives: larger |v|, lower
    bits >>= _KEY_SHIFT
    return bits


def _ordered(v: Any) -> np.ndarray:
    """``int64`` ranks of float32 values: increasing with the value, consecutive for adjacent
    float32 values (-0.0 and 0.0 both 0)."""
    bits = np.asarray(v, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(o: np.ndarray) -> np.ndarray:
    """The float32 values of :func:`_ordered` ranks."""
    f = np.abs(np.asarray(o, np.int64)).astype(np.int32).view(np.float32)
    return np.where(np.asarray(o) < 0, -f, f)


class _Binning:
    """Order-preserving bins of float32 values in ``[lo, hi]``: the intersection of
    :func:`value_keys` (magnitude bins) and ``n_range`` equal-width bins over ``[lo, hi]``.

    A value's bin is the sum of its two bin indices: both are non-decreasing in the value, so two
    values share a sum only if they share both bins. Bins run from 0 (``lo``) to ``size - 1``.
    """

    def __init__(self, lo: float, hi: float, n_range: int) -> None:
        self.lo, self.hi, self.n_range = float(lo), float(hi), int(n_range)
        span = self.hi - self.lo  # float64: finite for any float32 values
        scale = self.n_range / span if span > 0 else 0.0
        with np.errstate(over="ignore"):  # float32 arithmetic (faster) where it cannot overflow
            fast = bool(np.isfinite(np.float32(self.hi) - np.float32(self.lo))
                        and np.isfinite(np.float32(scale)))
        self._dtype = np.float32 if fast else np.float64
        self._lo, self._scale = self._dtype(self.lo), self._dtype(scale)
        self._base = 0  # keys() subtracts it: first 0, then the raw bin of lo
        self._base = int(self.keys(np.array([self.lo]))[0])
        self.size = int(self.keys(np.array([self.hi]))[0]) + 1

    def keys(self, m: np.ndarray) -> np.ndarray:
        """``int64`` bin of each value of ``m`` (float32 values in ``[lo, hi]``)."""
        f = np.asarray(m, np.float32)
        t = f.astype(self._dtype)  # rounding is monotone: the bins stay in the values' order
        t -= self._lo
        t *= self._scale
        k = np.floor(t, out=t).astype(np.int32)
        np.minimum(k, self.n_range - 1, out=k)
        k += _magnitude_keys(f)
        return k.astype(np.int64) - self._base

    def edges(self, ks: np.ndarray) -> np.ndarray:
        """:func:`_ordered` rank of the smallest float32 in ``[lo, hi]`` whose bin is at least
        ``k``, for each ``k`` of ``ks`` (the rank of ``hi`` + 1 where none is); bisection."""
        ks = np.asarray(ks, np.int64)
        first = int(_ordered(self.lo))
        a = np.full(ks.shape, first, np.int64)
        b = np.full(ks.shape, int(_ordered(self.hi)) + 1, np.int64)
        while (active := a < b).any():
            mid = np.where(active, (a + b) // 2, first)  # always a value in [lo, hi]
            ok = self.keys(_from_ordered(mid)) >= ks
            a, b = np.where(active & ~ok, mid + 1, a), np.where(active & ok, mid, b)
        return a

    def edge(self, k: int) -> float:
        """The smallest float32 value of bin ``k`` (a threshold ``>=`` that keeps the bin)."""
        return float(_from_ordered(self.edges(np.array([k])))[0]) + 0.0

    def single(self, ks: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """Whether each bin of ``ks`` holds one float32 value only (its pixels truly tie), given
        a value ``inside`` each (bins are runs of adjacent float32 values: one is alone when
        its neighbours lie in other bins; False where ``inside`` is not in its bin)."""
        ks, v = np.asarray(ks, np.int64), np.asarray(inside, np.float32)
        up = np.nextafter(v, np.float32(np.inf))
        down = np.nextafter(v, np.float32(-np.inf))
        alone_up = (v >= self.hi) | (self.keys(np.minimum(up, self.hi)) != ks)
        alone_down = (v <= self.lo) | (self.keys(np.maximum(down, self.lo)) != ks)
        inside_ok = (v >= self.lo) & (v <= self.hi)
        return inside_ok & (self.keys(np.clip(v, self.lo, self.hi)) == ks) & alone_up & alone_down


def _binning(pairs: MapMaskChunks) -> _Binning:
    """Pass 0: the range of the map values (every value checked finite) and the bins over it:
    one equal-width bin per 32 pixels, a power of 2 in ``[2**15, _RANGE_BINS]``."""
    lo, hi = np.inf, -np.inf
    for _, m, _ in pairs.chunks():
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    if lo > hi:  # no pixels
        lo = hi = 0.0
    per32 = max(pairs.n * pairs.hw // 32, 1)
    return _Binning(lo, hi, min(_RANGE_BINS, max(2**15, 1 << (per32.bit_length() - 1))))


def _hist_pass(pairs: MapMaskChunks, map_threshold: float | None) -> dict[str, Any]:
    """Pass 1: per-bin normal / anomalous pixel counts and region weights, regions per image
    (bins of :func:`_binning`, from the lowest value's)."""
    bins = _binning(pairs)
    nb = bins.size
    pos, neg = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
    wsum, psum = np.zeros(nb, np.float64), np.zeros(nb, np.float64)
    regions = np.zeros(pairs.n, np.int64)
    inter = pred = 0
    for start, m, g in pairs.chunks():
        k, y = bins.keys(m).reshape(-1), g.reshape(-1)
        w, r = region_weights(g)
        pos += np.bincount(k[y], minlength=nb)
        neg += np.bincount(k[~y], minlength=nb)
        wsum += np.bincount(k, weights=w.reshape(-1), minlength=nb)
        psum += np.bincount(k[y], weights=m.reshape(-1)[y], minlength=nb)  # a value in each bin
        regions[start:start + len(m)] = r
        if map_threshold is not None:
            p = m > np.float64(map_threshold)  # float64, as the exact path (NEP 50)
            inter, pred = inter + int((p & g).sum()), pred + int(p.sum())
    return {"pos": pos, "neg": neg, "w": wsum, "regions": regions, "inter": inter, "pred": pred,
            "psum": psum, "bins": bins, "lossless": pairs.lossless}


def _hist_points(h: dict[str, Any], limit: float) -> tuple[dict[str, Any], np.ndarray]:
    """Point estimates from the bins (descending), and the non-empty bins in that order."""
    nz = np.flatnonzero(h["pos"] + h["neg"])[::-1]
    pos, neg = h["pos"][nz], h["neg"][nz]
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    a, ap = curve_metrics(tps[None], fps[None])
    d = 2.0 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(d))
    n_regions = float(h["regions"].sum())
    points = {"auroc": float(a[0]), "aupr": float(ap[0]),
              "aupro": exact_aupro(h["w"][nz], np.arange(nz.size), fps, n_regions, limit),
              "best_dice": float(d[best])}
    bins: _Binning = h["bins"]
    # a bin of one float32 value ties its pixels truly (when the maps were float32 or narrower);
    # only bins with anomalous pixels can make the bounds wider, so only those are checked
    tied = np.zeros(nz.size, bool)
    if h["lossless"]:
        has = np.flatnonzero(pos)
        tied[has] = bins.single(nz[has], h["psum"][nz[has]] / pos[has])
    tied |= pos + neg == 1  # one pixel
    bounds = hist_bounds(points, pos, neg, h["w"][nz], n_regions, limit, tied)
    approx: dict[str, Any] = {
        "method": "streamed histogram: map values in one bin are tied (bins: equal-width over "
                  "the values' range, intersected with relative 2**-12 magnitude bins)",
        "bins": int(nz.size), "exactly_tied_bins": int(tied.sum()),
        "relative_bin_width": 2.0 ** -(23 - _KEY_SHIFT),
        "range_bin_width": 1.0 / bins.n_range, "value_range": [bins.lo, bins.hi]}
    for key, value in points.items():
        lo, hi = bounds[key]
        approx[f"{key}_max_error"] = max(value - lo, hi - value, 0.0)
    approx["bounds"] = bounds
    return {**points, "best_dice_threshold": bins.edge(int(nz[best])),
            "approximation": approx}, nz


def hist_bounds(values: dict[str, float], pos: np.ndarray, neg: np.ndarray, w: np.ndarray,
                n_regions: float, limit: float,
                tied: np.ndarray | None = None) -> dict[str, list[float]]:
    """Ranges that hold the exact AUROC, AUPR, AUPRO and best Dice, given only binned counts.

    Args:
        values: the binned ``auroc, aupr, aupro, best_dice`` (one tie group per bin).
        pos, neg, w: ``[K]`` anomalous and normal pixels and region weight of each bin, in
            descending order of value (any order of the pixels within a bin, any ties).
        n_regions: the number of regions (the sum of ``w``); ``limit``: the AUPRO FPR limit.
        tied: optional ``[K]`` bool, True for bins whose pixels truly tie (exact as binned).
    Returns:
        ``{metric: [low, high]}`` around each of ``values``. Only a bin with anomalous pixels
        and pixels that may differ can move a metric: a bin without positives has no region
        weight and no pair or precision to order, and ends where the previous one's Dice is.
    """
    p, n = pos.astype(np.float64), neg.astype(np.float64)
    tp1, fp1, pro1 = np.cumsum(p), np.cumsum(n), np.cumsum(w) / n_regions  # at each bin's end
    n_pos, n_neg = tp1[-1], fp1[-1]
    s = np.flatnonzero((p > 0) if tied is None else (p > 0) & ~np.asarray(tied, bool))
    p, n, tp1, fp1, pro1 = p[s], n[s], tp1[s], fp1[s], pro1[s]
    tp0, fp0, pro0 = tp1 - p, fp1 - n, pro1 - w[s] / n_regions  # before it
    half = float((p * n).sum() / (2.0 * n_pos * n_neg))  # a pair in a bin: 0..1, here 1/2
    # AUPR: the k-th positive of a bin has a precision of at least (tp0 + k) / (tp0 + k + fp1)
    # and at most tp1 / (tp1 + fp0); the sum over k is p - fp1 * sum_k 1 / (tp0 + fp1 + k)
    # >= p - fp1 * log1p(p / (tp0 + fp1 + 1/2)) (1/x is convex: each term <= its integral
    # over k -+ 1/2)
    binned = p * tp1 / (tp1 + fp1)
    ap_low = float((binned - p + fp1 * np.log1p(p / (tp0 + fp1 + 0.5))).sum() / n_pos)
    ap_high = float((p * tp1 / (tp1 + fp0) - binned).sum() / n_pos)
    # AUPRO: between the PRO curve stepping right-then-up and up-then-right across each bin
    x0, x1 = fp0 / n_neg, fp1 / n_neg
    width = np.clip(np.minimum(x1, limit) - x0, 0.0, None)
    frac = np.divide(width, x1 - x0, out=np.zeros_like(width), where=x1 > x0)
    trapezoid = width * (2.0 * pro0 + (pro1 - pro0) * frac) / 2.0
    pro_low = float((trapezoid - pro0 * width).sum() / limit)
    pro_high = float((pro1 * width - trapezoid).sum() / limit)
    dice_high = float((2.0 * tp1 / (tp1 + fp0 + n_pos)).max(initial=values["best_dice"]))
    return {"auroc": [values["auroc"] - half, values["auroc"] + half],
            "aupr": [values["aupr"] - ap_low, values["aupr"] + ap_high],
            "aupro": [values["aupro"] - pro_low, values["aupro"] + pro_high],
            "best_dice": [values["best_dice"], dice_high]}


def _hist_grid(h: dict[str, Any], nz: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` descending bins (as float64): every non-empty bin, or class-wise
    quantiles; the last is the lowest occupied bin."""
    if nz.size <= size:
        return nz.astype(np.float64)
    asc = nz[::-1]
    picks = [asc[:1]]
    for counts in (h["neg"][asc], h["pos"][asc]):
        cum = np.cumsum(counts)
        q = np.linspace(0.0, 1.0, size // 2) * (cum[-1] - 1)
        picks.append(asc[np.searchsorted(cum, q, side="right")])
    return np.unique(np.concatenate(picks))[::-1].astype(np.float64)


def _count_pass(pairs: MapMaskChunks, grid: np.ndarray, bins: _Binning) -> tuple[np.ndarray, ...]:
    """Pass 2: per-image cumulative counts on ``grid`` (bins of ``bins``; float32
    ``[images, G]`` each)."""
    tp, fp, ov = (np.zeros((pairs.n, grid.size), np.float32) for _ in range(3))
    for start, m, g in pairs.chunks():
        c = len(m)
        w, _ = region_weights(g)
        images = np.repeat(np.arange(c), pairs.hw)
        counts = cluster_counts(bins.keys(m).reshape(-1).astype(np.float64), g.reshape(-1),
                                w.reshape(-1), images, c, grid)
        for dst, src in zip((tp, fp, ov), counts):
            dst[start:start + c] = src
    return tp, fp, ov


def _streamed(pairs: MapMaskChunks, map_threshold: float | None, limit: float, n_boot: int,
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
            draws = _resampled(_count_pass(pairs, grid, h["bins"]), h["regions"], n_boot,
                               seed, limit)
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
