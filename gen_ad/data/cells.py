"""Nuclei detection on slides and images, and cell crops centred on each nucleus.

Detection (:func:`detect_nuclei`), on an RGB image at a known resolution: hematoxylin channel by
colour deconvolution (``skimage.color.rgb2hed``), Gaussian smoothing, foreground above Otsu's
threshold of the tissue's hematoxylin (never below a floor, so a nucleus-free field stays empty),
split into nuclei by a watershed of the distance transform seeded at its local maxima, then
filtered by area and solidity. :func:`detect_source` runs it tile by tile over a whole slide (or
an image) at ``NucleusSettings.mpp``, inside the slide's tissue mask
(:func:`gen_ad.data.tissue.tissue_mask`), each nucleus counted in exactly one tile.

Crops (:func:`read_crop`): ``size`` pixels at ``mpp`` microns per pixel, centred on the nucleus,
read from the best pyramid level (the coarsest not coarser than wanted) and resized. Coordinates
are level-0 pixels; a cell at integer ``(x, y)`` is the pixel whose centre is ``(x+0.5, y+0.5)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from gen_ad.data.tissue import otsu_threshold, saturation, tissue_mask
from gen_ad.errors import DataError


class Source(Protocol):
    """What detection and cropping read: a :class:`~gen_ad.data.wsi.Slide` or an
    :class:`ImageSource`."""

    path: Path
    dimensions: tuple[int, int]
    level_downsamples: list[float]
    mpp: float | None

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray: ...

    def best_level(self, downsample: float) -> int: ...

    def thumbnail(self, max_size: int) -> np.ndarray: ...


class ImageSource:
    """A plain image (PNG, JPEG, TIFF...) read like a one-level slide (white outside the image).

    Args:
        path: image file.
        mpp: its microns per pixel (images do not record it reliably), or ``None``.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        from gen_ad.data.folders import read_rgb

        self.path = Path(path).expanduser()
        self.image = read_rgb(self.path)
        h, w = self.image.shape[:2]
        self.dimensions = (int(w), int(h))
        self.level_dimensions = [self.dimensions]
        self.level_downsamples = [1.0]
        self.mpp = mpp
        self.backend = "image"

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``[h,w,3]`` with top-left ``(x0, y0)``; white where outside the image."""
        if level != 0:
            raise DataError(f"level {level} does not exist in {self.path} (levels 0..0)")
        out = np.full((int(h), int(w), 3), 255, np.uint8)
        iw, ih = self.dimensions
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, iw), min(y0 + h, ih)
        if xb > xa and yb > ya:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = self.image[ya:yb, xa:xb]
        return out

    def best_level(self, downsample: float) -> int:
        """Always 0 (one level)."""
        return 0

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The image with its longer side at most ``max_size``."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_size)
        if ds == 1.0:
            return self.image
        size = (max(1, round(w / ds)), max(1, round(h / ds)))
        return np.asarray(Image.fromarray(self.image).resize(size, Image.Resampling.BILINEAR))

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def base_mpp(source: Source, slide_mpp: float | None) -> float:
    """Level-0 microns per pixel: ``slide_mpp`` if given (it overrides the file's value), else
    the file's; DataError if neither."""
    from gen_ad.data.wsi import unknown_mpp_error

    mpp = slide_mpp if slide_mpp is not None else source.mpp
    if mpp is None:
        raise unknown_mpp_error(source)
    if not mpp > 0:
        raise DataError(f"microns per pixel must be positive, got {mpp}")
    return float(mpp)


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class NucleusSettings:
    """Nucleus detection settings (lengths in microns, so they hold at any resolution).

    Attributes:
        mpp: resolution the detection runs at (microns per pixel).
        sigma_um: Gaussian smoothing of the hematoxylin channel.
        threshold: fixed hematoxylin threshold (rgb2hed units); ``None``: Otsu on tissue pixels.
        min_h: lowest threshold Otsu may give (a field without nuclei stays empty).
        min_area_um2 / max_area_um2: kept nucleus areas.
        min_solidity: kept area / convex-hull area (drops ragged fragments).
        min_distance_um: smallest distance between two seeds of the watershed.
        tile: detection tile side in pixels at ``mpp`` (slides are processed tile by tile).
    """

    mpp: float = 0.5
    sigma_um: float = 0.5
    threshold: float | None = None
    min_h: float = 0.015
    min_area_um2: float = 10.0
    max_area_um2: float = 250.0
    min_solidity: float = 0.8
    min_distance_um: float = 3.0
    tile: int = 1024

    def validate(self) -> None:
        """DataError on impossible values."""
        if not (self.mpp > 0 and self.sigma_um >= 0 and self.min_distance_um > 0):
            raise DataError(f"detection mpp, sigma and min distance must be positive: {self}")
        if not 0 <= self.min_area_um2 < self.max_area_um2:
            raise DataError(f"need 0 <= min_area_um2 < max_area_um2: {self}")
        if not 0 <= self.min_solidity <= 1 or self.tile < 64:
            raise DataError(f"min_solidity must be in [0, 1] and tile >= 64: {self}")


@dataclass(frozen=True)
class Nuclei:
    """Detected nuclei: centres ``x, y`` (float64 ``[N]``, pixels; pixel ``i`` spans
    ``[i, i+1)``) and ``area`` (float64 ``[N]``, square pixels of the same image)."""

    x: np.ndarray
    y: np.ndarray
    area: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin by colour deconvolution. uint8 ``[H,W,3]`` -> float32 ``[H,W]``, >= 0."""
    from skimage.color import rgb2hed

    return np.clip(rgb2hed(rgb)[..., 0], 0.0, None).astype(np.float32)


def _threshold(h: np.ndarray, tissue: np.ndarray | None, s: NucleusSettings) -> float:
    if s.threshold is not None:
        return float(s.threshold)
    from skimage.filters import threshold_otsu

    vals = h[tissue] if tissue is not None else h.ravel()
    if vals.size < 2 or float(vals.max()) <= float(vals.min()):
        return max(s.min_h, float(vals.max()) if vals.size else s.min_h)
    return max(s.min_h, float(threshold_otsu(vals)))


def detect_nuclei(rgb: np.ndarray, um_per_px: float, settings: NucleusSettings | None = None,
                  tissue: np.ndarray | None = None) -> Nuclei:
    """Nuclei of one image.

    Args:
        rgb: uint8 ``[H,W,3]``.
        um_per_px: its resolution (areas and distances in ``settings`` are in microns).
        settings: detection settings (``mpp`` and ``tile`` are not used here).
        tissue: optional bool ``[H,W]``: the Otsu threshold is computed on these pixels only
            and nuclei whose centre lies outside are dropped.
    Returns:
        :class:`Nuclei` in pixel coordinates of ``rgb`` (ordered by y then x).
    """
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    s = settings or NucleusSettings()
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise DataError(f"expected uint8 [H,W,3], got {rgb.dtype} {tuple(rgb.shape)}")
    h = hematoxylin(rgb)
    if s.sigma_um > 0:
        h = ndimage.gaussian_filter(h, s.sigma_um / um_per_px)
    fg = ndimage.binary_fill_holes(h > _threshold(h, tissue, s))
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool)) if fg.any() else fg
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, 1.0)
    blobs, _ = ndimage.label(fg)
    min_dist = max(1, int(round(s.min_distance_um / um_per_px)))
    peaks = peak_local_max(dist, min_distance=min_dist, labels=blobs, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    px2 = um_per_px ** 2
    xs, ys, areas = [], [], []
    for r in regionprops(labels):
        if not s.min_area_um2 <= r.area * px2 <= s.max_area_um2 or r.solidity < s.min_solidity:
            continue
        cy, cx = r.centroid
        if tissue is not None and not tissue[int(cy), int(cx)]:
            continue
        xs.append(cx + 0.5)
        ys.append(cy + 0.5)
        areas.append(float(r.area))
    order = np.lexsort((np.asarray(xs), np.asarray(ys))) if xs else np.zeros(0, np.int64)
    return Nuclei(np.asarray(xs, np.float64)[order], np.asarray(ys, np.float64)[order],
                  np.asarray(areas, np.float64)[order])


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def source_tissue(source: Source, max_side: int = 2048,
                  max_threshold: float = 40.0) -> tuple[np.ndarray, float]:
    """Tissue mask of a whole source on a thumbnail: ``(bool [h,w], level-0 px per mask px)``.

    The saturation threshold is Otsu's, as in :func:`~gen_ad.data.tissue.tissue_mask`, but at
    most ``max_threshold``: on a field of view that is nearly all tissue Otsu's cut falls between
    pale stroma and nuclei instead of between glass and tissue (pale H&E stroma has a saturation
    of about 60-90, glass below 15).
    """
    thumb = source.thumbnail(max_side)
    sat = ndimage.median_filter(saturation(thumb), size=3)
    cut = min(max(otsu_threshold(sat), 15.0), max_threshold)
    return tissue_mask(thumb, threshold=cut), source.dimensions[0] / thumb.shape[1]


def _in_mask(mask: np.ndarray, scale: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether level-0 points ``x, y`` lie on ``mask`` (one mask pixel = ``scale`` level-0 px)."""
    mh, mw = mask.shape
    ix = np.clip((x / scale).astype(np.int64), 0, mw - 1)
    iy = np.clip((y / scale).astype(np.int64), 0, mh - 1)
    return mask[iy, ix]


def detect_source(source: Source, settings: NucleusSettings | None = None,
                  slide_mpp: float | None = None, use_tissue: bool = True) -> Nuclei:
    """Nuclei of a whole slide or image, in level-0 pixels (areas in level-0 square pixels).

    Tiles of ``settings.tile`` pixels at ``settings.mpp`` are read with a margin (so nuclei on
    a tile border are whole) and each nucleus is kept by the one tile whose core holds its
    centre. Tiles without tissue are skipped; nuclei outside the tissue mask are dropped.
    """
    s = settings or NucleusSettings()
    s.validate()
    ds = s.mpp / base_mpp(source, slide_mpp)  # level-0 px per detection px
    level = source.best_level(ds)
    lds = source.level_downsamples[level]
    mask, scale = source_tissue(source) if use_tissue else (None, 1.0)
    margin = math.ceil(2.0 * math.sqrt(s.max_area_um2) / s.mpp)  # detection px
    core = s.tile * ds
    w0, h0 = source.dimensions
    found: list[Nuclei] = []
    for ty in range(math.ceil(h0 / core)):
        for tx in range(math.ceil(w0 / core)):
            cx0, cy0 = tx * core, ty * core
            if mask is not None and not _core_has_tissue(mask, scale, cx0, cy0, core):
                continue
            x0, y0 = math.floor(cx0 - margin * ds), math.floor(cy0 - margin * ds)
            sw = min(cx0 + core, w0) + margin * ds - x0  # level-0 px, clipped to the source
            sh = min(cy0 + core, h0) + margin * ds - y0
            nw, nh = max(1, round(sw / ds)), max(1, round(sh / ds))  # detection px
            region = source.read_region(x0, y0, level, max(1, round(sw / lds)),
                                        max(1, round(sh / lds)))
            nuc = detect_nuclei(_resize(region, nw, nh), s.mpp, s)
            x, y = x0 + nuc.x * (sw / nw), y0 + nuc.y * (sh / nh)
            keep = (x >= cx0) & (x < cx0 + core) & (y >= cy0) & (y < cy0 + core)
            keep &= (x < w0) & (y < h0)
            if mask is not None:
                keep &= _in_mask(mask, scale, x, y)
            found.append(Nuclei(x[keep], y[keep], nuc.area[keep] * ds * ds))
    return _concat(found)


def _core_has_tissue(mask: np.ndarray, scale: float, x0: float, y0: float, core: float) -> bool:
    mh, mw = mask.shape
    a, b = int(x0 / scale), min(mw, int(math.ceil((x0 + core) / scale)))
    c, d = int(y0 / scale), min(mh, int(math.ceil((y0 + core) / scale)))
    return bool(mask[c:max(d, c + 1), a:max(b, a + 1)].any())


def _concat(parts: list[Nuclei]) -> Nuclei:
    if not parts:
        return Nuclei(np.zeros(0), np.zeros(0), np.zeros(0))
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    a = np.concatenate([p.area for p in parts])
    order = np.lexsort((x, y))
    return Nuclei(x[order], y[order], a[order])


# ----------------------------------------------------------------------------- crops


@dataclass(frozen=True)
class CropPlan:
    """How crops are read: pyramid ``level``, ``read_size`` there, output ``size``, and the
    crop side in level-0 pixels (``footprint``)."""

    level: int
    read_size: int
    size: int
    footprint: float


def plan_crops(source: Source, size: int, mpp: float, slide_mpp: float | None = None) -> CropPlan:
    """Crops of ``size`` px at ``mpp`` um/px from the best level of ``source``."""
    if size < 1 or not mpp > 0:
        raise DataError(f"crop size and mpp must be positive, got {size} and {mpp}")
    ds = mpp / base_mpp(source, slide_mpp)
    level = source.best_level(ds)
    read = max(1, round(size * ds / source.level_downsamples[level]))
    return CropPlan(level, read, size, size * ds)


def read_crop(source: Source, x: float, y: float, plan: CropPlan) -> np.ndarray:
    """The crop centred on level-0 point ``(x, y)``: the level-0 pixel holding ``(x, y)`` is
    at crop pixel ``[size//2, size//2]`` when read at level 0. Returns uint8 ``[size,size,3]``."""
    x0 = int(math.floor(x - plan.footprint / 2))
    y0 = int(math.floor(y - plan.footprint / 2))
    region = source.read_region(x0, y0, plan.level, plan.read_size, plan.read_size)
    return _resize(region, plan.size, plan.size)


# ----------------------------------------------------------------------------- centroid files


def read_centroids(path: str | os.PathLike[str]) -> tuple[list[str | None], Nuclei]:
    """Cell centres from another tool, in level-0 pixels.

    CSV with columns ``x,y`` (optional ``slide`` and ``area``), or GeoJSON (a FeatureCollection,
    a list of features or one feature) of ``Point``/``MultiPoint`` (one cell per point) or
    ``Polygon``/``MultiPolygon`` (one cell each, at the ring's centroid, with its area), as QuPath
    and CellViT export them. A feature's ``properties.slide`` (if any) names its slide.

    Returns:
        ``(slide of each cell or None, Nuclei)`` with pixel centres taken as given (``area`` NaN
        where unknown).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"centroid file not found: {p}")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() in (".json", ".geojson") or text.lstrip()[:1] in ("{", "["):
        rows = _geojson_points(text, p)
    else:
        rows = _csv_points(text, p)
    if not rows:
        raise DataError(f"{p} holds no cell centres")
    slides = [r[0] for r in rows]
    arr = np.array([r[1:] for r in rows], np.float64)
    if not np.isfinite(arr[:, :2]).all():
        raise DataError(f"{p}: a cell centre is not a finite number")
    return slides, Nuclei(arr[:, 0], arr[:, 1], arr[:, 2])


Row = tuple[str | None, float, float, float]


def _csv_points(text: str, p: Path) -> list[Row]:
    reader = csv.DictReader(text.splitlines())
    cols = {c.strip().lower(): c for c in reader.fieldnames or []}
    if "x" not in cols or "y" not in cols:
        raise DataError(f"{p}: a centroid CSV needs columns x,y (found {reader.fieldnames})")
    rows: list[Row] = []
    for i, r in enumerate(reader, start=2):
        try:
            area = r.get(cols.get("area", ""), "") or "nan"
            rows.append((r.get(cols.get("slide", ""), None) or None, float(r[cols["x"]]),
                         float(r[cols["y"]]), float(area)))
        except (TypeError, ValueError) as e:
            raise DataError(f"{p}:{i}: cannot read x,y ({e})") from e
    return rows


def _geojson_points(text: str, p: Path) -> list[Row]:
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from e
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features") or []  # null: an empty collection
    elif isinstance(doc, dict):
        feats = [doc]
    else:
        feats = doc
    if not isinstance(feats, list):
        raise DataError(f"{p}: not GeoJSON points (a FeatureCollection, a feature or a list of "
                        f"features), got {type(feats).__name__}")
    rows: list[Row] = []
    for f in feats:
        if not isinstance(f, dict):
            raise DataError(f"{p}: GeoJSON features must be objects")
        geom = f.get("geometry", f if "coordinates" in f else None) or {}
        slide = (f.get("properties") or {}).get("slide")
        for x, y, area in _geometry_points(geom, p):
            rows.append((slide, x, y, area))
    return rows


def _geometry_points(geom: dict[str, Any], p: Path) -> list[tuple[float, float, float]]:
    kind, coords = geom.get("type"), geom.get("coordinates")
    try:
        if kind == "Point":
            return [(float(coords[0]), float(coords[1]), math.nan)]
        if kind == "MultiPoint":
            return [(float(c[0]), float(c[1]), math.nan) for c in coords]
        if kind == "Polygon":
            return [_ring_centroid(np.asarray(coords[0], np.float64))]
        if kind == "MultiPolygon":
            return [_ring_centroid(np.asarray(poly[0], np.float64)) for poly in coords]
    except (TypeError, IndexError, ValueError) as e:
        raise DataError(f"{p}: bad {kind} coordinates ({e})") from e
    raise DataError(f"{p}: unsupported GeoJSON geometry {kind!r} (use Point, MultiPoint, "
                    "Polygon or MultiPolygon)")


def _ring_centroid(ring: np.ndarray) -> tuple[float, float, float]:
    """Centroid and area of a polygon ring ``[K,2]`` (shoelace; the vertex mean if degenerate)."""
    x, y = ring[:, 0], ring[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    if abs(a) < 1e-12:
        return float(x.mean()), float(y.mean()), 0.0
    cx = ((x + xn) * cross).sum() / (6 * a)
    cy = ((y + yn) * cross).sum() / (6 * a)
    return float(cx), float(cy), float(abs(a))


# ----------------------------------------------------------------------------- overlay


def overlay(source: Source, nuclei: Nuclei, max_side: int = 2048,
            highlight: np.ndarray | None = None) -> Image.Image:
    """A thumbnail with a ring around each nucleus (green; red where ``highlight`` [N] is True)."""
    thumb = Image.fromarray(source.thumbnail(max_side)).convert("RGB")
    scale = thumb.width / source.dimensions[0]
    draw = ImageDraw.Draw(thumb)
    radius = max(1.5, 3.0 * scale ** 0.5)
    hl = np.zeros(len(nuclei), bool) if highlight is None else np.asarray(highlight, bool)
    for x, y, h in zip(nuclei.x * scale, nuclei.y * scale, hl):
        colour = (230, 20, 20) if h else (20, 200, 60)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour)
    return thumb
