"""``gen-ad tile`` run again: finished slides are reused, the others tiled from an empty start.

Each slide's completion record (``tiled/<stem>.json``) is written after its last tile; a re-run
reuses a slide only when the record's settings hash (slide file, resolved tiling, tissue mask,
format, gen_ad version) is equal and every tile is there. ``manifest.csv`` lists exactly the
slides of the run, and no tile of an interrupted slide or of other settings stays beside them.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

import gen_ad.data.wsi as wsi
from gen_ad.cli import main

SIDE = 192  # 6 x 6 grid of 32 px tiles, the first column glass: 30 tiles a slide
RECORD_FOLDER = "tiled"


def _slide(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((210, 120, 175), 12, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    img[:, :32] = 246  # glass
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
    return path


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tiles(out: Path, stem: str) -> list[Path]:
    """Every tile file of slide ``stem`` in ``out``, listed or not."""
    pattern = re.compile(re.escape(stem) + r"_x\d+_y\d+\.png")
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))


def _pngs(out: Path, stem: str) -> set[str]:
    return {p.name for p in _tiles(out, stem)}


def _listed(out: Path, stem: str) -> set[str]:
    return {r["path"] for r in _rows(out) if r["slide"] == stem}


def _record(out: Path, stem: str) -> dict[str, Any]:
    return json.loads((out / RECORD_FOLDER / f"{stem}.json").read_text(encoding="utf-8"))


def _fail_for(monkeypatch: pytest.MonkeyPatch, stems: set[str], after: int = 0,
              exc: type[BaseException] = AssertionError) -> list[str]:
    """Make the tiler raise ``exc`` for slides in ``stems`` after ``after`` strips; returns the
    stems of every strip it was asked to cut."""
    real, calls = wsi._tile_run, []

    def tile_run(*a: Any) -> Any:
        stem = a[5]
        calls.append(stem)
        if stem in stems and calls.count(stem) > after:
            raise exc(f"{stem} tiled again")
        return real(*a)

    monkeypatch.setattr(wsi, "_tile_run", tile_run)
    return calls


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, Any]:
    slides = [_slide(tmp_path / f"s{i}.tif", i) for i in range(2)]
    out = tmp_path / "out"
    base = ["--out", str(out), "--size", "32", "--level", "0", "--min-tissue", "0.5",
            "--workers", "1"]
    return {"slides": [str(s) for s in slides], "out": out, "base": base}


def _tile(c: dict[str, Any], *extra: str, slides: list[str] | None = None) -> int:
    return main(["tile", *(c["slides"] if slides is None else slides), *c["base"], *extra])


def test_rerun_reuses_finished_slides_and_writes_the_same_manifest(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    manifest = (out / "manifest.csv").read_bytes()
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(_rows(out)) == 60 and len(times) == 60
    capsys.readouterr()
    calls = _fail_for(monkeypatch, {"s0", "s1"})  # any tiling now fails the run
    assert _tile(cohort, "--stride", "32") == 0  # --stride equal to --size: the same tiles
    assert calls == []
    captured = capsys.readouterr()
    for stem in ("s0", "s1"):
        assert f"tile {stem}: reused" in captured.err
        assert f"{stem}: openslide, level 0" in captured.out and "(reused)" in captured.out
    assert (out / "manifest.csv").read_bytes() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == times


def test_a_changed_setting_retiles_and_leaves_no_old_tiles(
        cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    old = _pngs(out, "s0")
    capsys.readouterr()
    assert _tile(cohort, "--stride", "48") == 0  # other corners: other file names
    err = capsys.readouterr().err
    assert "tile s0: tiling again (it was tiled with other settings (stride))" in err
    for stem in ("s0", "s1"):
        assert _pngs(out, stem) == _listed(out, stem) and _listed(out, stem)
        assert _record(out, stem)["settings"]["stride"] == 48
    gone = old - _listed(out, "s0")  # corners of stride 32 only
    assert gone and not gone & _pngs(out, "s0")
    capsys.readouterr()
    assert _tile(cohort, "--min-tissue", "0.99") == 0
    assert "other settings (stride, min_tissue)" in capsys.readouterr().err


def test_a_slide_interrupted_midway_never_leaves_its_partial_tiles(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0  # finished with stride 32
    first = _rows(out)
    with monkeypatch.context() as m:  # other settings: Ctrl-C while s1 is half tiled
        _fail_for(m, {"s1"}, after=2, exc=KeyboardInterrupt)
        assert _tile(cohort, "--stride", "16") == 130
    assert {r["slide"] for r in _rows(out)} == {"s0"}  # s0 of this run; no row of s1
    assert _record(out, "s0")["settings"]["stride"] == 16
    assert not (out / RECORD_FOLDER / "s1.json").exists()
    assert _pngs(out, "s1") == set()  # neither its stride-32 tiles nor stride-16 ones stay
    capsys.readouterr()
    assert _tile(cohort) == 0  # back to stride 32
    err = capsys.readouterr().err
    assert "tile s0: tiling again (it was tiled with other settings (stride))" in err
    assert "tile s1:" not in err  # nothing of s1 was left to reuse or replace
    assert _rows(out) == first
    assert _pngs(out, "s1") == _listed(out, "s1")


def test_a_slide_killed_midway_is_tiled_from_scratch(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What a kill -9 while s1 is tiled leaves: tiles, some missing, no record."""
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    (out / RECORD_FOLDER / "s1.json").unlink()
    for p in _tiles(out, "s1")[:10]:
        p.unlink()
    (out / "s1_x999_y999.png").write_bytes(b"not a tile of these settings")
    capsys.readouterr()
    calls = _fail_for(monkeypatch, {"s0"})
    assert _tile(cohort) == 0
    err = capsys.readouterr().err
    assert "tile s0: reused" in err and "tile s1: tiling again (21 tile file(s)" in err
    assert set(calls) == {"s1"}
    assert _pngs(out, "s1") == _listed(out, "s1") and len(_listed(out, "s1")) == 30
    assert not (out / "s1_x999_y999.png").exists()


