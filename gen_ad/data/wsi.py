"""Whole-slide images: reading (OpenSlide, tiffslide fallback) and tiling into tissue patches.

Tiling plan of :func:`tile_slide`: pick the pyramid level (given, or the best one for a requested
microns-per-pixel), lay a grid of tiles over level 0 (only tiles fully inside the slide), measure
each tile's tissue fraction on a thumbnail tissue mask (:func:`gen_ad.data.tissue.tissue_mask`),
and write the tiles with enough tissue as PNGs plus a ``manifest.csv`` row each. The output
folder's bookkeeping (manifest, per-slide completion records, reuse of finished slides) is in
:mod:`gen_ad.data.tile_records`.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

# the manifest's names, importable from here as before they moved to tile_records
from gen_ad.data.tile_records import MANIFEST_COLUMNS as MANIFEST_COLUMNS
from gen_ad.data.tile_records import MANIFEST_NAME as MANIFEST_NAME
from gen_ad.data.tile_records import PNG_COMPRESS_LEVEL, TileBook, TileRecord, tile_name
from gen_ad.data.tile_records import read_manifest as read_manifest
from gen_ad.data.tile_records import update_manifest as update_manifest
from gen_ad.data.tissue import tissue_mask
from gen_ad.errors import ConfigError, DataError
from gen_ad.utils.io import atomic_path
from gen_ad.utils.lock import folder_lock
from gen_ad.utils.paths import names_a_folder

_LEVEL_TOLERANCE = 0.01  # a level whose downsample is within 1% of the wanted one is used as is
# Plausible level-0 microns per pixel of a microscopy image. Scanners record 0.1-0.5 (80x-20x
# objectives), overview levels reach a few um/px; below 0.01 um/px (10 nm, 20x below the optical
# resolution limit) or above 20 um/px (a 0.5x objective) the value is not a microscope's: most
# often a TIFF's DPI tag (72 dpi = 352.8 um/px, 300 dpi = 84.7, 1200 dpi = 21.2).
MPP_RANGE = (0.01, 20.0)
MPP_AGREEMENT = 0.05  # a --slide-mpp within 5% of a slide's recorded value agrees with it
_THUMB_READ_PIXELS = 1 << 24  # thumbnails of larger levels are built strip by strip


def _rgba_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Composite RGBA (transparent = no scanned data) on white; RGB passes through."""
    rgb = np.array(arr[..., :3], dtype=np.uint8)
    if arr.shape[-1] == 3:
        return rgb
    alpha = arr[..., 3]
    part = alpha < 255
    if part.any():  # composite only the (rare) not fully opaque pixels
        a = alpha[part].astype(np.float32)[:, None] / 255.0
        mixed = rgb[part].astype(np.float32) * a + 255.0 * (1.0 - a)
        rgb[part] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return rgb


