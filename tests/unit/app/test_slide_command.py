"""Slide-level scoring on a shared slide: tiles -> scores -> heatmap -> erosion -> slide score."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.app.slide import load_scorer, score_slide
from gen_ad.errors import ConfigError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch


class DarkScorer(AnomalyScorer):
    """Score = 1 - mean intensity (dense, dark tissue scores high)."""

    name = "dark"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(scores=1.0 - x.mean(dim=(1, 2, 3)))


@pytest.fixture
def slide(shared_data: Path) -> Path:
    p = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


def test_score_slide_heatmap_and_scores(slide: Path, tmp_path: Path) -> None:
    rec = score_slide(slide, DarkScorer(), tmp_path, size=32, mpp=4.0, min_tissue=0.5,
                      batch_size=16, threshold=0.5, progress=False)
    dest = tmp_path / slide.stem
    rows = list(csv.DictReader(open(dest / "tiles.csv")))
    assert rec["n_tiles"] == len(rows) > 5
    grid = np.load(dest / "heatmap.npy")
    assert list(grid.shape) == rec["grid"]
    # every tile's score sits at its cell; every other cell is NaN (no tissue tile)
    for r in rows:
        assert grid[int(r["row"]), int(r["col"])] == pytest.approx(float(r["score"]), rel=1e-6)
    assert int(np.isfinite(grid).sum()) == len(rows)
    # the tile score is the scorer's score of the tile image
    r0 = rows[0]
    img = torch.from_numpy(np.asarray(Image.open(r0["path"]).convert("RGB"), np.float32))
    x = (img / 127.5 - 1.0).permute(2, 0, 1)[None]
    assert float(DarkScorer().score(x).scores[0]) == pytest.approx(float(r0["score"]), abs=1e-5)
    # slide scores: raw max = max tile; eroded max = max over valid cells of the 3x3 valid min
    scores = np.array([float(r["score"]) for r in rows])
    assert rec["score_max_raw"] == pytest.approx(scores.max(), rel=1e-6)
    pad = np.pad(np.where(np.isnan(grid), np.inf, grid), 1, constant_values=np.inf)
    eroded = [pad[i:i + 3, j:j + 3].min() for i, j in zip(*np.nonzero(np.isfinite(grid)))]
    assert rec["score_max"] == pytest.approx(max(eroded), rel=1e-6)
    assert rec["score_max"] <= rec["score_max_raw"]
    k = max(1, int(np.ceil(0.01 * len(eroded))))
    assert rec["score_top1pct"] == pytest.approx(np.sort(eroded)[-k:].mean(), rel=1e-6)
    assert rec["flagged_fraction"] == pytest.approx(float((scores > 0.5).mean()))
    for key in ("overlay", "overlay_raw"):
        im = Image.open(rec["outputs"][key])
        assert im.mode == "RGB" and max(im.size) == 1024
    assert json.loads((dest / "slide.json").read_text())["score_max"] == rec["score_max"]
    # the engine's scores.csv: tiles carry no label (an unannotated slide), so it is left empty
    engine = list(csv.DictReader(open(dest / "scores.csv")))
    assert len(engine) == len(rows) and {r["label"] for r in engine} == {""}


def test_slide_cli_with_knn_bank(slide: Path, tmp_path: Path) -> None:
    from gen_ad.app.knn import fit_folder
    from gen_ad.cli import main
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "normal", 12, 32, 0, 0.0)
    fit_folder("resnet50", tmp_path / "normal", tmp_path / "bank", random_init=True, tiny=True,
               k=3, size=32, workers=0, calib_size=12)
    rc = main(["slide", str(slide), "--bank", str(tmp_path / "bank"), "--out",
               str(tmp_path / "out"), "--mpp", "8", "--min-tissue", "0.5", "--device", "cpu"])
    assert rc == 0
    rec = json.loads((tmp_path / "out" / slide.stem / "slide.json").read_text())
    assert rec["method"] == "knn resnet50 (random-init extractor)"
    assert rec["tile_size"] == 32 and rec["n_tiles"] > 0 and 0 <= rec["flagged_fraction"] <= 1


def test_load_scorer_needs_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        load_scorer()
    with pytest.raises(ConfigError, match="exactly one"):
        load_scorer(run=tmp_path, bank=tmp_path)


def test_slide_cli_slide_mpp_and_overlay_at_exact_tile_centres(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A slide recording no mpp is scored at --mpp with --slide-mpp; with a fractional level-0
    step (0.5 / 0.2425 um/px, stride < size) every tile's overlay colour sits at its centre and
    agrees with heatmap.npy, while tiles.csv keeps the grid's corners."""
    import tifffile

    import gen_ad.app.slide as app_slide
    from gen_ad.app.evaluate import LoadedScorer
    from gen_ad.cli import main
    from gen_ad.data.wsi import open_slide, plan_grid
    from gen_ad.scoring.maps import normalize, overlay

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((200, 110, 170), 35, (200, 400, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")  # no resolution recorded
    monkeypatch.setattr(app_slide, "load_scorer",
                        lambda **kw: LoadedScorer(DarkScorer(), 16, "dark"))
    args = ["slide", str(path), "--run", "unused", "--out", str(tmp_path / "out"), "--size",
            "16", "--mpp", "0.5", "--stride", "4", "--device", "cpu", "--min-tissue", "0.5"]
    assert main(args) == 2
    assert "does not record its microns per pixel" in capsys.readouterr().err
    assert main(args + ["--slide-mpp", "0.2425"]) == 0
    dest = tmp_path / "out" / "s"
    rec = json.loads((dest / "slide.json").read_text())
    assert rec["slide_mpp"] == 0.2425 and rec["slide_mpp_source"] == "given"
    assert rec["slide_mpp_recorded"] is None and rec["slide_mpp_given"] == 0.2425
    with open_slide(path) as s:
        grid = plan_grid(s, 16, mpp=0.5, stride=4, slide_mpp=0.2425)
        thumb = s.thumbnail(400)
    assert grid.level == 0 and rec["grid"] == list(grid.shape) and thumb.shape == img.shape
    heat = np.load(dest / "heatmap.npy")
    lo, hi = np.nanmin(heat), np.nanmax(heat)
    ov = np.asarray(Image.open(dest / "overlay_raw.png"))
    rows = list(csv.DictReader(open(dest / "tiles.csv")))
    assert len(rows) == rec["n_tiles"] > 300
    for r in rows:
        i, j = int(r["row"]), int(r["col"])
        assert (int(r["x"]), int(r["y"])) == (grid.xs[j], grid.ys[i])
        assert heat[i, j] == pytest.approx(float(r["score"]), rel=1e-6)
        cx, cy = int(grid.xs[j] + grid.footprint / 2), int(grid.ys[i] + grid.footprint / 2)
        want = overlay(thumb[cy:cy + 1, cx:cx + 1], normalize(heat[i:i + 1, j:j + 1], lo, hi))
        assert (ov[cy, cx] == want[0, 0]).all(), (i, j)


def test_slide_calibrates_on_patches_read_as_the_run_trained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--normal`` patches of a run trained with center_crop are centre-cropped, not rescaled."""
    import gen_ad.app.slide as app_slide
    from gen_ad.app.evaluate import LoadedScorer
    from gen_ad.data.folders import PatchFolder
    from gen_ad.data.synthetic import write_folder
    from gen_ad.scoring.thresholds import Threshold

    write_folder(tmp_path / "normal", 4, 48, 0, 0.0)
    seen: list[torch.Tensor] = []

    def calibrate(scorer: AnomalyScorer, normal: Any, **kw: Any) -> Threshold:
        seen.extend(normal[i]["image"] for i in range(len(normal)))
        return Threshold(0.5, "given")

    monkeypatch.setattr(app_slide, "load_scorer", lambda **kw: LoadedScorer(
        DarkScorer(), 32, "dark", resize="center_crop"))
    monkeypatch.setattr(app_slide, "calibrate_scorer", calibrate)
    monkeypatch.setattr(app_slide, "score_slide", lambda *a, **kw: {})
    import tifffile  # a real slide: every slide is checked before any is scored

    tifffile.imwrite(tmp_path / "s.tif", np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    app_slide.slide_command(str(tmp_path / "s.tif"), str(tmp_path / "out"), run="unused",
                            normal=str(tmp_path / "normal"), device="cpu")
    crops = PatchFolder(root=str(tmp_path / "normal"), size=32, resize="center_crop")
    assert len(seen) == len(crops) == 4
    assert all(torch.equal(a, crops[i]["image"]) for i, a in enumerate(seen))


def test_slide_json_records_which_slide_mpp_was_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide recording 0.25 um/px keeps it against --slide-mpp 0.5 (a warning; slide.json says
    recorded) unless --slide-mpp-force (slide.json says forced)."""
    import tifffile

    import gen_ad.app.slide as app_slide
    from gen_ad.app.evaluate import LoadedScorer
    from gen_ad.cli import main

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((200, 110, 170), 35, (128, 128, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    monkeypatch.setattr(app_slide, "load_scorer",
                        lambda **kw: LoadedScorer(DarkScorer(), 16, "dark"))
    args = ["slide", str(path), "--run", "unused", "--out", str(tmp_path / "out"), "--size",
            "16", "--mpp", "0.5", "--slide-mpp", "0.5", "--device", "cpu", "--min-tissue", "0"]
    with pytest.warns(RuntimeWarning, match=r"s\.tif: using its recorded resolution of 0\.25"):
        assert main(args) == 0
    rec = json.loads((tmp_path / "out" / "s" / "slide.json").read_text())
    assert (rec["slide_mpp"], rec["slide_mpp_source"]) == (0.25, "recorded")
    assert (rec["slide_mpp_recorded"], rec["slide_mpp_given"]) == (0.25, 0.5)
    assert rec["grid"] == [4, 4] and rec["tile_footprint_level0"] == 32
    assert main(args + ["--slide-mpp-force"]) == 0
    rec = json.loads((tmp_path / "out" / "s" / "slide.json").read_text())
    assert (rec["slide_mpp"], rec["slide_mpp_source"]) == (0.5, "forced")
    assert rec["grid"] == [8, 8] and rec["tile_footprint_level0"] == 16
