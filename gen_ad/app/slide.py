"""Slide-level scoring: tile a slide, score every tile with any scorer, heatmap and slide score.

``gen-ad slide SLIDE --run RUN|--bank BANK [--method M] --out DIR`` runs :func:`score_slide`:
tiles of the slide's tissue (:func:`gen_ad.data.wsi.tile_slide`) are scored in batches through
the one :class:`~gen_ad.scoring.base.AnomalyScorer` interface, placed on the tile grid
(:func:`gen_ad.scoring.slide.build_heatmap`), smoothed by a 3x3 erosion over valid cells, and
reduced to a slide score (maximum, and mean of the top 1 %). Outputs in ``out/<slide stem>/``:
``tiles.csv`` (every tile's corner, grid cell and score), ``heatmap.npy`` (raw grid, NaN where
there is no tissue tile), ``overlay.png`` (eroded heatmap over the thumbnail),
``overlay_raw.png``, ``slide.json`` (scores and settings) and the evaluation engine's
``scores.csv`` / ``flagged.csv`` / ``metrics.json``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from gen_ad.app.evaluate import (
    calibrate_scorer,
    load_scorer,
    normal_dataset,
    resolve_device,
    score_dataset,
    write_outputs,
)
from gen_ad.app.score import clear_outputs
from gen_ad.errors import CheckpointError, ConfigError, DataError
from gen_ad.scoring.base import AnomalyScorer, batch_dependent
from gen_ad.scoring.thresholds import Threshold
from gen_ad.utils.identity import code_identity, code_record, settings_changed, settings_digest
from gen_ad.utils.identity import file_identity as _file_identity
from gen_ad.utils.io import atomic_path, write_json, write_text
from gen_ad.utils.lock import writes_folder

if TYPE_CHECKING:
    from gen_ad.scoring.slide import SlideHeatmap

SLIDE_JSON = "slide.json"
_OUTPUT_FILES = ("overlay", "overlay_raw", "heatmap", "tiles", "scores")
_NOT_SETTINGS = ("batch_size", "device", "progress")  # how fast, not what is computed
# tiling flags: the settings hold what they resolve to per slide (SlidePlan), not the flags
_TILING_FLAGS = ("level", "mpp", "stride", "slide_mpp", "force_slide_mpp")


class TileSet(Dataset):
    """Tiles (PNG files) of one slide as dataset items ``{"image", "label": 0, "path", "cls"}``;
    unlabelled (:attr:`labelled`: the 0 says nothing; annotations label tiles elsewhere)."""

    labelled = False

    def __init__(self, paths: list[str], size: int, slide: str) -> None:
        self.paths, self.size, self.slide = paths, size, slide

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from gen_ad.data.folders import load_image

        return {"image": load_image(self.paths[i], self.size), "label": 0,
                "path": self.paths[i], "cls": self.slide}


def _grid_cells(xs: np.ndarray, ys: np.ndarray, grid: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row/column of each tile on the tiling grid (exact, whatever the level-0 step)."""
    cols = np.searchsorted(grid.xs, xs)
    rows = np.searchsorted(grid.ys, ys)
    ok = (cols < len(grid.xs)) & (rows < len(grid.ys))
    if not ok.all() or not (np.all(grid.xs[cols] == xs) and np.all(grid.ys[rows] == ys)):
        raise DataError("tile coordinates do not match the slide's tiling grid")
    return rows, cols


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _tiles_csv(recs: list[Any], rows: np.ndarray, cols: np.ndarray, scores: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["x", "y", "row", "col", "score", "path"])
    for r, i, j, s in zip(recs, rows, cols, scores):
        w.writerow([r.x, r.y, int(i), int(j), repr(float(s)), r.path])
    return buf.getvalue()


def _slide_scores(hm: SlideHeatmap, erosion: int, frac: float) -> dict[str, float]:
    """Max and top-``frac`` slide scores of the eroded heatmap, and of the raw one."""
    from gen_ad.scoring.slide import slide_score

    return {"score_max": slide_score(hm, "max", erosion=erosion),
            "score_top1pct": slide_score(hm, "topk", frac=frac, erosion=erosion),
            "score_max_raw": slide_score(hm, "max", erosion=1),
            "score_top1pct_raw": slide_score(hm, "topk", frac=frac, erosion=1)}


