"""A cohort of scored slides against its labels: slide-level and tile-level detection metrics.

``gen-ad slide A.svs B.svs ... --labels slides.csv [--annotations DIR]`` scores every slide
(:func:`gen_ad.app.slide.score_slide`) and then evaluates the cohort here:

- **slide level** (``--labels``: ``slide,label`` with 0 = normal, 1 = tumour): AUROC/AUPR of each
  slide score (max and top-1 % mean of the eroded heatmap, their raw variants, and the flagged
  fraction when a threshold exists) with stratified bootstrap CIs over slides;
- **tile level** (``--annotations``: one region file per slide, ``<stem>.geojson`` or ASAP
  ``<stem>.xml``, level-0 pixels): a tile is tumour when its centre lies in an annotated region.
  Slides labelled normal need no file (all their tiles are normal, as in Camelyon16); tumour
  slides without one are left out of the tile metrics. Tile AUROC/AUPR and AUPRO (regions:
  8-connected groups of tumour tiles, so a small lesion counts as much as a large one) are
  pooled over slides with CIs that resample whole slides (tiles of one slide are not
  independent), plus each slide's own tile AUROC where it has both kinds of tile.

Outputs: ``slides.csv`` (one row per slide) and ``cohort.json``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gen_ad.data.annotations import find_annotation, read_regions
from gen_ad.errors import DataError
from gen_ad.metrics.detection import auroc, evaluate_scores
from gen_ad.metrics.localisation import clustered_metrics, region_weights
from gen_ad.report.html import ci_text
from gen_ad.utils.io import write_json, write_text
from gen_ad.utils.paths import names_a_folder

SLIDE_SCORES = ("score_max", "score_top1pct", "score_max_raw", "score_top1pct_raw",
                "flagged_fraction")


# Suffixes of the files gen-ad slide reads (OpenSlide and tiffslide formats, plain images): a
# label-table entry ending in one of them is a file name; any other entry is already a stem
# (TCGA stems such as ``TCGA-...-DX1.B34C267B`` contain dots).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif", ".dcm", ".czi", ".png", ".jpg", ".jpeg", ".bmp", ".webp")


def slide_key(path: str | os.PathLike[str]) -> str:
    """The name a scored slide goes by: its file stem (the name of its output folder)."""
    return Path(path).stem


def label_key(entry: str) -> str:
    """The slide a label-table entry names: the entry without its folder and without a known
    slide/image suffix (:data:`SLIDE_SUFFIXES`, any case); other dots are kept."""
    name = Path(entry.strip()).name
    suffix = Path(name).suffix
    return name[:-len(suffix)] if suffix.lower() in SLIDE_SUFFIXES else name


def read_slide_labels(path: str | os.PathLike[str]) -> dict[str, int]:
    """``slide,label`` CSV (``slide``: file name or stem, see :func:`label_key`; ``label``: 0
    normal, 1 tumour)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label table not found: {p}")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"slide", "label"} <= {c.strip() for c in reader.fieldnames or []}:
            raise DataError(f"{p}: needs the columns slide,label")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    out: dict[str, int] = {}
    for i, r in enumerate(rows, start=2):
        if r["label"] not in ("0", "1"):
            raise DataError(f"{p}:{i}: label must be 0 (normal) or 1 (tumour), got "
                            f"'{r['label']}'")
        key = label_key(r["slide"])
        if out.setdefault(key, int(r["label"])) != int(r["label"]):
            raise DataError(f"{p}:{i}: slide '{key}' has two labels")
    return out