def test_missing_tiles_of_a_finished_slide_are_tiled_again(
        cohort: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    _tiles(out, "s0")[0].unlink()
    capsys.readouterr()
    assert _tile(cohort) == 0
    assert "tile s0: tiling again (1 of its 30 tile files are missing)" in capsys.readouterr().err
    assert len(_pngs(out, "s0")) == 30


def test_a_modified_slide_file_is_tiled_again(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    s1 = Path(cohort["slides"][1])
    st = s1.stat()
    _slide(s1, 7)  # other content, the same size ...
    os.utime(s1, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and modification time
    assert s1.stat().st_size == st.st_size
    before = (out / "s1_x32_y0.png").read_bytes()
    capsys.readouterr()
    calls = _fail_for(monkeypatch, {"s0"})
    assert _tile(cohort) == 0
    err = capsys.readouterr().err
    assert "tile s0: reused" in err
    assert "tile s1: tiling again (the slide file changed)" in err
    assert set(calls) == {"s1"} and (out / "s1_x32_y0.png").read_bytes() != before


def test_fresh_tiles_every_slide_again(cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    assert _tile(cohort) == 0
    manifest = (out / "manifest.csv").read_bytes()
    capsys.readouterr()
    calls = _fail_for(monkeypatch, set())
    assert _tile(cohort, "--fresh") == 0
    err = capsys.readouterr().err
    assert "tile s0: tiling again (--fresh)" in err and "tile s1: tiling again (--fresh)" in err
    assert set(calls) == {"s0", "s1"}
    assert (out / "manifest.csv").read_bytes() == manifest


def test_added_slides_are_tiled_and_finished_ones_reused(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    s0, s1 = cohort["slides"]
    assert _tile(cohort, slides=[s0]) == 0
    capsys.readouterr()
    calls = _fail_for(monkeypatch, {"s0"})
    assert _tile(cohort, slides=[s0, s1]) == 0
    assert "tile s0: reused" in capsys.readouterr().err and set(calls) == {"s1"}
    assert {r["slide"] for r in _rows(out)} == {"s0", "s1"} and len(_rows(out)) == 60


def test_slides_not_named_again_stay_but_are_not_listed(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    s0, s1 = cohort["slides"]
    assert _tile(cohort) == 0
    manifest = (out / "manifest.csv").read_bytes()
    tiles_s1 = _pngs(out, "s1")
    capsys.readouterr()
    _fail_for(monkeypatch, {"s0", "s1"})
    assert _tile(cohort, slides=[s0]) == 0
    err = capsys.readouterr().err
    assert "1 slide(s) tiled earlier into" in err and "(s1)" in err
    assert {r["slide"] for r in _rows(out)} == {"s0"}
    assert _pngs(out, "s1") == tiles_s1 and (out / RECORD_FOLDER / "s1.json").is_file()
    assert _tile(cohort, slides=[s0, s1]) == 0  # named again: reused, listed again
    assert (out / "manifest.csv").read_bytes() == manifest


def test_a_slide_never_claims_the_tiles_of_a_slide_named_like_its_tiles(tmp_path: Path) -> None:
    from gen_ad.data.tile_records import slide_tile_files

    for name in ("a_x0_y0.png", "a_x32_y64.png", "a_x0_y0_x32_y0.png", "ab_x0_y0.png",
                 "a_x1_y2.png.tmp", "a_x0_y0_x0.png"):
        (tmp_path / name).write_bytes(b"")
    assert {p.name for p in slide_tile_files(tmp_path, "a")} == {"a_x0_y0.png", "a_x32_y64.png"}
    assert {p.name for p in slide_tile_files(tmp_path, "a_x0_y0")} == {"a_x0_y0_x32_y0.png"}


def test_a_missing_slide_stops_the_run_before_any_tiling(
        cohort: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = cohort["out"]
    s0, s1 = cohort["slides"]
    assert _tile(cohort, slides=[s0]) == 0
    manifest = (out / "manifest.csv").read_bytes()
    capsys.readouterr()
    calls = _fail_for(monkeypatch, set())
    assert _tile(cohort, slides=[s1, str(out.parent / "gone.tif")]) == 2
    assert "slide not found" in capsys.readouterr().err
    assert calls == [] and (out / "manifest.csv").read_bytes() == manifest  # nothing changed
