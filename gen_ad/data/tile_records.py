"""Completion records of tiled slides: what defines a slide's tiles, and which tiles it has.

:func:`gen_ad.data.wsi.tile_slides` writes ``<out>/tiled/<slide stem>.json`` once every tile of a
slide is published. It holds a sha256 of everything that defines the tiles: the slide file
(resolved path, size, modification time, sha256 of its first and last MiB), the resolved tiling
(pyramid level, level-0 pixels per output pixel, tile and read size, stride, tissue threshold),
the tissue mask (thumbnail side and :func:`~gen_ad.data.tissue.tissue_mask` settings), the output
format, and gen_ad's version with :data:`TILING_SCHEME`; and the tiles (level-0 corner, tissue
fraction). A run asked to reuse finished slides keeps a slide's tiles only when the hash is equal
and every tile file is there. Tile files are named :func:`tile_name`; :func:`slide_tile_files`
finds all of a slide's files, listed in a manifest or not (an interrupted run leaves unlisted
ones), so a slide is tiled again from an empty start.
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_ad.data.tissue import tissue_mask
from gen_ad.errors import CheckpointError, DataError
from gen_ad.utils.identity import code_record, file_identity, settings_digest
from gen_ad.utils.io import inside, write_text

if TYPE_CHECKING:
    from gen_ad.data.wsi import Slide, TileGrid, TilingSummary

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("slide", "level", "x", "y", "tissue_fraction", "path")
RECORD_FOLDER = "tiled"
# Bump when the tiling code writes other tiles for the same settings (tissue mask algorithm,
# resampling, grid placement): finished slides of earlier code are then tiled again.
TILING_SCHEME = 1
PNG_COMPRESS_LEVEL = 3
_SAMPLE_BYTES = 1 << 20  # the slide file's first and last MiB are hashed (cheap, even for GBs)
_TILE_RE = re.compile(r"^(?P<stem>.+)_x(?P<x>\d+)_y(?P<y>\d+)\.png$")  # stem: all but the suffix
_REASONS = {"slide": "the slide file changed",
            "code": "it was tiled by another gen_ad version or tiling scheme"}


@dataclass(frozen=True)
class TileRecord:
    """One written tile: slide stem, level read, level-0 top-left corner, tissue fraction, file."""

    slide: str
    level: int
    x: int
    y: int
    tissue_fraction: float
    path: str


def tile_name(stem: str, x: int, y: int) -> str:
    """File name of the tile of slide ``stem`` whose level-0 top-left corner is ``(x, y)``."""
    return f"{stem}_x{x}_y{y}.png"


def slide_tile_files(out: str | os.PathLike[str], stem: str) -> list[Path]:
    """Every tile file of slide ``stem`` in ``out`` (named :func:`tile_name`; the stem is all
    but the last ``_x<X>_y<Y>.png``, so slide ``a`` never claims slide ``a_x1_y2``'s tiles)."""
    try:
        entries = list(os.scandir(out))
    except OSError:
        return []
    found = []
    for e in entries:
        m = _TILE_RE.match(e.name)
        if m is not None and m["stem"] == stem and not e.is_dir(follow_symlinks=False):
            found.append(Path(e.path))
    return found


def record_path(out: str | os.PathLike[str], stem: str) -> Path:
    """``<out>/tiled/<stem>.json``."""
    return Path(out) / RECORD_FOLDER / f"{stem}.json"


def _mask_defaults() -> dict[str, Any]:
    params = inspect.signature(tissue_mask).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@functools.lru_cache(maxsize=1)
def _decoders() -> dict[str, str | None]:
    from gen_ad.utils.provenance import package_versions

    names = ("openslide-python", "openslide-bin", "tiffslide", "tifffile", "imagecodecs",
             "pillow")
    return {k: v for k, v in package_versions().items() if k in names}


def tile_settings(slide_path: str | os.PathLike[str], *, backend: str, level: int,
                  downsample: float, size: int, read_size: int, stride: int, min_tissue: float,
                  mask_side: int) -> dict[str, Any]:
    """``{"settings": ..., "settings_sha256": ...}``: everything that defines a slide's tiles
    (resolved values: a ``--slide-mpp`` a slide does not use, or ``--stride`` equal to
    ``--size``, changes nothing), the reader (``backend``) included. Threads and progress bars
    are not settings, nor the decoders' versions or gen_ad's sources and commit (recorded
    beside, :func:`~gen_ad.utils.identity.code_record`: an upgrade or a code edit does not cost
    hours of tiling; :data:`TILING_SCHEME` is bumped when the tiling code changes the tiles;
    ``--fresh`` tiles again)."""
    from gen_ad._version import __version__

    found = {"slide": file_identity(slide_path, sample=_SAMPLE_BYTES), "backend": backend,
             "level": level,
             "downsample": downsample, "size": size, "read_size": read_size, "stride": stride,
             "min_tissue": min_tissue, "tissue_mask": {"side": mask_side, **_mask_defaults()},
             "format": {"ext": "png", "compress_level": PNG_COMPRESS_LEVEL},
             "code": {"gen_ad": __version__, "tiling_scheme": TILING_SCHEME}}
    plain, sha = settings_digest(found)
    return {"settings": plain, "settings_sha256": sha}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    said = [_REASONS[k] for k in keys if k in _REASONS]
    other = [k for k in keys if k not in _REASONS]
    if other:
        said.insert(0, f"it was tiled with other settings ({', '.join(other)})")
    return "; ".join(said) or "its recorded settings differ"


def finished_tiles(out: str | os.PathLike[str], stem: str, settings: dict[str, Any]
                   ) -> tuple[list[tuple[int, int, float]] | None, str]:
    """The tiles ``(x, y, tissue fraction)`` of slide ``stem`` tiled earlier into ``out`` with
    the same :func:`tile_settings`, and ``""``; else ``None`` and why it is tiled (again)
    (``""`` for a slide with neither a record nor tile files in ``out``)."""
    f = record_path(out, stem)
    if not f.is_file():
        n = len(slide_tile_files(out, stem))
        return None, (f"{n} tile file(s) but no completion record: an earlier run was "
                      "interrupted, or an older gen_ad tiled it" if n else "")
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        old, sha = rec["settings"], rec["settings_sha256"]
        tiles = [(int(x), int(y), float(t)) for x, y, t in rec["tiles"]]
        if not isinstance(old, dict):
            raise TypeError("settings is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its completion record {f} is unreadable ({type(e).__name__})"
    if sha != settings["settings_sha256"]:
        return None, _changed(old, settings["settings"])
    missing = sum(not (Path(out) / tile_name(stem, x, y)).is_file() for x, y, _ in tiles)
    if missing:
        return None, f"{missing} of its {len(tiles)} tile files are missing"
    return tiles, ""


def write_record(out: str | os.PathLike[str], stem: str, settings: dict[str, Any],
                 info: dict[str, Any], tiles: Iterable[tuple[int, int, float]]) -> Path:
    """Write slide ``stem``'s completion record (atomically; call once all its tiles are
    published). ``info``: what else to note (reader, mpp used, ...; not compared)."""
    listed = [[int(x), int(y), float(t)] for x, y, t in tiles]
    rec = {"slide": stem, **info, "n_tiles": len(listed), "code": code_record(),
           "decoders": _decoders(), **settings, "tiles": listed}
    path = record_path(out, stem)
    write_text(path, json.dumps(rec, default=str) + "\n")
    return path


def remove_record(out: str | os.PathLike[str], stem: str) -> None:
    """Remove slide ``stem``'s completion record (first, before its tiles change)."""
    record_path(out, stem).unlink(missing_ok=True)


def recorded_elsewhere(out: str | os.PathLike[str], stems: Iterable[str]) -> list[str]:
    """Stems of the slides with a completion record in ``out`` other than ``stems``, sorted."""
    wanted = set(stems)
    folder = Path(out) / RECORD_FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.stem not in wanted)


def _remove_tiles(out: Path, stem: str) -> None:
    for f in slide_tile_files(out, stem):
        f.unlink(missing_ok=True)


class TileBook:
    """The bookkeeping of one :func:`tile_slides` call: per slide, reuse of its finished tiles
    or a clean start (record, manifest rows and every tile file removed, in that order), its
    completion record once tiled, and the manifest."""

    def __init__(self, out: Path, grid: dict[str, Any], reuse: bool, keep_others: bool,
                 log: Callable[[str], None] | None) -> None:
        self.out, self.grid, self.reuse, self.keep_others = out, grid, reuse, keep_others
        self.log: Callable[[str], None] = log or (lambda _msg: None)
        self.done: dict[str, list[TileRecord]] = {}
        self.settings: dict[str, dict[str, Any]] = {}
        self.started: str | None = None  # the slide being tiled from its clean start

    def prepare(self, slide: Slide, grid: TileGrid, summary: TilingSummary, side: int) -> bool:
        """True (``summary.records`` filled) when the slide's finished tiles are reused."""
        stem = summary.slide
        found = tile_settings(slide.path, backend=summary.backend, level=grid.level,
                              downsample=grid.downsample, size=grid.size,
                              read_size=grid.read_size, mask_side=side, **self.grid)
        self.settings[stem] = found
        record = record_path(self.out, stem)
        tiles, why = (finished_tiles(self.out, stem, found) if self.reuse else
                      (None, "--fresh" if record.is_file() else ""))
        if tiles is not None:
            summary.records = [TileRecord(stem, grid.level, x, y, t,
                                          str(self.out / tile_name(stem, x, y)))
                               for x, y, t in tiles]
            summary.reused = True
            self.log(f"tile {stem}: reused ({record} records the same slide file and settings)")
            return True
        if why:
            self.log(f"tile {stem}: tiling again ({why})")
        remove_record(self.out, stem)  # no record, then no listed tile, then no tile at all
        if self.keep_others:
            update_manifest(self.out, [stem], [])
        else:
            self.write_manifest()
        _remove_tiles(self.out, stem)
        self.started = stem
        return False

    def abandon(self) -> None:
        """Remove every tile file of the slide being tiled (interrupted, or failed): nothing of
        it stays unlisted. A slide not yet started keeps its finished tiles."""
        if self.started is not None:
            _remove_tiles(self.out, self.started)
        self.started = None

    def finish(self, s: TilingSummary) -> None:
        """After a slide's last tile is published: its record (when tiled now), its rows."""
        self.started = None
        if not s.reused:
            info = {"backend": s.backend, "level": s.level, "downsample": s.downsample,
                    "mpp": s.mpp, "mpp_source": s.mpp_source, "grid_cells": s.grid_cells}
            write_record(self.out, s.slide, self.settings[s.slide], info,
                         [(r.x, r.y, r.tissue_fraction) for r in s.records])
        self.done[s.slide] = s.records
        if self.keep_others:
            update_manifest(self.out, [s.slide], s.records)

    def write_manifest(self) -> None:
        """The manifest of exactly the slides finished in this call."""
        _write_manifest(self.out, [r for recs in self.done.values() for r in recs])

    def note_unlisted(self, stems: Iterable[str]) -> None:
        """Say which slides tiled earlier into the folder this call will not list."""
        others = recorded_elsewhere(self.out, stems)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            self.log(f"tile: {len(others)} slide(s) tiled earlier into {self.out} are not in "
                     f"this list ({shown}): their tiles stay there, but {MANIFEST_NAME} lists "
                     "only this run's slides (name them again to list them: their finished "
                     "tiles are reused)")


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike[str]) -> list[TileRecord]:
    """Read a tiling manifest (``path`` columns are resolved against the manifest's folder).

    Raises:
        DataError: not a manifest, or a row whose path is absolute or leaves the folder.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest not found: {p}")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise DataError(f"{p} is not a tiling manifest (columns {reader.fieldnames})")
        try:
            return [TileRecord(r["slide"], int(r["level"]), int(r["x"]), int(r["y"]),
                               float(r["tissue_fraction"]), str(inside(p.parent, r["path"])))
                    for r in reader]
        except CheckpointError as e:
            raise DataError(f"manifest {p}: {e}") from e
        except (TypeError, ValueError) as e:
            raise DataError(f"manifest {p} has a malformed row: {e}") from e


def update_manifest(out_dir: str | os.PathLike[str], slides: Sequence[str],
                    records: Sequence[TileRecord]) -> Path:
    """Replace the rows of ``slides`` in ``out_dir/manifest.csv`` by ``records`` (atomically).

    Tile files listed in the old rows of these slides but not in ``records`` are deleted; a
    manifest naming any path outside ``out_dir`` is refused before anything is deleted. Paths are
    stored relative to ``out_dir``. Returns the manifest path.
    """
    out = Path(out_dir)
    manifest = out / MANIFEST_NAME
    old = read_manifest(manifest) if manifest.is_file() else []
    replaced = set(slides)
    new_paths = {str(Path(r.path).resolve()) for r in records}
    for r in old:
        gone = r.slide in replaced and str(Path(r.path).resolve()) not in new_paths
        if gone and Path(r.path).suffix == ".png":  # only tiles, never another kind of file
            Path(r.path).unlink(missing_ok=True)
    return _write_manifest(out, [r for r in old if r.slide not in replaced] + list(records))


def _write_manifest(out: Path, rows: list[TileRecord]) -> Path:
    """Write ``out/manifest.csv`` listing ``rows`` (sorted, paths relative to ``out``)."""
    rows = sorted(rows, key=lambda r: (r.slide, r.y, r.x))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for r in rows:
        rel = os.path.relpath(r.path, out)
        w.writerow([r.slide, r.level, r.x, r.y, f"{r.tissue_fraction:.6f}", Path(rel).as_posix()])
    manifest = out / MANIFEST_NAME
    write_text(manifest, buf.getvalue())
    return manifest