class Slide:
    """A whole-slide image opened with OpenSlide, or with tiffslide when OpenSlide cannot.

    Attributes:
        path: the slide file.
        backend: ``openslide`` or ``tiffslide``.
        dimensions: level-0 ``(width, height)``.
        level_dimensions / level_downsamples: per pyramid level.
        mpp: level-0 microns per pixel (mean of x and y), or ``None`` when the file does not
            say or records a value outside :data:`MPP_RANGE` (then ignored with a warning).
        mpp_ignored: the implausible value the file recorded, or ``None``.
    """

    def __init__(self, path: str | os.PathLike[str],
                 backend: Literal["auto", "openslide", "tiffslide"] = "auto", *,
                 warn_mpp: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"slide not found: {self.path}")
        errors: list[str] = []
        order = ("openslide", "tiffslide") if backend == "auto" else (backend,)
        self._osr: Any = None
        for name in order:
            try:
                self._osr = self._open(name)
                self.backend = name
                break
            except Exception as e:  # noqa: BLE001 - any failure means "try the next reader"
                errors.append(f"{name}: {type(e).__name__}: {e}")
        if self._osr is None:
            raise DataError(f"cannot open slide {self.path} ({'; '.join(errors)})")
        self._lock = threading.Lock() if self.backend == "tiffslide" else None
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)  # type: ignore[assignment]
        self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.mpp_ignored: float | None = None
        self.mpp = self._read_mpp(warn_mpp)

    def _open(self, name: str) -> Any:
        if name == "openslide":
            import openslide

            return openslide.OpenSlide(str(self.path))
        if name == "tiffslide":
            import tiffslide

            return tiffslide.TiffSlide(str(self.path))
        raise ValueError(f"unknown slide backend {name!r}")

    def _read_mpp(self, warn: bool) -> float | None:
        props = self._osr.properties
        vals = []
        for axis in ("x", "y"):
            v = props.get(f"{self.backend}.mpp-{axis}")
            try:
                if v is not None and float(v) > 0:
                    vals.append(float(v))
            except (TypeError, ValueError):
                pass
        if not vals:
            return None
        mpp = float(np.mean(vals))
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            self.mpp_ignored = mpp
            if warn:
                warnings.warn(f"{self.path}: ignoring its recorded resolution of {mpp:.4g} um/px "
                          f"(outside the plausible {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px "
                              "of microscopy; often a TIFF's DPI); give the slide's microns per "
                              "pixel (--slide-mpp) where a resolution is needed", RuntimeWarning,
                              stacklevel=3)
            return None
        return mpp

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """Read a region as RGB uint8 ``[h,w,3]`` (unscanned areas are white).

        Args:
            x0, y0: top-left corner in level-0 pixels.
            level: pyramid level to read from.
            w, h: size in pixels of that level.
        """
        if not 0 <= level < self.level_count:
            raise DataError(f"level {level} does not exist in {self.path} "
                            f"(levels 0..{self.level_count - 1})")
        try:
            if self._lock is not None:
                with self._lock:
                    arr = self._tiffslide_region(int(x0), int(y0), level, int(w), int(h))
            else:
                arr = np.asarray(self._osr.read_region((int(x0), int(y0)), level,
                                                       (int(w), int(h))))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read region ({x0}, {y0}) level {level} of {self.path}: "
                            f"{type(e).__name__}: {e}") from e
        if arr.dtype != np.uint8:
            raise DataError(f"{self.path} holds {arr.dtype} pixels; only 8-bit RGB slides are "
                            "supported")
        if arr.shape[-1] == 1:  # grayscale
            arr = np.repeat(arr, 3, axis=-1)
        return _rgba_to_rgb(arr)

    def _tiffslide_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """tiffslide's region with the parts outside the level white (it pads with 0 = black).

        tiffslide maps the level-0 corner to ``int(x0 / downsample)`` at the level; only the
        part inside the level is read and pasted into a white canvas there.
        """
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        rx, ry = int(x0 / ds), int(y0 / ds)
        if 0 <= rx and rx + w <= lw and 0 <= ry and ry + h <= lh:
            return np.asarray(self._osr.read_region((x0, y0), level, (w, h), as_array=True))
        xa, ya = min(max(rx, 0), lw), min(max(ry, 0), lh)
        xb, yb = min(max(rx + w, 0), lw), min(max(ry + h, 0), lh)
        part = np.asarray(self._osr.read_region((x0, y0), level, (w, h), as_array=True,
                                                padding=False))
        canvas = np.full((h, w, part.shape[-1] if part.ndim == 3 else 3), 255, part.dtype)
        if xb > xa and yb > ya:
            canvas[ya - ry:yb - ry, xa - rx:xb - rx] = part.reshape(yb - ya, xb - xa, -1)
        return canvas

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (1% tolerance)."""
        ok = [i for i, d in enumerate(self.level_downsamples)
              if d <= downsample * (1 + _LEVEL_TOLERANCE)]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, max_size: int, max_read_pixels: int = _THUMB_READ_PIXELS) -> np.ndarray:
        """The whole slide as RGB uint8 ``[h,w,3]`` with its longer side at most ``max_size``.

        Read from the best level; a level of more than ``max_read_pixels`` pixels (a large
        single-level file) is read and reduced in horizontal strips, so memory stays bounded.
        """
        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / max_size)
        level = self.best_level(ds)
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        if (tw, th) == (lw, lh):
            return self.read_region(0, 0, level, lw, lh)
        if lw * lh <= max_read_pixels:
            img = self.read_region(0, 0, level, lw, lh)
            return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BICUBIC))
        return self._strip_thumbnail(level, tw, th, max_read_pixels)

    def _strip_thumbnail(self, level: int, tw: int, th: int, max_read_pixels: int) -> np.ndarray:
        """Bicubic ``tw x th`` reduction of a level, computed strip by strip.

        Each strip of output rows is resized from the level rows under it plus a margin as wide
        as the bicubic filter's support, through PIL's ``box``: the same filter weights as
        one resize of the whole level (up to float rounding of the box coordinates).
        """
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        sy = lh / th  # level rows per output row
        margin = math.ceil(2.0 * max(sy, 1.0)) + 2  # bicubic support (2) scaled by the reduction
        rows = max(1, int(max_read_pixels / lw / sy) - 1)  # output rows per strip
        out = np.empty((th, tw, 3), np.uint8)
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            top = max(0, math.floor(r0 * sy) - margin)
            bottom = min(lh, math.ceil(r1 * sy) + margin)
            # ceil: the level-0 row that maps back to level row ``top`` (int(y / ds) in readers)
            strip = self.read_region(0, math.ceil(top * ds), level, lw, bottom - top)
            box = (0.0, r0 * sy - top, float(lw), r1 * sy - top)
            out[r0:r1] = np.asarray(Image.fromarray(strip).resize(
                (tw, r1 - r0), Image.Resampling.BICUBIC, box=box))
        return out

    def close(self) -> None:
        """Release the file."""
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unknown_mpp_error(source: Any, alternative: str = "") -> DataError:
    """The error for a slide or image whose level-0 microns per pixel is unknown (``source``:
    anything with ``path`` and, optionally, ``mpp_ignored``); ``alternative``: what else the
    calling command accepts instead (``"a pyramid level (--level) instead of --mpp"``)."""
    ignored = getattr(source, "mpp_ignored", None)
    why = ("does not record its microns per pixel" if ignored is None else
           f"records an implausible {ignored:.4g} um/px (outside {MPP_RANGE[0]:g}-"
           f"{MPP_RANGE[1]:g}; a TIFF's DPI, perhaps), which is ignored")
    other = f" or {alternative}" if alternative else ""
    return DataError(f"slide {source.path} {why}; give its microns per pixel (--slide-mpp)"
                     f"{other}")


@dataclass(frozen=True)
class SlideMpp:
    """The level-0 microns per pixel used for a slide, and where it came from.

    Attributes:
        value: microns per pixel, or ``None`` when neither the file nor the user gives one.
        source: ``recorded`` (the file's plausible value), ``given`` (``--slide-mpp``, for a
            file recording none, an implausible one, or one within :data:`MPP_AGREEMENT`),
            ``forced`` (``--slide-mpp`` over a differing recorded value, ``--slide-mpp-force``)
            or ``none``.
        recorded: the plausible value the file records, or ``None``.
        given: the value the user gave, or ``None``.
    """

    value: float | None
    source: Literal["recorded", "given", "forced", "none"]
    recorded: float | None
    given: float | None

    def as_json(self) -> dict[str, Any]:
        """``slide_mpp``, ``slide_mpp_source``, ``slide_mpp_recorded``, ``slide_mpp_given``."""
        return {"slide_mpp": self.value, "slide_mpp_source": self.source,
                "slide_mpp_recorded": self.recorded, "slide_mpp_given": self.given}


def check_slide_mpp_force(given: float | None, force: bool) -> None:
    """``--slide-mpp-force`` needs a ``--slide-mpp`` value to force.

    Raises:
        ConfigError: ``force`` without ``given``.
    """
    if force and given is None:
        raise ConfigError("--slide-mpp-force needs --slide-mpp (the value to force)")


def resolve_slide_mpp(slide: Any, given: float | None, force: bool = False,
                      warn: bool = True) -> SlideMpp:
    """The level-0 microns per pixel to use for ``slide`` (anything with ``path`` and ``mpp``).

    ``given`` (``--slide-mpp``) is for slides that record no plausible resolution: where the
    file records a plausible one differing from it by more than :data:`MPP_AGREEMENT`, the
    recorded value is used (with a warning naming both, when ``warn``) unless ``force``.

    Raises:
        ConfigError: ``force`` without a ``given`` value.
    """
    check_slide_mpp_force(given, force)
    recorded = slide.mpp
    if given is None:
        return SlideMpp(recorded, "recorded" if recorded is not None else "none", recorded, None)
    if recorded is None or abs(given - recorded) <= MPP_AGREEMENT * recorded:
        return SlideMpp(given, "given", recorded, given)
    if force:
        return SlideMpp(given, "forced", recorded, given)
    if warn:
        warnings.warn(f"{slide.path}: using its recorded resolution of {recorded:.4g} um/px, not "
                      f"--slide-mpp {given:g} (they differ by more than "
                      f"{MPP_AGREEMENT:.0%}; --slide-mpp applies to slides that record no "
                      "plausible resolution); add --slide-mpp-force to use the given value "
                      "for every slide", RuntimeWarning, stacklevel=2)
    return SlideMpp(recorded, "recorded", recorded, given)


def open_slide(path: str | os.PathLike[str],
               backend: Literal["auto", "openslide", "tiffslide"] = "auto", *,
               warn_mpp: bool = True) -> Slide:
    """Open a whole-slide image (OpenSlide, else tiffslide); DataError if neither can.
    ``warn_mpp=False`` silences the implausible-resolution warning (the caller was given the
    slide's microns per pixel)."""
    return Slide(path, backend, warn_mpp=warn_mpp)


# ----------------------------------------------------------------------------- tiling plan


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one slide lie.

    Attributes:
        level: pyramid level the tiles are read from.
        downsample: level-0 pixels per output pixel (= level downsample, or mpp / slide mpp).
        size: output tile side in pixels.
        read_size: side of the region read at ``level`` (resized to ``size`` when different).
        footprint: tile side in level-0 pixels.
        xs, ys: level-0 coordinates of the grid columns and rows (int64).
    """

    level: int
    downsample: float
    size: int
    read_size: int
    footprint: float
    xs: np.ndarray
    ys: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)``."""
        return len(self.ys), len(self.xs)


def plan_grid(slide: Slide, size: int, level: int | None = None, mpp: float | None = None,
              stride: int | None = None, slide_mpp: float | None = None) -> TileGrid:
    """Choose the level and lay the tile grid.

    Args:
        slide: the open slide.
        size: output tile side in pixels.
        level: read at this level (no resizing); exclusive with ``mpp``.
        mpp: wanted microns per pixel of the output tiles: read at the best level for it and
            resize the region so the tiles have exactly this resolution.
        stride: step between tiles in output pixels (default ``size``: no overlap).
        slide_mpp: level-0 microns per pixel to use instead of the file's (needed when the
            file records none or an implausible one; :func:`resolve_slide_mpp` decides between
            a user's value and the file's).
    Returns:
        The grid of tiles that lie fully inside the slide.
    """
    if level is not None and mpp is not None:
        raise DataError("give either a level or an mpp, not both")
    stride = size if stride is None else stride
    if size < 1 or stride < 1:
        raise DataError(f"tile size and stride must be positive, got {size} and {stride}")
    if mpp is not None:
        base = slide_mpp if slide_mpp is not None else slide.mpp
        if base is None:
            raise unknown_mpp_error(slide, "a pyramid level (--level) instead of --mpp")
        if not (math.isfinite(mpp) and math.isfinite(base) and mpp > 0 and base > 0):
            raise DataError(f"mpp must be a positive number, got {mpp} (slide {base})")
        downsample = mpp / base
        level = slide.best_level(downsample)
    else:
        level = 0 if level is None else level
        if not 0 <= level < slide.level_count:
            raise DataError(f"level {level} does not exist in {slide.path} "
                            f"(levels 0..{slide.level_count - 1})")
        downsample = slide.level_downsamples[level]
    read_size = max(1, round(size * downsample / slide.level_downsamples[level]))
    footprint, step = size * downsample, stride * downsample
    w0, h0 = slide.dimensions

    def starts(extent: int) -> np.ndarray:
        n = math.floor((extent - footprint) / step + 1e-9) + 1 if extent >= footprint else 0
        return np.round(np.arange(n) * step).astype(np.int64)

    return TileGrid(level, downsample, size, read_size, footprint, starts(w0), starts(h0))


def grid_tissue_fractions(mask: np.ndarray, grid: TileGrid,
                          dimensions: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of every grid tile, from a mask covering the whole slide.

    A mask pixel belongs to a tile when its centre (in level-0 coordinates) lies inside the tile's
    level-0 square; a tile smaller than a mask pixel uses the pixel under its corner.

    Args:
        mask: bool ``[h,w]`` over the whole slide (any resolution).
        grid: the tile grid.
        dimensions: level-0 ``(width, height)`` of the slide.
    Returns:
        float64 ``[rows, cols]`` in ``[0, 1]``.
    """
    mh, mw = mask.shape
    sx, sy = dimensions[0] / mw, dimensions[1] / mh
    sat = np.zeros((mh + 1, mw + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def spans(starts: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.ceil(starts / scale - 0.5), 0, n - 1).astype(np.int64)
        hi = np.clip(np.ceil((starts + grid.footprint) / scale - 0.5), 0, n).astype(np.int64)
        return lo, np.maximum(hi, lo + 1)

    x0, x1 = spans(grid.xs.astype(np.float64), sx, mw)
    y0, y1 = spans(grid.ys.astype(np.float64), sy, mh)
    total = (sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / area


# ----------------------------------------------------------------------------- tiling


@dataclass
class TilingSummary:
    """What :func:`tile_slides` did with one slide (``mpp``: level-0 microns per pixel used,
    ``mpp_source``: where it came from, see :class:`SlideMpp`; ``reused``: its finished tiles
    of an earlier run were kept, see :mod:`gen_ad.data.tile_records`)."""

    slide: str
    backend: str
    level: int
    downsample: float
    mpp: float | None
    grid_cells: int
    records: list[TileRecord] = field(default_factory=list)
    mpp_source: str = "recorded"
    reused: bool = False


def _mask_side(dimensions: tuple[int, int], footprint: float) -> int:
    """Thumbnail side for the tissue mask: about 8 mask pixels per tile side, in [512, 4096]."""
    longest = max(dimensions)
    want = math.ceil(longest * 8 / max(footprint, 1.0))
    return int(min(longest, max(512, min(4096, want))))


def _runs(cols: np.ndarray, grid: TileGrid, level_ds: float, max_width: int) -> list[np.ndarray]:
    """Split sorted kept column indices of a row into strips of at most ``max_width`` level px."""
    out: list[np.ndarray] = []
    start = 0
    for i in range(1, len(cols) + 1):
        end_of_run = i == len(cols) or cols[i] != cols[i - 1] + 1
        if not end_of_run:
            width = (grid.xs[cols[i]] - grid.xs[cols[start]]) / level_ds + grid.read_size
            end_of_run = width > max_width
        if end_of_run:
            out.append(cols[start:i])
            start = i
    return out


def _write_png(path: Path, tile: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _tile_run(slide: Slide, grid: TileGrid, row: int, cols: np.ndarray, frac: np.ndarray,
              stem: str, out_dir: Path) -> list[TileRecord]:
    """Read one strip of adjacent tiles, cut it, and write the tiles."""
    lvl_ds = slide.level_downsamples[grid.level]
    x_first, y = int(grid.xs[cols[0]]), int(grid.ys[row])
    offs = [round((int(grid.xs[c]) - x_first) / lvl_ds) for c in cols]
    strip = slide.read_region(x_first, y, grid.level, offs[-1] + grid.read_size, grid.read_size)
    out = []
    for c, off in zip(cols, offs):
        tile = strip[:, off:off + grid.read_size]
        if grid.read_size != grid.size:
            tile = np.asarray(Image.fromarray(tile).resize((grid.size, grid.size),
                                                           Image.Resampling.BICUBIC))
        x = int(grid.xs[c])
        path = out_dir / tile_name(stem, x, y)
        _write_png(path, np.ascontiguousarray(tile))
        out.append(TileRecord(stem, grid.level, x, y, float(frac[row, c]), str(path)))
    return out


def _tile_one(path: str | os.PathLike[str], out_dir: Path, size: int, level: int | None,
              mpp: float | None, min_tissue: float, stride: int | None,
              slide_mpp: float | None, force_slide_mpp: bool, mask_size: int | None,
              workers: int | None, progress: bool,
              prepare: Callable[[Slide, TileGrid, TilingSummary, int], bool] | None = None
              ) -> TilingSummary:
    """Tile one slide; ``prepare(slide, grid, summary, mask side)``, called before any tile is
    cut, returns True when it has filled ``summary.records`` with finished tiles (reused)."""
    if not 0.0 <= min_tissue <= 1.0:
        raise DataError(f"min_tissue must be in [0, 1], got {min_tissue}")
    with open_slide(path, warn_mpp=slide_mpp is None) as slide:
        base = resolve_slide_mpp(slide, slide_mpp, force_slide_mpp)
        grid = plan_grid(slide, size, level=level, mpp=mpp, stride=stride, slide_mpp=base.value)
        stem = slide.path.stem
        summary = TilingSummary(stem, slide.backend, grid.level, grid.downsample, base.value,
                                grid.shape[0] * grid.shape[1], mpp_source=base.source)
        side = mask_size or _mask_side(slide.dimensions, grid.footprint)
        if prepare is not None and prepare(slide, grid, summary, side):
            return summary
        if summary.grid_cells == 0:
            return summary
        frac = grid_tissue_fractions(tissue_mask(slide.thumbnail(side)), grid, slide.dimensions)
        keep = frac >= min_tissue
        level_ds = slide.level_downsamples[grid.level]
        jobs = [(r, run) for r in range(grid.shape[0])
                for run in _runs(np.flatnonzero(keep[r]), grid, level_ds, max_width=4096)]
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=int(keep.sum()), desc=stem, unit="tile", disable=not progress)
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(_tile_run, slide, grid, r, run, frac, stem, out_dir)
                       for r, run in jobs]
            try:
                for fut in futures:
                    recs = fut.result()
                    summary.records.extend(recs)
                    bar.update(len(recs))
            except BaseException:  # Ctrl-C or an error: stop now, not after every queued strip
                for fut in futures:
                    fut.cancel()
                raise
        bar.close()
    return summary


def check_slide_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The stems of ``paths``, once no two share a stem.

    Raises:
        DataError: a stem that cannot name files (empty, ``.``, ``..``), or two slides whose
            stems are equal but for letter case (their tiles would collide on macOS and Windows).
    """
    stems: dict[str, str] = {}
    for p in paths:
        stem, full = Path(p).stem, str(Path(p).resolve())
        if not names_a_folder(stem):
            raise DataError(f"cannot name a tile folder after {p} (its name without the "
                            "extension is empty, '.' or '..'): rename the file")
        if stems.setdefault(stem.casefold(), full) != full:
            raise DataError(f"two slides share the name '{stem}' (letter case aside): "
                            f"{stems[stem.casefold()]} and {full}")
    return [Path(p).stem for p in paths]


def tile_slides(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                size: int, level: int | None = None, mpp: float | None = None,
                min_tissue: float = 0.9, stride: int | None = None,
                slide_mpp: float | None = None, mask_size: int | None = None,
                workers: int | None = None, progress: bool = True,
                force_slide_mpp: bool = False, *, reuse: bool = False,
                keep_others: bool = True,
                log: Callable[[str], None] | None = None) -> list[TilingSummary]:
    """Tile several slides into one folder with one ``manifest.csv`` (see :func:`tile_slide`).

    Each slide gets a completion record once its tiles are published
    (:mod:`gen_ad.data.tile_records`); a slide tiled (again) starts from no record, no manifest
    row and no tile file, so tiles of an interrupted run or of other settings never stay.

    Args:
        reuse: keep the tiles of slides finished earlier with the same settings (an equal
            record and every tile file present) instead of tiling them again.
        keep_others: keep other slides' rows in the manifest (merge); False: the manifest lists
            exactly the slides of this call, written after each slide is finished and last
            (also when interrupted: the finished ones); other slides' files are left alone.
        log: receives one line per slide reused or tiled again (and why).
    Returns:
        One summary per slide, in input order.
    Raises:
        DataError: a slide is missing/unreadable, two slides share a file stem, bad settings,
            ``out_dir`` is a file, or its manifest names a path outside it.
        FolderLockedError: another process is writing ``out_dir``.
    """
    stems = check_slide_names(paths)
    out = Path(out_dir).expanduser()
    summaries = []
    with folder_lock(out, "tile output folder"):
        for p in paths:  # a missing slide stops the run before hours of tiling of the others
            if not Path(p).expanduser().is_file():
                raise DataError(f"slide not found: {Path(p).expanduser()}")
        book = TileBook(out, {"stride": size if stride is None else stride,
                           "min_tissue": min_tissue}, reuse, keep_others, log)
        if not keep_others:
            book.note_unlisted(stems)
        try:
            for p in paths:
                try:
                    s = _tile_one(p, out, size, level, mpp, min_tissue, stride, slide_mpp,
                                  force_slide_mpp, mask_size, workers, progress, book.prepare)
                except BaseException:  # Ctrl-C, SIGTERM, an error: no partial slide stays
                    book.abandon()
                    raise
                book.finish(s)
                summaries.append(s)
        finally:
            if not keep_others:  # interrupted too: the slides finished so far
                book.write_manifest()
    return summaries


def tile_slide(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], size: int,
               level: int | None = None, mpp: float | None = None, min_tissue: float = 0.9,
               stride: int | None = None, slide_mpp: float | None = None,
               mask_size: int | None = None, workers: int | None = None,
               progress: bool = True, force_slide_mpp: bool = False) -> list[TileRecord]:
    """Cut the tissue of a slide into PNG tiles and record them in ``out_dir/manifest.csv``.

    Tiles are named ``<slide stem>_x<x>_y<y>.png`` with ``x, y`` the level-0 top-left corner.
    A tile is kept when its tissue fraction (see :func:`grid_tissue_fractions`) is at least
    ``min_tissue``. The manifest keeps the rows of other slides; this slide's old rows, record
    and tile files (listed or not) are removed first, then its new tiles written, its
    completion record (:mod:`gen_ad.data.tile_records`) and its rows.

    Args:
        path: slide file (anything OpenSlide or tiffslide reads).
        out_dir: output folder.
        size: tile side in output pixels.
        level / mpp / stride: see :func:`plan_grid`.
        slide_mpp / force_slide_mpp: the user's level-0 microns per pixel, used where the slide
            records no plausible one (or ``force_slide_mpp``; see :func:`resolve_slide_mpp`).
        min_tissue: minimum tissue fraction of a kept tile.
        mask_size: thumbnail side for the tissue mask (default: about 8 mask pixels per tile).
        workers: threads reading and writing tiles.
        progress: show a progress bar.
    Returns:
        The written tiles, sorted by ``(y, x)``.
    """
    return tile_slides([path], out_dir, size, level=level, mpp=mpp, min_tissue=min_tissue,
                       stride=stride, slide_mpp=slide_mpp, mask_size=mask_size,
                       workers=workers, progress=progress,
                       force_slide_mpp=force_slide_mpp)[0].records
