"""Slide-level heatmaps and scores from per-tile scores (Song et al. 2025 evaluation protocol).

Tiles are placed on a grid by their level-0 top-left coordinates: cell ``(row, col) =
(y // stride, x // stride)`` with ``stride`` = the tile step in level-0 pixels (default: the tile
size). Cells without a tile (background, no tissue) are ``NaN``. On an overlay each cell is
painted over a ``stride``-wide square centred on its tile's centre (the exact level-0 centres
when the heatmap carries them), so overlapping tiles show where they are. The heatmap is
smoothed with a 3x3 grey erosion over valid cells only (an isolated high tile is removed, a
cluster survives), and the slide score is the maximum, or the mean of the top 1 %, of the
valid (smoothed) cells. All functions are pure numpy; the loop that scores tiles belongs to the
evaluation code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.maps import normalize, overlay, save_png


@dataclass
class SlideHeatmap:
    """Per-tile scores on the slide grid.

    Attributes:
        grid: ``[rows, cols]`` float64, ``NaN`` where there is no tile.
        stride: level-0 pixels per grid cell (the tile step; may be fractional).
        tile_size: tile size in level-0 pixels.
        xs, ys: optional level-0 centres of the tiles of each column ``[cols]`` and row
            ``[rows]``; default ``i * stride + tile_size / 2``.
    """

    grid: np.ndarray
    stride: float
    tile_size: float
    xs: np.ndarray | None = None
    ys: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """``[rows, cols]`` bool, True where a tile was scored."""
        return np.isfinite(self.grid)

    def centres(self, axis: int) -> np.ndarray:
        """Level-0 tile centres along ``axis`` (0: rows -> y, 1: columns -> x), float64."""
        given = self.ys if axis == 0 else self.xs
        n = self.grid.shape[axis]
        if given is None:
            return np.arange(n) * float(self.stride) + float(self.tile_size) / 2.0
        c = np.asarray(given, np.float64).reshape(-1)
        if c.size != n:
            raise DataError(f"{c.size} tile centres for {n} heatmap "
                            f"{'rows' if axis == 0 else 'columns'}")
        return c


def _np1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name} contains NaN or infinite values")
    return a


def build_heatmap(xs: Any, ys: Any, scores: Any, tile_size: int, stride: int | None = None,
                  shape: tuple[int, int] | None = None) -> SlideHeatmap:
    """Place tile scores on the slide grid.

    Args:
        xs, ys: ``[N]`` level-0 top-left coordinates of the tiles.
        scores: ``[N]`` tile scores.
        tile_size: tile size in level-0 pixels.
        stride: grid step in level-0 pixels (default ``tile_size``). Tiles falling into the same
            cell (overlapping tiling) keep the maximum score.
        shape: optional ``(rows, cols)`` of the grid (e.g. from the slide size); default: just
            large enough for the tiles.
    Returns:
        A :class:`SlideHeatmap`.
    """
    x, y, s = _np1d(xs, "x"), _np1d(ys, "y"), _np1d(scores, "scores")
    if not (x.size == y.size == s.size) or s.size == 0:
        raise DataError(f"need equal, non-zero numbers of x, y and scores; got {x.size}, "
                        f"{y.size}, {s.size}")
    step = int(stride or tile_size)
    if tile_size <= 0 or step <= 0:
        raise ConfigError(f"tile_size and stride must be positive, got {tile_size}, {step}")
    if (x < 0).any() or (y < 0).any():
        raise DataError("tile coordinates must be >= 0")
    col, row = (x // step).astype(np.int64), (y // step).astype(np.int64)
    rows, cols = (int(row.max()) + 1, int(col.max()) + 1) if shape is None else shape
    if row.max() >= rows or col.max() >= cols:
        raise DataError(f"tiles fall outside the {rows}x{cols} grid")
    flat = np.full(rows * cols, -np.inf)
    np.maximum.at(flat, row * cols + col, s)
    grid = np.where(np.isneginf(flat), np.nan, flat).reshape(rows, cols)
    return SlideHeatmap(grid=grid, stride=step, tile_size=int(tile_size))


def erode_valid(grid: np.ndarray, k: int = 3) -> np.ndarray:
    """Grey erosion of a heatmap over valid cells: each valid cell becomes the minimum of the
    valid cells in its ``k x k`` neighbourhood; ``NaN`` cells stay ``NaN`` and are ignored.

    Args:
        grid: ``[rows, cols]`` with ``NaN`` for missing tiles.
        k: odd window size.
    Returns:
        ``[rows, cols]`` eroded grid.
    """
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2:
        raise DataError(f"heatmap must be 2-D, got shape {g.shape}")
    if k < 1 or k % 2 == 0:
        raise ConfigError(f"erosion size must be a positive odd integer, got {k}")
    r = k // 2
    padded = np.pad(np.where(np.isnan(g), np.inf, g), r, constant_values=np.inf)
    out = sliding_window_view(padded, (k, k)).min(axis=(-2, -1))
    return np.where(np.isnan(g), np.nan, out)


def aggregate(values: Any, reduce: str = "max", frac: float = 0.01) -> float:
    """Slide score from cell (or tile) scores, ignoring ``NaN``.

    Args:
        values: scores of any shape.
        reduce: ``"max"`` or ``"topk"`` (mean of the top ``frac`` valid values, at least one).
        frac: fraction for ``topk`` in ``(0, 1]`` (default 1 %).
    Returns:
        The slide score.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise DataError("no valid tile scores to aggregate")
    if reduce == "max":
        return float(v.max())
    if reduce == "topk":
        if not 0.0 < frac <= 1.0:
            raise ConfigError(f"frac must be in (0, 1], got {frac}")
        k = max(1, int(math.ceil(frac * v.size)))
        return float(np.partition(v, v.size - k)[v.size - k:].mean())
    raise ConfigError(f"unknown slide aggregation '{reduce}' (choose max or topk)")