def _write_maps(dest: Path, hm: SlideHeatmap, thumb: np.ndarray, thumb_ds: float,
                erosion: int) -> dict[str, str]:
    """Overlays of the eroded and raw heatmap on one colour scale, and the raw grid as .npy."""
    from gen_ad.scoring.slide import erode_valid, save_heatmap_overlay

    eroded = replace(hm, grid=erode_valid(hm.grid, erosion) if erosion > 1 else hm.grid)
    lo, hi = float(np.nanmin(hm.grid)), float(np.nanmax(hm.grid))
    save_heatmap_overlay(dest / "overlay.png", thumb, eroded, thumb_ds, vmin=lo, vmax=hi)
    save_heatmap_overlay(dest / "overlay_raw.png", thumb, hm, thumb_ds, vmin=lo, vmax=hi)
    _save_npy(dest / "heatmap.npy", hm.grid)
    return {"overlay": str(dest / "overlay.png"), "overlay_raw": str(dest / "overlay_raw.png"),
            "heatmap": str(dest / "heatmap.npy")}


def score_slide(slide_path: str | os.PathLike[str], scorer: AnomalyScorer,
                out: str | os.PathLike[str], *, size: int, level: int | None = None,
                mpp: float | None = None, slide_mpp: float | None = None,
                force_slide_mpp: bool = False,
                stride: int | None = None, min_tissue: float = 0.5, batch_size: int = 32,
                device: str = "cpu", frac: float = 0.01, erosion: int = 3,
                thumbnail_size: int = 1024, tile_dir: str | os.PathLike[str] | None = None,
                threshold: float | Threshold | None = None, method: str | None = None,
                progress: bool = True, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tile a slide, score every tile, build the heatmap, slide scores and overlays.

    Args:
        slide_path: the slide file.
        scorer: any (fitted) scorer; tiles are given to it at ``size`` x ``size``.
        out: output folder (results go to ``out/<slide stem>/``).
        size / level / mpp / stride / min_tissue: tiling (see :func:`gen_ad.data.wsi.plan_grid`).
        slide_mpp / force_slide_mpp: the user's level-0 microns per pixel, used where the slide
            records no plausible one, or always with ``force_slide_mpp``
            (:func:`gen_ad.data.wsi.resolve_slide_mpp`); ``slide.json`` records the value used
            and its source.
        batch_size / device: scoring.
        frac: top fraction for the ``topk`` slide score (default 1 %).
        erosion: erosion window on the heatmap (3 = 3x3; 1 = none).
        thumbnail_size: longer side of the overlay thumbnail.
        tile_dir: where tiles are written (default ``out/<stem>/tiles``).
        threshold: optional tile threshold (value or calibrated); adds the fraction of flagged
            tiles. Every tile is also in ``scores.csv``, the evaluation engine's format.
        method: label of the scorer recorded in ``slide.json`` (default: ``scorer.name``).
        record: further entries for ``slide.json`` (e.g. :func:`slide_settings`).
    ``slide.json`` is removed first and written last: a slide whose scoring was interrupted
    has none, so its other files are never taken for a finished slide.

    Returns:
        The ``slide.json`` record (``score_max``, ``score_top1pct``, raw variants, paths, ...).
    """
    from gen_ad.data.wsi import open_slide, plan_grid, resolve_slide_mpp, tile_slide
    from gen_ad.scoring.slide import SlideHeatmap, build_heatmap

    stem = Path(slide_path).stem
    dest = Path(out) / stem
    (dest / SLIDE_JSON).unlink(missing_ok=True)  # the completion mark: written again last
    recs = tile_slide(slide_path, tile_dir or dest / "tiles", size, level=level, mpp=mpp,
                      min_tissue=min_tissue, stride=stride, slide_mpp=slide_mpp,
                      force_slide_mpp=force_slide_mpp, progress=progress)
    if not recs:
        raise DataError(f"no tile of {slide_path} reaches the tissue fraction {min_tissue}; "
                        "lower --min-tissue or the tile size")
    with open_slide(slide_path, warn_mpp=False) as slide:  # tiling warned already
        base = resolve_slide_mpp(slide, slide_mpp, force_slide_mpp, warn=False)
        grid = plan_grid(slide, size, level=level, mpp=mpp, stride=stride, slide_mpp=base.value)
        thumb = slide.thumbnail(thumbnail_size)
        thumb_ds = slide.dimensions[0] / thumb.shape[1]
    scored = score_dataset(scorer, TileSet([r.path for r in recs], size, stem),
                           batch_size=batch_size, device=device, keep_maps=False,
                           progress=progress)
    rows, cols = _grid_cells(np.array([r.x for r in recs]), np.array([r.y for r in recs]), grid)
    cells = build_heatmap(cols, rows, scored.scores, tile_size=1, stride=1, shape=grid.shape)
    half = grid.footprint / 2.0  # each cell drawn around its tile's exact level-0 centre
    hm = SlideHeatmap(cells.grid, stride=grid.footprint * (stride or size) / size,
                      tile_size=grid.footprint, xs=grid.xs + half, ys=grid.ys + half)
    outputs = _write_maps(dest, hm, thumb, thumb_ds, erosion)
    write_text(dest / "tiles.csv", _tiles_csv(recs, rows, cols, scored.scores))
    thr = Threshold(float(threshold), "given") if isinstance(threshold, (int, float)) \
        else threshold
    label = method or scorer.name
    clear_outputs(dest)  # e.g. no stale flagged.csv when this run has no threshold
    write_outputs(dest, scored, None, method=label, threshold=thr)  # scores.csv, flagged.csv
    rec: dict[str, Any] = {
        "slide": str(slide_path), "method": label, "n_tiles": len(recs),
        "grid": list(grid.shape),
        "level": grid.level, **base.as_json(), "tile_size": size,
        "tile_footprint_level0": grid.footprint,
        "erosion": erosion, "top_fraction": frac, **_slide_scores(hm, erosion, frac),
        "ms_per_tile": scored.ms_per_image,
        "outputs": {**outputs, "tiles": str(dest / "tiles.csv"),
                    "scores": str(dest / "scores.csv")},
    }
    if thr is not None:
        rec["threshold"] = thr.value
        rec["flagged_fraction"] = float(thr.apply(scored.scores).mean())
    rec.update(record or {})
    write_json(dest / SLIDE_JSON, rec)  # last: a slide.json means every output is complete
    return rec


@dataclass(frozen=True)
class SlidePlan:
    """A slide's tiling, resolved before any slide is scored: the level-0 microns per pixel
    used (``None``: unknown, fine without ``--mpp``) and the tile grid's pyramid level, level-0
    pixels per tile pixel, side read at that level and step (tile pixels)."""

    path: str
    slide_mpp: float | None
    level: int
    downsample: float
    read_size: int
    stride: int

    def settings(self, size: int) -> dict[str, Any]:
        """What the tiles depend on, for :func:`slide_settings` (resolved values: a
        ``--slide-mpp`` the slide does not use changes nothing)."""
        return {"size": size, "level": self.level, "downsample": self.downsample,
                "read_size": self.read_size, "stride": self.stride,
                "slide_mpp": self.slide_mpp}


class _UnknownMpp(DataError):
    """A slide whose microns per pixel ``--mpp`` needs is unknown (no advice: said once)."""

    def __init__(self, slide: Any) -> None:
        from gen_ad.data.wsi import MPP_RANGE

        ignored = slide.mpp_ignored
        super().__init__(f"slide {slide.path} does not record its microns per pixel"
                         if ignored is None else f"slide {slide.path} records an implausible "
                         f"{ignored:.4g} um/px (outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g}, "
                         "ignored)")


def _plan_one(path: str, size: int, level: int | None, mpp: float | None, stride: int | None,
              slide_mpp: float | None, force_slide_mpp: bool) -> SlidePlan:
    """Open ``path``, resolve its microns per pixel and grid, and decode a few pixels where
    the tiles will be read (a slide that opens may still lack a codec, e.g. JPEG 2000)."""
    from gen_ad.data.wsi import open_slide, plan_grid, resolve_slide_mpp

    with open_slide(path, warn_mpp=slide_mpp is None) as slide:
        base = resolve_slide_mpp(slide, slide_mpp, force_slide_mpp)
        if mpp is not None and base.value is None:
            raise _UnknownMpp(slide)
        grid = plan_grid(slide, size, level=level, mpp=mpp, stride=stride, slide_mpp=base.value)
        if grid.shape[0] * grid.shape[1] == 0:
            w, h = slide.dimensions
            raise DataError(f"slide {slide.path} ({w} x {h} level-0 px) is smaller than one tile "
                            f"({grid.footprint:.0f} level-0 px)")
        slide.read_region(int(grid.xs[0]), int(grid.ys[0]), grid.level, 8, 8)
    return SlidePlan(str(path), base.value, grid.level, grid.downsample, grid.read_size,
                     size if stride is None else stride)


def plan_slides(paths: Sequence[str], size: int, *, level: int | None = None,
                mpp: float | None = None, stride: int | None = None,
                slide_mpp: float | None = None, force_slide_mpp: bool = False,
                **_: Any) -> list[SlidePlan]:
    """Every slide's :class:`SlidePlan`, checked before any slide is scored: it exists, opens,
    its pixels decode, its microns per pixel is known where ``--mpp`` needs it, the level
    exists and one tile fits; other keywords (scoring settings) are ignored.

    Raises:
        ConfigError: ``force_slide_mpp`` without ``slide_mpp``.
        DataError: one error naming every slide that cannot be scored.
    """
    from gen_ad.data.wsi import check_slide_mpp_force

    check_slide_mpp_force(slide_mpp, force_slide_mpp)
    plans: list[SlidePlan] = []
    bad: list[str] = []
    mpp_unknown = False
    for p in paths:
        try:
            plans.append(_plan_one(p, size, level, mpp, stride, slide_mpp, force_slide_mpp))
        except DataError as e:
            bad.append(f"({len(bad) + 1}) {e}")
            mpp_unknown |= isinstance(e, _UnknownMpp)
    if bad:
        hint = ("; give the level-0 microns per pixel of slides that record none (--slide-mpp) "
                "or a pyramid level (--level) instead of --mpp" if mpp_unknown else "")
        raise DataError(f"{len(bad)} of {len(paths)} slide(s) cannot be scored, so none was: "
                        f"{'; '.join(bad)}{hint}")
    return plans


def scorer_identity(run: str | os.PathLike[str] | None,
                    bank: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What the scores depend on in a run's export or a bank: the sha256 of its manifest
    (``model/manifest.json``, which hashes every weight file) or of ``bank.json`` (shards,
    count, threshold); an export without a manifest is identified by its files' sizes and times."""
    from gen_ad.training.runs import find_model_dir
    from gen_ad.utils.io import sha256_file, unique_tag

    if bank is not None:
        folder = Path(bank).expanduser().resolve()
    else:  # a run folder or its model/ folder, as load_run takes them
        try:
            folder = find_model_dir(Path(str(run)).expanduser()).resolve()
        except CheckpointError:  # no export to identify (a scorer loaded another way)
            folder = (Path(str(run)).expanduser() / "model").resolve()
    marker = folder / ("bank.json" if bank is not None else "manifest.json")
    if marker.is_file():
        return {"folder": str(folder), "sha256": sha256_file(marker)}
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if not files:  # nothing identifies the scorer: never reuse a slide scored by it
        return {"folder": str(folder), "unidentified": unique_tag()}
    return {"folder": str(folder), "files": [_file_identity(p) for p in files]}


def slide_settings(slide_path: str | os.PathLike[str], scorer: dict[str, Any],
                   threshold: Threshold | None, **settings: Any) -> dict[str, Any]:
    """``{"settings": ..., "settings_sha256": ...}`` for ``slide.json``: the slide file, the
    scorer (:func:`scorer_identity`, method, options, calibration), the threshold, gen_ad's
    version and sources (``code``: :func:`~gen_ad.utils.identity.code_identity`) and every
    tiling/scoring setting (the tiling as resolved: :meth:`SlidePlan.settings`); a later run
    reuses the slide's outputs only when this is equal, and names the keys that differ."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in _NOT_SETTINGS}
    found = {"slide": _file_identity(slide_path), "scorer": scorer,
             "threshold": threshold.to_dict() if threshold is not None else None,
             "code": code_identity(), **kept}
    plain, sha = settings_digest(found)  # as it reads back from slide.json
    return {"settings": plain, "settings_sha256": sha}


def finished_slide(dest: Path, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The ``slide.json`` record of a slide scored earlier with the same settings (its output
    paths pointed into ``dest``) and ``""``; else ``None`` and why it is scored (again)."""
    import json

    f = dest / SLIDE_JSON
    if not f.is_file():
        started = dest.is_dir() and any(dest.iterdir())
        return None, "an earlier run was interrupted before finishing it" if started else ""
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{f} is unreadable"
    if "settings" not in rec:
        return None, "its slide.json does not record the settings it was scored with"
    changed = settings_changed(rec, settings, "scored")
    if changed:
        return None, changed
    outputs = {**rec["outputs"], **{k: str(dest / Path(rec["outputs"][k]).name)
                                    for k in _OUTPUT_FILES}}
    if not all(Path(p).is_file() for p in outputs.values()):
        return None, "some of its output files are missing"
    return {**rec, "outputs": outputs}, ""


def _score_or_reuse(path: str, out: str, ls: Any, size: int, device: str,
                    threshold: Threshold | None, settings: dict[str, Any],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """One slide of ``slide_command``: reuse its finished outputs, else score it (saying why)."""
    import sys

    dest = Path(out) / Path(path).stem
    rec, why = finished_slide(dest, settings)
    if rec is not None:
        print(f"slide {Path(path).stem}: reused ({dest / SLIDE_JSON} records the same slide "
              "file, scorer and settings)", file=sys.stderr, flush=True)
        return rec
    if why:
        print(f"slide {Path(path).stem}: scoring again ({why})", file=sys.stderr, flush=True)
    return score_slide(path, ls.scorer, out, size=size, device=device, threshold=threshold,
                       method=ls.label, record={**settings, "code": code_record()}, **kwargs)


@writes_folder("out", "slide output folder")
def slide_command(slides: str | Sequence[str], out: str, *, run: str | None = None,
                  bank: str | None = None, method: str | None = None, normal: str | None = None,
                  device: str = "auto", size: int | None = None,
                  scorer_kwargs: dict[str, Any] | None = None, labels: str | None = None,
                  annotations: str | None = None, n_boot: int = 2000, seed: int = 0,
                  **kwargs: Any) -> dict[str, Any]:
    """What ``gen-ad slide`` does: load the scorer (evaluation engine), check every slide
    (:func:`plan_slides`: one error names all that cannot be scored, before any is), optionally
    fit the scorer and calibrate a label-free threshold on a ``normal`` folder,
    :func:`score_slide` every slide (or reuse it: :func:`finished_slide`), and
    with several slides, ``labels`` or ``annotations`` evaluate the cohort
    (:mod:`gen_ad.app.cohort`).

    Returns:
        ``{"slides": [slide.json records], "cohort": metrics + outputs (when evaluated)}``.
    """
    from gen_ad.app.cohort import (
        check_inputs,
        clear_cohort,
        evaluate_cohort,
        read_slide_labels,
        write_cohort,
    )

    paths = [str(slides)] if isinstance(slides, (str, os.PathLike)) else [str(p) for p in slides]
    label_map = read_slide_labels(labels) if labels is not None else None
    check_inputs(paths, label_map, annotations)
    device = resolve_device(device)
    if bank is not None and normal is not None:
        raise ConfigError("--normal fits a run's scorer; a KNN bank already holds its normal "
                          "features and threshold (extend it with `gen-ad knn fit --extend`)")
    ls = load_scorer(run=run, bank=bank, method=method, device=device,
                     scorer_kwargs=scorer_kwargs)
    size = size or ls.size
    plans = plan_slides(paths, size, **kwargs)  # every slide checked before any is scored
    threshold = ls.threshold
    if normal is not None:
        nds = normal_dataset(normal, size, resize=ls.resize)  # read as the run trained
        threshold = calibrate_scorer(ls.scorer, nds, device=device,
                                     batch_size=int(kwargs.get("batch_size", 32)))
    is_cohort = len(paths) > 1 or label_map is not None or annotations is not None
    if is_cohort:  # an interrupted run leaves no table of another run beside its slides
        clear_cohort(out)
    scorer = {**scorer_identity(run, bank), "method": ls.label, "options": scorer_kwargs,
              "normal": str(normal) if normal is not None else None,
              "calibration": ls.scorer.calibration(),
              # streams: batch draws per batch: the batch size then changes the scores
              "batch_size": kwargs.get("batch_size") if batch_dependent(ls.scorer) else None}
    thr = Threshold(float(threshold), "given") if isinstance(threshold, (int, float)) \
        else threshold
    scoring = {k: v for k, v in kwargs.items() if k not in _TILING_FLAGS}
    recs = [_score_or_reuse(sp.path, out, ls, size, device, thr,
                            slide_settings(sp.path, scorer, thr, **scoring,
                                           **sp.settings(size)), kwargs)
            for sp in plans]
    result: dict[str, Any] = {"slides": recs}
    if is_cohort:
        cohort = evaluate_cohort(recs, label_map, annotations, n_boot=n_boot, seed=seed)
        cohort["outputs"] = write_cohort(out, recs, label_map, cohort)
        result["cohort"] = cohort
    return result
