"""Streamed pixel metrics keep their resolution whatever offset or scale the maps carry, and every
streamed metric comes with a range that holds the exact value (``approximation.bounds``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gen_ad.metrics import localisation as loc
from gen_ad.metrics.localisation import pixel_metrics

METRICS = ("auroc", "aupr", "aupro", "best_dice")
TOL = 1e-3  # stated tolerance of a streamed point estimate at the switch (measured: <= 5e-5)
SIZE, N_IMAGES = 32, 65  # 66,560 pixels: just above the (lowered) exact limit of 2**16


@pytest.fixture
def small_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream from 2**16 pixels on, in chunks of 16 images (the hooks of test_evaluation_scale)."""
    monkeypatch.setattr(loc, "EXACT_PIXELS", 2**16, raising=False)
    monkeypatch.setattr(loc, "_STREAM_PIXELS", 2**14, raising=False)


def _masks_and_noise(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with 1-3 discs in every other image, and ``U(0, 1) + 0.3 U(0, 1)`` inside them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((N_IMAGES, SIZE, SIZE), bool)
    yy, xx = np.ogrid[:SIZE, :SIZE]
    for b in range(0, N_IMAGES, 2):
        for _ in range(int(rng.integers(1, 4))):
            r = int(rng.integers(1, 7))
            cy, cx = rng.integers(r, SIZE - r, 2)
            masks[b] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    u = rng.random(masks.shape) + 0.3 * masks * rng.random(masks.shape)
    return u, masks


def _check_within_bounds(streamed: dict[str, Any], exact: dict[str, Any]) -> None:
    approx = streamed["approximation"]
    for key in METRICS:
        low, high = approx["bounds"][key]
        assert low - 1e-12 <= exact[key] <= high + 1e-12, (key, low, exact[key], high)
        assert low - 1e-12 <= streamed[key] <= high + 1e-12, (key, low, streamed[key], high)
        assert abs(streamed[key] - exact[key]) <= approx[f"{key}_max_error"] + 1e-12, key


@pytest.mark.parametrize("transform", ["1000 + u", "-1e6 + u", "1e-6 * u"])
def test_offset_or_scaled_maps_stream_as_finely_as_the_exact_path(
        small_switch: None, transform: str) -> None:
    """1000 + U used to fall into ~11 bins (AUPR 0.400 exact vs 0.376 streamed) and -1e6 + U
    into one; now a bin is at most 2**-15 of the range wide at this size."""
    u, masks = _masks_and_noise()
    maps = np.asarray(eval(transform, {"u": u}), dtype=np.float32)  # noqa: S307 - literal above
    streamed = pixel_metrics(maps, masks)  # the default: streamed above the limit
    exact = pixel_metrics(maps, masks, exact=True)
    assert "approximation" in streamed and "approximation" not in exact
    for key in METRICS:
        assert streamed[key] == pytest.approx(exact[key], abs=TOL), key
    assert streamed["best_dice_threshold"] == pytest.approx(
        exact["best_dice_threshold"], rel=1e-6, abs=1e-3 * float(np.ptp(maps)))
    _check_within_bounds(streamed, exact)
    approx = streamed["approximation"]
    assert approx["range_bin_width"] == 2.0 ** -15
    assert approx["value_range"] == [float(maps.min()), float(maps.max())]
    for key in METRICS:  # the bound is informative, not only true
        assert approx[f"{key}_max_error"] <= TOL, key


def test_offset_maps_keep_their_bootstrap_intervals(small_switch: None) -> None:
    u, masks = _masks_and_noise(seed=1)
    maps = (1000.0 + u).astype(np.float32)
    streamed = pixel_metrics(maps, masks, n_boot=200, seed=4)
    exact = pixel_metrics(maps, masks, n_boot=200, seed=4, exact=True)
    for key in ("auroc", "aupr", "aupro"):
        assert streamed["ci"][key] == pytest.approx(exact["ci"][key], abs=0.01), key


@pytest.mark.parametrize("case", ["ties", "float64 finer than float32", "constant",
                                  "signed zeros", "denormals", "huge"])
def test_bounds_hold_on_edge_cases(small_switch: None, case: str) -> None:
    u, masks = _masks_and_noise(seed=2)
    maps: np.ndarray = {
        "ties": np.round(u * 7.0) / 7.0,  # few distinct values: many pixels per bin truly tie
        "float64 finer than float32": 1000.0 + 1e-9 * u,  # one float32 value, distinct float64
        "constant": np.full(u.shape, 0.5),
        "signed zeros": np.where(u > 0.8, 0.0, -0.0) + np.where(masks & (u > 0.9), 1.0, 0.0),
        "denormals": (u * 1e-40).astype(np.float32),
        "huge": (u * 1e38).astype(np.float32),
    }[case]
    if case != "float64 finer than float32":
        maps = maps.astype(np.float32)
    streamed = pixel_metrics(maps, masks)
    exact = pixel_metrics(maps, masks, exact=True)
    _check_within_bounds(streamed, exact)
    if case == "constant":
        assert streamed["auroc"] == 0.5 and streamed["approximation"]["auroc_max_error"] == 0.0
    if case == "float64 finer than float32":  # float32 ties them; float64 does not: no claim
        assert streamed["approximation"]["exactly_tied_bins"] == 0


def _arranged(bins: np.ndarray, masks: np.ndarray, order: str, seed: int) -> np.ndarray:
    """Values that keep each pixel in its bin (bin ``b``: ``[b, b + 1)``) and order it within."""
    rng = np.random.default_rng(seed)
    inside = {"tied": np.zeros(bins.shape),
              "positives first": np.where(masks, 0.5, 0.25),  # positives tied, above
              "negatives first": np.where(masks, 0.5 * rng.random(bins.shape), 0.75)}[order]
    return bins + inside


def test_bounds_hold_and_are_reached_for_any_order_within_bins() -> None:
    """On coarse bins (many pixels each), the exact metrics of every order of the pixels within
    the bins lie in :func:`hist_bounds`; the extreme orders reach the ends."""
    u, masks = _masks_and_noise(seed=3)
    bins = np.floor(u * 12.0)
    binned = pixel_metrics(_arranged(bins, masks, "tied", 0), masks, exact=True)
    w, regions = loc.region_weights(masks)
    k = bins.astype(np.int64).ravel()
    y = masks.ravel()
    nb, desc = int(k.max()) + 1, slice(None, None, -1)
    pos, neg = np.bincount(k[y], minlength=nb)[desc], np.bincount(k[~y], minlength=nb)[desc]
    weight = np.bincount(k, weights=w.ravel(), minlength=nb)[desc]
    bounds = loc.hist_bounds({m: binned[m] for m in METRICS}, pos, neg, weight,
                             float(regions.sum()), loc.FPR_LIMIT)
    up = pixel_metrics(_arranged(bins, masks, "positives first", 0), masks, exact=True)
    for key in METRICS:
        assert up[key] == pytest.approx(bounds[key][1], abs=1e-12), key
    for seed in range(3):
        down = pixel_metrics(_arranged(bins, masks, "negatives first", seed), masks, exact=True)
        for key in METRICS:
            assert bounds[key][0] - 1e-12 <= down[key] <= bounds[key][1] + 1e-12, key
        for key in ("auroc", "aupro", "best_dice"):
            assert down[key] == pytest.approx(bounds[key][0], abs=1e-12), key
        assert down["aupr"] - bounds["aupr"][0] < 0.01 * (bounds["aupr"][1] - bounds["aupr"][0])


def test_a_fixed_map_threshold_compares_in_float64_on_both_paths() -> None:
    """A threshold between two adjacent float32 values: ``map > t`` is decided in float64 on the
    streamed path as on the exact one (a plain Python float against a float32 array compares in
    float32 under NumPy 2, which flipped every pixel at such a threshold)."""
    maps = np.full((4, 8, 8), np.float32(0.1), np.float32)
    masks = np.zeros((4, 8, 8), bool)
    masks[:2] = True
    t = float(np.float32(0.1)) - 1e-10  # below the maps in float64, equal to them in float32
    exact = pixel_metrics(maps, masks, map_threshold=t, exact=True)
    streamed = pixel_metrics(maps, masks, map_threshold=t, exact=False)
    assert exact["dice"] == streamed["dice"] == pytest.approx(2 * 128 / (256 + 128))
