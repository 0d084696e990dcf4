"""Slide heatmaps: grid placement, erosion over valid cells, top-1% aggregation, overlay."""

from __future__ import annotations

import numpy as np
import pytest

from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.slide import (
    SlideHeatmap,
    aggregate,
    build_heatmap,
    erode_valid,
    heatmap_overlay,
    save_heatmap_overlay,
    slide_score,
)


def test_build_heatmap_places_tiles_and_marks_background_nan() -> None:
    xs = [0, 256, 512, 256]
    ys = [0, 0, 256, 512]
    hm = build_heatmap(xs, ys, [1.0, 2.0, 3.0, 4.0], tile_size=256)
    assert hm.grid.shape == (3, 3)
    assert hm.grid[0, 0] == 1.0 and hm.grid[0, 1] == 2.0 and hm.grid[1, 2] == 3.0
    assert hm.grid[2, 1] == 4.0 and int(hm.valid.sum()) == 4
    dup = build_heatmap([0, 10], [0, 10], [1.0, 5.0], tile_size=256)  # same cell: max kept
    assert dup.grid.shape == (1, 1) and dup.grid[0, 0] == 5.0
    with pytest.raises(DataError):
        build_heatmap([0], [0, 1], [1.0], tile_size=256)
    with pytest.raises(ConfigError):
        build_heatmap([0], [0], [1.0], tile_size=0)


def test_erosion_on_hand_made_heatmap_ignores_background() -> None:
    g = np.full((6, 6), np.nan)
    g[1:4, 1:4] = 1.0  # 3x3 tissue block, background around it
    g[2, 2] = 9.0  # isolated hot tile in the middle: eroded away
    g[5, 5] = 7.0  # lone tile whose neighbours are all background: keeps its value
    out = erode_valid(g)
    assert np.isnan(out[0, 1]) and np.isnan(out[4, 4])
    assert out[2, 2] == 1.0 and out[1, 1] == 1.0
    assert out[5, 5] == 7.0
    hot = g.copy()
    hot[1:4, 1:4] = 9.0  # a cluster survives erosion at its core
    assert erode_valid(hot)[2, 2] == 9.0


def test_top1_percent_and_max_aggregation() -> None:
    v = np.arange(1000, dtype=float)  # top 1 % = 990..999
    assert aggregate(v, "topk", 0.01) == pytest.approx(994.5)
    assert aggregate(v, "max") == 999.0
    assert aggregate(np.array([np.nan, 3.0, 1.0]), "topk") == 3.0  # at least one cell
    with pytest.raises(DataError):
        aggregate(np.array([np.nan]))
    with pytest.raises(ConfigError):
        aggregate(v, "median")


def test_slide_score_erodes_then_aggregates() -> None:
    xs, ys = np.meshgrid(np.arange(4) * 100, np.arange(4) * 100)
    s = np.ones(16)
    s[5] = 50.0  # one isolated hot tile
    hm = build_heatmap(xs.ravel(), ys.ravel(), s, tile_size=100)
    assert slide_score(hm, "max", erosion=1) == 50.0
    assert slide_score(hm, "max") == 1.0


def test_overlay_on_thumbnail(tmp_path) -> None:
    hm = build_heatmap([0, 512], [0, 0], [0.0, 1.0], tile_size=512)  # grid 1x2
    thumb = np.full((40, 40, 3), 200, np.uint8)  # downsample 32: thumbnail covers 1280 px
    out = heatmap_overlay(thumb, hm, downsample=32.0, alpha=0.5)
    assert out.shape == thumb.shape and out.dtype == np.uint8
    assert (out[35, 35] == 200).all()  # outside the grid: bare thumbnail
    assert out[5, 20, 0] > out[5, 5, 0]  # high-score tile is redder than the low one
    save_heatmap_overlay(tmp_path / "o.png", thumb, hm, 32.0)
    assert (tmp_path / "o.png").stat().st_size > 0


def _painted(out: np.ndarray, thumb: np.ndarray, value: float, lo: float, hi: float) -> np.ndarray:
    """``[h,w]`` bool: where an alpha-1 overlay shows the colour of ``value``."""
    from gen_ad.scoring.maps import normalize, overlay

    colour = overlay(thumb[:1, :1], normalize(np.array([[value]]), lo, hi), 1.0)[0, 0]
    return (out == colour).all(-1)


def test_overlapping_tiles_are_drawn_around_their_centres() -> None:
    """Stride 64 < tile 256: the tile with corner (256, 256) covers [256, 512); its cell is
    drawn as the 64 px square around its centre (384, 384), not at its corner."""
    g = np.full((9, 9), np.nan)
    g[4, 4], g[0, 0] = 1.0, 0.0
    hm = SlideHeatmap(g, stride=64, tile_size=256)
    thumb = np.full((768, 768, 3), 128, np.uint8)
    out = heatmap_overlay(thumb, hm, downsample=1.0, alpha=1.0, vmin=0, vmax=1)
    hot = np.argwhere(_painted(out, thumb, 1.0, 0, 1))
    assert hot.min(0).tolist() == [352, 352] and hot.max(0).tolist() == [415, 415]
    assert _painted(out, thumb, 0.0, 0, 1)[96:160, 96:160].all()  # tile (0, 0): centre 128
    assert (out[:96, :96] == 128).all() and (out[160:352, :] == 128).all()


def test_overlay_follows_exact_tile_centres_across_a_long_slide() -> None:
    """A fractional step (0.5 um/px tiles of 224 px, stride 56, from a 0.2425 um/px scan:
    step 115.46 level-0 px) keeps every tile's colour at its centre on a 100k px slide; a
    rounded step (115) would drift by 5 cells by the end of the row."""
    ds = 0.5 / 0.2425
    foot, step = 224 * ds, 56 * ds
    n = int((100_000 - foot) / step) + 1
    xs = np.round(np.arange(n) * step) + foot / 2
    g = np.arange(n, dtype=np.float64)[None, :]
    hm = SlideHeatmap(g, stride=step, tile_size=foot, xs=xs, ys=np.array([foot / 2]))
    down = 25.0
    thumb = np.full((int(foot // down), 4000, 3), 100, np.uint8)
    out = heatmap_overlay(thumb, hm, downsample=down, alpha=1.0, vmin=0, vmax=n - 1)
    row = thumb.shape[0] // 2
    for c in range(0, n, 37):
        px = int(xs[c] // down)
        assert _painted(out[row:row + 1, px:px + 1], thumb, float(c), 0, n - 1).all(), c
    with pytest.raises(DataError, match="tile centres"):
        heatmap_overlay(thumb, SlideHeatmap(g, step, foot, xs=xs[:-1]), down)
