"""``gen-ad cells``: nuclei of slides or images -> one crop per cell, ``cells.csv`` and overlays.

Output layout (``OUT``)::

    crops/<slide>/<slide>_x<X>_y<Y>.png   one crop per cell, centred on level-0 pixel (X, Y)
    cells.csv                             slide,x,y,area,path (area in level-0 px^2, path
                                          relative to OUT; empty area when a centroid file
                                          gives points only)
    overlays/<slide>.png                  the slide's thumbnail with a ring around each cell

Crop names follow the tile convention ``<slide>_x<X>_y<Y>``, so ``gen-ad groups`` reads the slide
of every scored crop from its name. A rerun replaces the crops of the slides it processes.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from gen_ad.data.cells import (
    CropPlan,
    ImageSource,
    Nuclei,
    NucleusSettings,
    Source,
    detect_source,
    overlay,
    plan_crops,
    read_centroids,
    read_crop,
)
from gen_ad.data.folders import IMAGE_EXTENSIONS, is_image_file
from gen_ad.errors import DataError
from gen_ad.utils.io import atomic_path, write_text
from gen_ad.utils.lock import writes_folder
from gen_ad.utils.paths import names_a_folder

if TYPE_CHECKING:
    from gen_ad.data.wsi import Slide

CELLS_CSV = "cells.csv"
CELL_COLUMNS = ("slide", "x", "y", "area", "path")
_PLAIN_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # never whole-slide files


@dataclass(frozen=True)
class CellRecord:
    """One cell: slide, level-0 centre pixel, area (level-0 px^2, NaN if unknown), crop path."""

    slide: str
    x: int
    y: int
    area: float
    path: str


def _inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Slide files, image files, and the images directly inside folders (sorted)."""
    out: list[Path] = []
    for p in map(lambda q: Path(q).expanduser(), paths):
        if p.is_dir():
            imgs = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                          and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not imgs:
                raise DataError(f"no images in {p} (extensions {', '.join(IMAGE_EXTENSIONS)})")
            out.extend(imgs)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"not found: {p}")
    stems: dict[str, Path] = {}
    for p in out:  # outputs are named by stem: letter case alone collides on macOS and Windows
        if not names_a_folder(p.stem):
            raise DataError(f"cannot name outputs after {p} (its name without the extension is "
                            "empty, '.' or '..'): rename the file")
        if stems.setdefault(p.stem.casefold(), p).resolve() != p.resolve():
            raise DataError(f"two inputs share the name '{p.stem}' (letter case aside): "
                            f"{stems[p.stem.casefold()]} and {p}")
    return list(stems.values())


def _open(path: Path, image_mpp: float | None, slide_mpp: float | None) -> ImageSource | Slide:
    """An image (``.png``, ``.jpg``...) or a whole-slide file (``slide_mpp``: the resolution
    the user gave, which makes a file's implausible recorded one no news)."""
    if path.suffix.lower() in _PLAIN_IMAGES and is_image_file(path):
        return ImageSource(path, image_mpp)
    from gen_ad.data.wsi import open_slide

    return open_slide(path, warn_mpp=slide_mpp is None)


def _level0_mpp(src: Source, slide_mpp: float | None, force: bool) -> float | None:
    """The level-0 microns per pixel to use: an image's is the one it was opened with; a
    slide's recorded plausible value wins over a differing ``slide_mpp`` unless ``force``
    (:func:`gen_ad.data.wsi.resolve_slide_mpp`, which warns)."""
    if isinstance(src, ImageSource):
        return slide_mpp
    from gen_ad.data.wsi import resolve_slide_mpp

    return resolve_slide_mpp(src, slide_mpp, force).value


def _given(slides: list[str | None], nuc: Nuclei, stem: str, single: bool) -> Nuclei:
    """The centroid-file cells of one slide (rows without a slide belong to a single input)."""
    names = np.array([s if s is not None else "" for s in slides])
    if single:
        keep = (names == "") | (names == stem)
    else:
        if (names == "").any():
            raise DataError("with several inputs, every centroid row needs a slide (CSV column "
                            "'slide' or GeoJSON property 'slide') naming the input's file stem")
        keep = names == stem
    return Nuclei(nuc.x[keep], nuc.y[keep], nuc.area[keep])


def _unique_pixels(nuc: Nuclei, dims: tuple[int, int]) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Integer centre pixels inside the source, one cell per pixel (first kept)."""
    x, y = np.floor(nuc.x).astype(np.int64), np.floor(nuc.y).astype(np.int64)
    inside = (x >= 0) & (y >= 0) & (x < dims[0]) & (y < dims[1])
    x, y, a = x[inside], y[inside], nuc.area[inside]
    _, first = np.unique(np.stack([y, x], 1), axis=0, return_index=True)
    first = np.sort(first)
    return x[first], y[first], a[first]


def _write_crop(source: Source, plan: CropPlan, x: int, y: int, path: Path) -> None:
    from PIL import Image

    crop = read_crop(source, x + 0.5, y + 0.5, plan)
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _write_crops(source: Source, plan: CropPlan, x: np.ndarray, y: np.ndarray,
                 paths: list[Path], workers: int | None, desc: str, progress: bool) -> None:
    """Write the crops centred on ``(x, y)`` to ``paths`` (``desc``: the bar's label)."""
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(_write_crop, source, plan, int(xi), int(yi), p)
                for xi, yi, p in zip(x, y, paths)]
        try:
            for job in tqdm(jobs, desc=desc, unit="cell", disable=not progress):
                job.result()
        except BaseException:  # Ctrl-C or an error: stop now, not after every queued crop
            for job in jobs:
                job.cancel()
            raise


