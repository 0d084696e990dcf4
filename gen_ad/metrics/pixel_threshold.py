"""A label-free pixel operating point: a map threshold set on normal images only, and the
segmentation it gives on a test set.

The best Dice of :mod:`gen_ad.metrics.localisation` scans every threshold with the labels: an
upper bound, not something a user can deploy. Here the threshold is the ``1 - fpr`` quantile
(numpy's default, linearly interpolated) of **every pixel of the normal validation images'
maps**, the images the image-level threshold is calibrated on, so that about a fraction ``fpr``
of healthy pixels lies above it: the operating point AutoDDPM's evaluation reports Dice at
(Bercea et al., 2023: a pixel false-positive rate of 1, 2 or 5 % on healthy data). A pixel is
called anomalous when ``map > threshold``, as an image is by
:meth:`~gen_ad.scoring.thresholds.Threshold.apply`.

**Streamed, exact.** :class:`NormalPixels` receives the normal maps batch by batch while those
images are scored and keeps only the largest ``N - floor((N - 1)(1 - fpr)) + 1`` pixel values
(``N``: all normal pixels, known from the number of images and the first batch's size): the
quantile needs only the two order statistics around position ``(N - 1)(1 - fpr)``, so it equals
``numpy.quantile`` of all ``N`` values (maps as float32, as the test maps are stored) while
holding about ``fpr x N`` values (4 bytes each) instead of all of them.

:func:`at_pixel_threshold` applies the threshold to a test set's maps and masks, chunk by chunk
of images (arrays, tensors or :class:`~gen_ad.scoring.store.MapStore` objects): pooled Dice,
precision and recall over all test pixels, the mean Dice of the images with anomalous pixels,
and the false-positive rate of the test's normal pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gen_ad.errors import ConfigError
from gen_ad.metrics.curves import json_safe, to_numpy

DEFAULT_PIXEL_FPR = 0.01  # AutoDDPM's strictest operating point


def check_pixel_fpr(fpr: float) -> float:
    """``fpr`` as a float in ``(0, 1)``; a ConfigError otherwise."""
    if not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"the pixel false-positive rate must be in (0, 1), got {fpr}")
    return float(fpr)


def fpr_label(fpr: float) -> str:
    """``1%`` for 0.01: the rate as the report and summary lines name it."""
    return f"{float(fpr) * 100:.4g}%"


def keep_count(n_pixels: int, fpr: float) -> int:
    """How many of the largest of ``n_pixels`` values the ``1 - fpr`` quantile depends on (the
    linear interpolation reads positions ``floor(h)`` and ``floor(h) + 1``, ``h = (n - 1)(1 -
    fpr)``, ascending), plus one against rounding."""
    h = (int(n_pixels) - 1) * (1.0 - float(fpr))
    return int(n_pixels) - int(math.floor(h)) + 1


def quantile_of_top(top: np.ndarray, n_pixels: int, fpr: float) -> float:
    """``numpy.quantile(all, 1 - fpr)`` (linear) of ``n_pixels`` values, given only the largest
    ones ``top`` (at least :func:`keep_count` of them), as float64."""
    q = 1.0 - float(fpr)
    h = (int(n_pixels) - 1) * q  # numpy's virtual index of the 'linear' method
    lo = min(int(math.floor(h)), int(n_pixels) - 1)
    first = int(n_pixels) - top.size  # ascending position of top's smallest value
    if lo < first:
        raise ValueError(f"{top.size} values kept; position {lo} of {n_pixels} is not among them")
    s = np.sort(top.astype(np.float64))
    if lo + 1 >= int(n_pixels):  # one pixel, or h at the last position
        return float(s[-1])
    gamma = h - lo
    # numpy's own interpolation on the two neighbours (its virtual index there is 1 * gamma)
    return float(np.quantile(s[lo - first:lo - first + 2], gamma))


class NormalPixels:
    """The pixel threshold of normal maps, collected batch by batch (see the module text).

    Args:
        fpr: target pixel false-positive rate in ``(0, 1)``.
        source: what the normal images are (recorded with the threshold).

    :func:`~gen_ad.app.evaluate.score_dataset` calls :meth:`begin` with the number of images,
    then :meth:`add` with each batch's maps (``None`` when the scorer gave none);
    :meth:`unavailable` records why there are no normal maps; :meth:`result` is the record.
    """

    def __init__(self, fpr: float = DEFAULT_PIXEL_FPR, source: str = "normal images") -> None:
        self.fpr, self.source = check_pixel_fpr(fpr), source
        self.n_images = self.n_pixels = 0
        self.reason: str | None = None
        self._expected: int | None = None
        self._keep = 0
        self._top = np.empty(0, np.float32)
        self._saved: dict[str, Any] | None = None

    def begin(self, n_images: int) -> None:
        """The number of images about to be added (sizes the kept buffer)."""
        self._expected = int(n_images)

    def unavailable(self, reason: str) -> None:
        """No threshold: ``reason`` says why (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason
        self._top = np.empty(0, np.float32)

    def use_saved(self, record: dict[str, Any]) -> None:
        """Take a record saved earlier (a run's threshold file) as the result."""
        self._saved = dict(record)

    def add(self, maps: Any) -> None:
        """One batch of ``[B,H,W]`` normal maps (``None``: the scorer gave no maps)."""
        if self.reason is not None:
            return
        if maps is None:
            self.unavailable("the method gave no anomaly maps for the normal images")
            return
        m = to_numpy(maps, np.float32)
        bad = int((~np.isfinite(m)).sum())
        if bad:
            self.unavailable(f"{bad} normal map values are NaN or infinite")
            return
        if self._expected is None:
            raise RuntimeError("NormalPixels.begin(n_images) must come before add()")
        if self._keep == 0:
            self._keep = keep_count(self._expected * int(np.prod(m.shape[1:])), self.fpr)
        self.n_images += int(m.shape[0])
        self.n_pixels += int(m.size)
        top = np.concatenate([self._top, m.reshape(-1)])
        if top.size > self._keep:
            top = np.partition(top, top.size - self._keep)[top.size - self._keep:]
        self._top = top

    def result(self) -> dict[str, Any]:
        """The ``pixel_threshold`` record: ``status`` ``ok`` with ``value``, ``rule``, ``fpr``,
        ``n_pixels``, ``n_images``, ``source``; or ``n/a`` with ``reason``."""
        if self._saved is not None:
            return dict(self._saved)
        if self.reason is None and self.n_pixels == 0:
            self.reason = "no normal images were scored"
        if self.reason is not None:
            return not_available(self.fpr, self.reason)
        value = quantile_of_top(self._top, self.n_pixels, self.fpr)
        return {"status": "ok", "value": value, "rule": "fpr", "fpr": self.fpr,
                "n_pixels": self.n_pixels, "n_images": self.n_images, "source": self.source,
                "prediction": "map > value",
                "quantile": "exact numpy linear (1 - fpr) quantile of every normal pixel "
                            "(maps as float32)"}


def not_available(fpr: float, reason: str) -> dict[str, Any]:
    """The ``pixel_threshold`` record of a threshold that could not be set."""
    return {"status": "n/a", "rule": "fpr", "fpr": float(fpr), "reason": reason}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def at_pixel_threshold(maps: Any, masks: Any, labels: Any, value: float) -> dict[str, Any]:
    """The test set's segmentation at map threshold ``value`` (pixel anomalous: ``map >
    value``, compared in float64).

    Args:
        maps / masks: ``[N,H,W]`` maps and ground-truth masks (arrays, tensors or stores).
        labels: ``[N]`` image labels (0 normal), for the FPR on normal images' pixels.
        value: the threshold (a :class:`NormalPixels` record's ``value``).
    Returns:
        ``threshold``, ``dice`` (pooled over every test pixel), ``dice_mean_anomalous_images``
        (mean per-image Dice of the ``n_anomalous_images`` images with anomalous pixels),
        ``precision``, ``recall`` (sensitivity), ``fpr`` (pixels outside the masks, every
        image), ``fpr_normal_images`` (pixels of the images labelled normal: what the threshold
        was set for), ``n_normal_image_pixels`` and ``tp, fp, fn, tn``; ``None`` where a rate
        is undefined.
    """
    from gen_ad.metrics.localisation import MapMaskChunks

    pairs = MapMaskChunks(maps, masks)
    n, hw = pairs.n, pairs.hw
    y = to_numpy(labels, np.int64).reshape(-1)
    t = np.float64(value)
    tp = fp = fn = fp_normal = normal_pixels = 0
    per_image: list[float] = []
    for start, m, g in pairs.chunks():
        p = m > t
        inter, pred, gt = ((a.reshape(len(a), -1).sum(axis=1)) for a in (p & g, p, g))
        tp, fp, fn = tp + int(inter.sum()), fp + int((pred - inter).sum()), fn + int(
            (gt - inter).sum())
        has = gt > 0
        per_image += (2.0 * inter[has] / (pred[has] + gt[has])).tolist()
        normal = y[start:start + len(p)] == 0
        fp_normal += int((pred - inter)[normal].sum())
        normal_pixels += int(normal.sum()) * hw
    tn = n * hw - tp - fp - fn
    return json_safe({
        "threshold": float(value), "dice": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "dice_mean_anomalous_images": float(np.mean(per_image)) if per_image else None,
        "n_anomalous_images": len(per_image), "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn),
        "fpr_normal_images": _ratio(fp_normal, normal_pixels),
        "n_normal_image_pixels": normal_pixels, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
