"""Pixel-level metrics: AUPRO against a threshold-by-threshold brute force, regions, image CIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from gen_ad.errors import DataError
from gen_ad.metrics.curves import curve_metrics
from gen_ad.metrics.detection import evaluate_scores
from gen_ad.metrics.localisation import (
    cluster_counts,
    clustered_metrics,
    pixel_metrics,
    pro_area,
    region_weights,
    threshold_grid,
)


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """The PRO curve one threshold at a time (regions by scikit-image), integrated to ``limit``."""
    regions = []
    for m, g in zip(maps, masks):
        lab = label(g, connectivity=2)
        regions += [m[lab == r] for r in range(1, lab.max() + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float((normal >= t).mean()))
        ys.append(float(np.mean([(r >= t).mean() for r in regions])))
    x, y = np.array(xs), np.array(ys)
    k = int(np.argmax(x > limit)) if (x > limit).any() else x.size
    xi, yi = list(x[:k]), list(y[:k])
    if k < x.size:
        yi.append(y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1]))
        xi.append(limit)
    return float(np.sum(np.diff(xi) * (np.array(yi[1:]) + np.array(yi[:-1])) / 2.0) / limit)


def random_case(seed: int, n: int = 6, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n - 2):  # the last two images are normal
        for _ in range(int(rng.integers(1, 3))):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, y:y + h, x:x + w] = True
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)  # rounding: many ties
    return maps, masks


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_brute_force(seed: int, limit: float) -> None:
    maps, masks = random_case(seed)
    out = pixel_metrics(maps, masks, fpr_limit=limit)
    assert out["aupro"] == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-12)
    assert out["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["aupro_fpr_limit"] == limit


def test_regions_are_8_connected_within_each_image_only() -> None:
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[0, 5, 0] = True  # a second region
    masks[1, 5, :] = True  # touches image 2's top row across the batch axis...
    masks[2, 0, :] = True  # ...but is its own region
    w, regions = region_weights(masks)
    assert regions.tolist() == [2, 1, 1]
    assert w[0, 1, 1] == w[0, 2, 2] == 0.5 and w[0, 5, 0] == 1.0
    assert w[1, 5, 0] == pytest.approx(1 / 6) and w[~masks].max() == 0.0


def test_every_region_counts_equally() -> None:
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :2, :2] = True  # 4 pixels
    masks[1, 4:14, 4:14] = True  # 100 pixels
    small_found = np.where(masks, 0.0, 0.5)
    small_found[0][masks[0]] = 1.0
    large_found = np.where(masks, 0.0, 0.5)
    large_found[1][masks[1]] = 1.0
    a, b = pixel_metrics(small_found, masks), pixel_metrics(large_found, masks)
    assert a["aupro"] == pytest.approx(b["aupro"]) == pytest.approx(0.5)
    assert a["auroc"] < 0.3 < 0.9 < b["auroc"]  # pooled pixels: the large region dominates


def test_perfect_and_uninformative_maps() -> None:
    maps, masks = random_case(0, n=40, size=32)
    assert pixel_metrics(masks.astype(float), masks)["aupro"] == pytest.approx(1.0)
    noise = np.random.default_rng(1).random(masks.shape)
    assert pixel_metrics(noise, masks)["aupro"] == pytest.approx(0.15, abs=0.03)  # ~ limit / 2


def test_pro_area_trapezoids_and_interpolates_at_the_limit() -> None:
    fpr = np.array([[0.1, 0.5, 1.0]])
    pro = np.array([[0.4, 0.8, 1.0]])
    full = (0.1 * 0.4 / 2 + 0.4 * (0.4 + 0.8) / 2 + 0.5 * 1.8 / 2)
    assert pro_area(fpr, pro, 1.0)[0] == pytest.approx(full)
    at_03 = 0.1 * 0.4 / 2 + 0.2 * (0.4 + 0.6) / 2  # PRO interpolated to 0.6 at FPR 0.3
    assert pro_area(fpr, pro, 0.3)[0] == pytest.approx(at_03 / 0.3)


def test_grid_counts_reproduce_the_exact_curves() -> None:
    maps, masks = random_case(3)
    w, regions = region_weights(masks)
    grid = threshold_grid(maps.ravel(), masks.ravel())
    assert grid.size == np.unique(maps).size  # few distinct values: the grid is exact
    images = np.repeat(np.arange(maps.shape[0]), maps[0].size)
    tp, fp, ov = cluster_counts(maps.ravel(), masks.ravel(), w.ravel(), images, maps.shape[0],
                                grid)
    ones = np.ones((1, maps.shape[0]))
    a, _ = curve_metrics(ones @ tp, ones @ fp)
    fps = ones @ fp
    aupro = pro_area(fps / fps[:, -1:], (ones @ ov) / regions.sum(), 0.3)
    exact = pixel_metrics(maps, masks)
    assert a[0] == pytest.approx(exact["auroc"], abs=1e-12)
    assert aupro[0] == pytest.approx(exact["aupro"], abs=1e-12)
    coarse = threshold_grid(maps.ravel(), masks.ravel(), size=16)
    assert coarse.size <= 16 and coarse[-1] == maps.min() and np.all(np.diff(coarse) < 0)


def test_image_bootstrap_intervals() -> None:
    maps, masks = random_case(4, n=30, size=16)
    out = pixel_metrics(maps, masks, n_boot=300, seed=7)
    again = pixel_metrics(maps, masks, n_boot=300, seed=7)
    assert out == again and json.loads(json.dumps(out, allow_nan=False)) == out
    ci = out["ci"]
    assert ci["n_boot"] == ci["n_valid"] == 300 and "images" in ci["resampled"]
    for key in ("auroc", "aupr", "aupro"):
        low, high = ci[key]
        assert low < out[key] < high and high - low < 0.5
    assert "ci" not in pixel_metrics(maps, masks)


def test_no_anomalous_pixels_and_bad_input() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    empty = pixel_metrics(maps, np.zeros_like(maps, bool), n_boot=10)
    assert empty["aupro"] is None and empty["n_regions"] == 0 and "ci" not in empty
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True
    with pytest.raises(DataError, match="NaN"):
        pixel_metrics(np.where(masks, np.nan, maps), masks)
    with pytest.raises(DataError, match="fpr_limit"):
        pixel_metrics(maps, masks, fpr_limit=0.0)
    with pytest.raises(DataError, match="equal shape"):
        pixel_metrics(maps, masks[:1])


def test_evaluate_scores_reports_pixel_intervals() -> None:
    maps, masks = random_case(2, n=20)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    out = evaluate_scores(scores, labels, maps=maps, masks=masks, n_boot=50, seed=1)
    pixel = out["pixel"]
    assert pixel["ci"]["n_boot"] == 50 and pixel["ci"]["seed"] == 1
    assert pixel["aupro"] == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-12)


def test_clustered_metrics_resample_whole_clusters() -> None:
    rng = np.random.default_rng(6)
    slides = np.repeat(np.arange(12), 40)  # 12 slides of 40 tiles
    slide_effect = rng.normal(0, 1.0, 12)[slides]  # tiles of a slide share a shift
    labels = (slides >= 6) & (rng.random(slides.size) < 0.5)
    scores = np.round(slide_effect + 0.8 * labels + rng.normal(0, 0.5, slides.size), 2)
    out = clustered_metrics(scores, labels.astype(int), slides, n_boot=1000, seed=2)
    assert out["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["n_clusters"] == 12 and "clusters" in out["resampled"]
    tiles = evaluate_scores(scores, labels.astype(int), n_boot=1000, seed=2)["auroc"]
    width = out["auroc"]["high"] - out["auroc"]["low"]
    assert width > 1.5 * (tiles["high"] - tiles["low"])  # tile resampling is overconfident
    assert out["auroc"]["low"] < out["auroc"]["value"] < out["auroc"]["high"]
    point = clustered_metrics(scores, labels.astype(int), slides, n_boot=0)
    assert point["auroc"]["low"] is None and point["aupr"]["value"] == out["aupr"]["value"]
    with pytest.raises(DataError, match="differ in length"):
        clustered_metrics(scores, labels.astype(int), slides[:-1])


def test_clustered_aupro_equals_pixel_aupro_with_images_as_clusters() -> None:
    maps, masks = random_case(5, n=10)
    w, _ = region_weights(masks)
    images = np.repeat(np.arange(10), maps[0].size)
    flat = clustered_metrics(maps.ravel(), masks.ravel().astype(int), images, n_boot=200,
                             seed=3, weights=w.ravel())
    pix = pixel_metrics(maps, masks, n_boot=200, seed=3)
    assert flat["aupro"]["value"] == pytest.approx(pix["aupro"], abs=1e-12)
    assert flat["n_regions"] == pix["n_regions"]
    assert [flat["aupro"]["low"], flat["aupro"]["high"]] == pytest.approx(pix["ci"]["aupro"])
    assert "aupro" not in clustered_metrics(maps.ravel(), masks.ravel().astype(int), images,
                                            n_boot=0)