def _slide_cells(source: Source, nuc: Nuclei, out: Path, plan: CropPlan,
                 workers: int | None, progress: bool) -> list[CellRecord]:
    """Write the crops (and overlay) of one slide. The crops are written into a hidden
    temporary folder that replaces ``crops/<slide>`` as a whole once complete: an interrupted
    run leaves the previous crops (or none), never a mix or a part (patch folders skip hidden
    folders; the next command on ``out`` removes it)."""
    from gen_ad.utils.io import atomic_dir, publish_dir, remove_dir

    stem = source.path.stem
    x, y, area = _unique_pixels(nuc, source.dimensions)
    folder = out / "crops" / stem
    tmp = atomic_dir(folder)
    names = [f"{stem}_x{xi}_y{yi}.png" for xi, yi in zip(x, y)]
    try:
        _write_crops(source, plan, x, y, [tmp / n for n in names], workers, stem, progress)
    except BaseException:
        remove_dir(tmp)
        raise
    publish_dir(tmp, folder)
    img = overlay(source, Nuclei(x + 0.5, y + 0.5, area))
    with atomic_path(out / "overlays" / f"{stem}.png") as tmp:
        img.save(tmp, format="PNG")
    return [CellRecord(stem, int(xi), int(yi), float(a), str(folder / n))
            for xi, yi, a, n in zip(x, y, area, names)]


def read_cells_csv(path: str | os.PathLike[str]) -> list[CellRecord]:
    """Read a ``cells.csv`` (paths resolved against its folder)."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CELL_COLUMNS:
            raise DataError(f"{p} is not a cells table (columns {reader.fieldnames})")
        return [CellRecord(r["slide"], int(r["x"]), int(r["y"]),
                           float(r["area"]) if r["area"] else math.nan, str(p.parent / r["path"]))
                for r in reader]


def write_cells_csv(out: Path, records: Sequence[CellRecord],
                    slides: Sequence[str] = ()) -> Path:
    """``out/cells.csv`` (paths relative to ``out``), written atomically; the rows of slides
    neither in ``records`` nor in ``slides`` (slides redone, even with no cell now) that an
    earlier run wrote are kept."""
    done = {r.slide for r in records} | set(slides)
    old = read_cells_csv(out / CELLS_CSV) if (out / CELLS_CSV).is_file() else []
    rows = sorted([r for r in old if r.slide not in done] + list(records),
                  key=lambda r: (r.slide, r.y, r.x))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CELL_COLUMNS)
    for r in rows:
        area = "" if math.isnan(r.area) else f"{r.area:.1f}"
        w.writerow([r.slide, r.x, r.y, area, Path(os.path.relpath(r.path, out)).as_posix()])
    write_text(out / CELLS_CSV, buf.getvalue())
    return out / CELLS_CSV


@writes_folder("out", "cells output folder")
def cells(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
          mpp: float = 0.25, size: int = 64, slide_mpp: float | None = None,
          force_slide_mpp: bool = False, centroids: str | os.PathLike[str] | None = None,
          settings: NucleusSettings | None = None, workers: int | None = None,
          progress: bool = True) -> list[str]:
    """Detect (or read) the cells of every input and write their crops, table and overlays.

    Args:
        inputs: slide files, image files, or folders of images (each image is one "slide").
        out: output folder (layout in the module docstring).
        mpp / size: crop resolution (microns per pixel) and side (pixels).
        slide_mpp: level-0 microns per pixel of slides that do not record a plausible one, and
            of images (default for images: ``mpp``, i.e. the image is taken to be at the crop
            resolution); ``force_slide_mpp``: use it for slides that record another, too.
        centroids: CSV ``x,y`` or GeoJSON points/polygons from another detector, used instead
            of the built-in detection (coordinates in level-0 pixels).
        settings: built-in detection settings (see :class:`NucleusSettings`).
    Returns:
        One summary line per slide, then the paths of ``cells.csv`` and the overlays.
    """
    from gen_ad.data.wsi import check_slide_mpp_force

    check_slide_mpp_force(slide_mpp, force_slide_mpp)  # up front: images alone never ask
    root = Path(out).expanduser()
    paths = _inputs(inputs)
    given = read_centroids(centroids) if centroids is not None else None
    records: list[CellRecord] = []
    lines: list[str] = []
    for p in paths:
        with _open(p, slide_mpp if slide_mpp is not None else mpp, slide_mpp) as src:
            base = _level0_mpp(src, slide_mpp, force_slide_mpp)
            plan = plan_crops(src, size, mpp, base)
            if given is not None:
                nuc = _given(given[0], given[1], p.stem, single=len(paths) == 1)
                how = f"from {Path(centroids).name}"  # type: ignore[arg-type]
            else:
                nuc = detect_source(src, settings, base)
                how = "detected"
            recs = _slide_cells(src, nuc, root, plan, workers, progress)
            write_cells_csv(root, recs, [p.stem])  # per slide: a kill keeps finished slides
            records.extend(recs)
            lines.append(f"{p.stem}: {len(recs)} cells {how}; {size}px crops at {mpp:g} um/px "
                         f"from level {plan.level} ({plan.read_size}px read)")
    lines.append(f"cells: {root / CELLS_CSV}; crops: {root / 'crops'}; overlays: "
                 f"{root / 'overlays'}")
    return lines
