"""Tissue detection on slide thumbnails: Otsu on HSV saturation plus morphological clean-up."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to ``[0, 255]``.

    Args:
        rgb: uint8 ``[H,W,3]``.
    Returns:
        float32 ``[H,W]``: ``255 * (max - min) / max`` per pixel (0 where max is 0).
    """
    a = rgb.astype(np.float32)
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    return np.where(mx > 0, 255.0 * (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256,
                   value_range: tuple[float, float] = (0.0, 256.0)) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram.

    Args:
        values: any array of numbers.
        bins / value_range: histogram settings.
    Returns:
        The threshold (left edge of the first bin of the upper class); the lower bound of
        ``value_range`` when all values are equal.
    """
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    if not np.any(between > 0):
        return float(value_range[0])
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components of ``mask`` smaller than ``min_size`` pixels."""
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, *, min_saturation: float = 15.0,
                threshold: float | None = None, dark_value: float = 30.0,
                smooth: int = 3, closing_radius: int = 2, opening_radius: int = 1,
                min_object_fraction: float = 5e-4, max_hole_fraction: float = 2e-4) -> np.ndarray:
    """Foreground (tissue) mask of a slide thumbnail.

    Steps: HSV saturation smoothed by a ``smooth`` x ``smooth`` median filter; tissue = saturation
    above ``max(Otsu threshold, min_saturation)`` (or above ``threshold`` if given) and HSV value
    at least ``dark_value`` (drops black ink/pen and dark scanner borders); then closing, opening,
    removal of components smaller than ``min_object_fraction`` of the image, and filling of
    enclosed holes smaller than ``max_hole_fraction`` of the image (larger ones, e.g. lumina,
    stay background).

    Args:
        rgb: uint8 ``[H,W,3]`` thumbnail (white background).
        min_saturation: lower bound of the threshold (0-255) so a blank slide stays empty.
        threshold: fixed saturation threshold instead of Otsu's.
        dark_value: pixels whose brightest channel is below this are not tissue.
        smooth: median-filter size (1 = none).
        closing_radius / opening_radius: disk radii in pixels (0 = skip).
        min_object_fraction: smallest kept component, as a fraction of all pixels.
        max_hole_fraction: largest filled hole, as a fraction of all pixels (0 = none).
    Returns:
        bool ``[H,W]``.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H,W,3], got {rgb.dtype} {tuple(rgb.shape)}")
    sat = saturation(rgb)
    if smooth > 1:
        sat = ndimage.median_filter(sat, size=smooth)
    t = threshold if threshold is not None else max(otsu_threshold(sat), min_saturation)
    mask = (sat >= t) & (rgb.max(axis=-1) >= dark_value)
    if closing_radius > 0:
        r = closing_radius  # pad so tissue touching the border is not eroded
        padded = ndimage.binary_closing(np.pad(mask, r), structure=_disk(r))
        mask = padded[r:-r, r:-r]
    if opening_radius > 0:
        mask = ndimage.binary_opening(mask, structure=_disk(opening_radius))
    mask = remove_small_objects(mask, int(round(min_object_fraction * mask.size)))
    if max_hole_fraction > 0:
        holes = ndimage.binary_fill_holes(mask) & ~mask
        small = holes & ~remove_small_objects(holes, int(round(max_hole_fraction * mask.size)) + 1)
        mask = mask | small
    return mask.astype(bool)