def _tile_table(rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tile centres (level-0 ``x, y``), grid cells (``row, col``) and ``score`` of one scored
    slide, from its ``tiles.csv``."""
    with open(rec["outputs"]["tiles"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    half = float(rec["tile_footprint_level0"]) / 2.0
    return {"x": np.array([float(r["x"]) + half for r in rows]),
            "y": np.array([float(r["y"]) + half for r in rows]),
            "row": np.array([int(r["row"]) for r in rows], dtype=np.int64),
            "col": np.array([int(r["col"]) for r in rows], dtype=np.int64),
            "score": np.array([float(r["score"]) for r in rows])}


def tile_region_weights(table: Mapping[str, np.ndarray], tumour: np.ndarray,
                        grid: Sequence[int]) -> np.ndarray:
    """``1/|region|`` of each tumour tile (0 for the others): regions are 8-connected groups of
    tumour tiles on the slide's tile grid (one lesion = one region, whatever its size)."""
    mask = np.zeros((1, int(grid[0]), int(grid[1])), dtype=bool)
    mask[0, table["row"], table["col"]] = tumour.astype(bool)
    return region_weights(mask)[0][0, table["row"], table["col"]]


def _tile_labels(rec: Mapping[str, Any], t: Mapping[str, np.ndarray], label: int | None,
                 annotations: str | os.PathLike[str]) -> tuple[np.ndarray | None, str]:
    """Tile labels of one slide (its tile table ``t``) and where they came from (``None`` when
    unknown)."""
    found = find_annotation(annotations, slide_key(rec["slide"]))
    if found is not None:
        return read_regions(found).contains(t["x"], t["y"]).astype(int), str(found)
    if label == 0:
        return np.zeros(t["x"].size, dtype=int), "slide labelled normal: every tile normal"
    return None, "no annotation file: left out of the tile metrics"


def _slide_level(recs: Sequence[Mapping[str, Any]], labels: Mapping[str, int], n_boot: int,
                 seed: int) -> dict[str, Any]:
    y = np.array([labels[slide_key(r["slide"])] for r in recs])
    if y.min() == y.max():
        return {"note": f"all {y.size} labelled slides are of one class: no slide-level AUROC"}
    out: dict[str, Any] = {"n": int(y.size), "n_tumour": int(y.sum())}
    for key in SLIDE_SCORES:
        if all(key in r for r in recs):
            s = np.array([float(r[key]) for r in recs])
            out[key] = evaluate_scores(s, y, n_boot=n_boot, seed=seed)
    return out


def _tile_level(recs: Sequence[Mapping[str, Any]], labels: Mapping[str, int],
                annotations: str | os.PathLike[str], n_boot: int, seed: int) -> dict[str, Any]:
    parts: dict[str, list[np.ndarray]] = {"score": [], "label": [], "weight": [], "slide": []}
    sources, per_slide = {}, {}
    for r in recs:
        key = slide_key(r["slide"])
        t = _tile_table(r)
        tl, sources[key] = _tile_labels(r, t, labels.get(key), annotations)
        if tl is None:
            continue
        w = tile_region_weights(t, tl, r["grid"])
        for name, v in (("score", t["score"]), ("label", tl), ("weight", w),
                        ("slide", np.full(tl.size, key))):
            parts[name].append(v)
        per_slide[key] = {"n_tiles": int(tl.size), "n_tumour_tiles": int(tl.sum()),
                          "n_regions": int(round(w.sum())),
                          "auroc": auroc(t["score"], tl) if 0 < tl.sum() < tl.size else None}
    out: dict[str, Any] = {"rule": "a tile is tumour when its centre lies in an annotated region;"
                                   " regions: 8-connected tumour tiles",
                           "label_source": sources, "per_slide": per_slide}
    y = np.concatenate(parts["label"]) if parts["label"] else np.zeros(0)
    if len(np.unique(y)) < 2:
        out["note"] = "tile metrics need tumour and normal tiles among the labelled slides"
        return out
    out["pooled"] = clustered_metrics(np.concatenate(parts["score"]), y,
                                      np.concatenate(parts["slide"]), n_boot=n_boot, seed=seed,
                                      weights=np.concatenate(parts["weight"]))
    return out


def check_inputs(slides: Sequence[str | os.PathLike[str]], labels: Mapping[str, int] | None,
                 annotations: str | os.PathLike[str] | None) -> None:
    """Duplicate slide names, slides missing from the label table, a missing annotation folder:
    each a :class:`DataError` (``gen-ad slide`` calls this before any scoring)."""
    keys = [slide_key(p) for p in slides]
    odd = [str(p) for p, k in zip(slides, keys) if not names_a_folder(k)]
    if odd:
        raise DataError(f"cannot name an output folder after {', '.join(odd)} (its name without "
                        "the extension is empty, '.' or '..'): rename the file")
    folded = [k.casefold() for k in keys]
    dupes = sorted({k for k, f in zip(keys, folded) if folded.count(f) > 1})
    if dupes:
        raise DataError(f"two slides share the name {', '.join(dupes)} (outputs go to "
                        "<out>/<slide name>/, and macOS and Windows do not tell names apart by "
                        "letter case)")
    missing = [k for k in keys if labels is not None and k not in labels]
    if missing:
        raise DataError(f"no label for slide(s) {', '.join(missing)} in the label table (its "
                        "slide column holds file names or stems)")
    if annotations is not None and not Path(annotations).is_dir():
        raise DataError(f"annotation folder not found: {annotations}")


def evaluate_cohort(recs: Sequence[Mapping[str, Any]], labels: Mapping[str, int] | None,
                    annotations: str | os.PathLike[str] | None, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """Slide-level and tile-level metrics of scored slides (see the module docstring)."""
    check_inputs([r["slide"] for r in recs], labels or None, annotations)
    labels = dict(labels or {})
    out: dict[str, Any] = {"n_slides": len(recs), "n_boot": n_boot, "seed": seed}
    if labels:
        out["slide_level"] = _slide_level(recs, labels, n_boot, seed)
    if annotations is not None:
        out["tile_level"] = _tile_level(recs, labels, annotations, n_boot, seed)
    return out


def slides_csv(recs: Sequence[Mapping[str, Any]], labels: Mapping[str, int] | None) -> str:
    """One row per slide: name, label (empty when unknown), tiles and every slide score."""
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [k for k in SLIDE_SCORES if any(k in r for r in recs)]
    w.writerow(["slide", "label", "n_tiles", *keys, "path"])
    for r in recs:
        key = slide_key(r["slide"])
        w.writerow([key, (labels or {}).get(key, ""), r["n_tiles"],
                    *[f"{r[k]:.8g}" if k in r else "" for k in keys], r["slide"]])
    return buf.getvalue()


def clear_cohort(out: str | os.PathLike[str]) -> None:
    """Remove an earlier run's ``cohort.json`` then ``slides.csv`` before the slides are scored:
    a run interrupted meanwhile leaves no table listing another run's slides and scores."""
    for name in ("cohort.json", "slides.csv"):
        (Path(out) / name).unlink(missing_ok=True)


def write_cohort(out: str | os.PathLike[str], recs: Sequence[Mapping[str, Any]],
                 labels: Mapping[str, int] | None, result: Mapping[str, Any]) -> dict[str, str]:
    """Write ``slides.csv``, then ``cohort.json`` (last: it marks a finished cohort) into
    ``out``; return their paths."""
    paths = {"slides": Path(out) / "slides.csv", "cohort": Path(out) / "cohort.json"}
    write_text(paths["slides"], slides_csv(recs, labels))
    write_json(paths["cohort"], dict(result))
    return {k: str(v) for k, v in paths.items()}


def cohort_lines(result: Mapping[str, Any]) -> list[str]:
    """Human lines: slide-level AUROC of each slide score, pooled tile AUROC."""
    lines = []
    sl = result.get("slide_level") or {}
    if "note" in sl:
        lines.append(f"slide level: {sl['note']}")
    for key in SLIDE_SCORES:
        if key in sl:
            lines.append(f"slide level ({sl['n']} slides, {sl['n_tumour']} tumour), {key}: "
                         f"AUROC {ci_text(sl[key]['auroc'])}")
    tl = result.get("tile_level") or {}
    if "pooled" in tl:
        p = tl["pooled"]
        lines.append(f"tile level ({p['n']} tiles of {p['n_clusters']} slides, CIs resample "
                     f"slides): AUROC {ci_text(p['auroc'])}, AUPR {ci_text(p['aupr'])}, "
                     f"AUPRO@{p['aupro_fpr_limit']} {ci_text(p['aupro'])} "
                     f"({p['n_regions']} regions)")
    elif "note" in tl:
        lines.append(f"tile level: {tl['note']}")
    return lines