def slide_score(heatmap: SlideHeatmap, reduce: str = "max", frac: float = 0.01,
                erosion: int = 3) -> float:
    """Slide score: erode the heatmap (``erosion`` = window size, 0/1 = none), then aggregate."""
    g = erode_valid(heatmap.grid, erosion) if erosion > 1 else heatmap.grid
    return aggregate(g, reduce=reduce, frac=frac)


def heatmap_overlay(thumbnail: np.ndarray, heatmap: SlideHeatmap, downsample: float,
                    alpha: float = 0.5, vmin: float | None = None,
                    vmax: float | None = None) -> np.ndarray:
    """Colour the heatmap over a slide thumbnail.

    Args:
        thumbnail: ``[h,w,3]`` uint8 thumbnail of the slide.
        heatmap: the grid (level-0 geometry): each cell colours the thumbnail pixels whose
            centre is nearest to its tile's centre, up to ``stride / 2`` beyond the outer tiles.
        downsample: level-0 pixels per thumbnail pixel.
        alpha: overlay weight; cells without tiles show the bare thumbnail.
        vmin, vmax: colour range (default: the heatmap's valid min/max).
    Returns:
        ``[h,w,3]`` uint8.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[-1] != 3 or thumb.dtype != np.uint8:
        raise DataError(f"thumbnail must be uint8 [h,w,3], got {thumb.shape} {thumb.dtype}")
    if downsample <= 0:
        raise ConfigError(f"downsample must be positive, got {downsample}")
    if not heatmap.valid.any():
        raise DataError("heatmap has no scored tiles")
    h, w = thumb.shape[:2]
    rows = _cells_of((np.arange(h) + 0.5) * downsample, heatmap.centres(0), heatmap.stride)
    cols = _cells_of((np.arange(w) + 0.5) * downsample, heatmap.centres(1), heatmap.stride)
    inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    up = heatmap.grid[np.maximum(rows, 0)[:, None], np.maximum(cols, 0)[None, :]]
    up = np.where(inside, up, np.nan)
    lo = float(np.nanmin(heatmap.grid)) if vmin is None else float(vmin)
    hi = float(np.nanmax(heatmap.grid)) if vmax is None else float(vmax)
    return overlay(thumb, normalize(up, lo, hi), alpha)  # NaN cells keep the thumbnail


def _cells_of(pos: np.ndarray, centres: np.ndarray, step: float) -> np.ndarray:
    """Cell index of each level-0 position: the tile centre it is nearest to, within the span
    ``[first centre - step/2, last centre + step/2)``; ``-1`` outside."""
    half = float(step) / 2.0
    edges = np.concatenate([[centres[0] - half], (centres[1:] + centres[:-1]) / 2.0,
                            [centres[-1] + half]])
    idx = np.searchsorted(edges, pos, side="right") - 1
    return np.where((idx >= 0) & (idx < centres.size), idx, -1).astype(np.int64)


def save_heatmap_overlay(path: str | os.PathLike[str], thumbnail: np.ndarray,
                         heatmap: SlideHeatmap, downsample: float, **kwargs: Any) -> None:
    """Write :func:`heatmap_overlay` as a PNG (atomically); kwargs go to it."""
    save_png(path, heatmap_overlay(thumbnail, heatmap, downsample, **kwargs))
