"""Long commands other than training, interrupted (real signals) and run again.

A finished item (a slide of a cohort, a tiled slide, a slide's crops) is published whole; a
re-run reuses the slides finished with the same settings and redoes the rest; tables (cohort,
benchmark, groups) never list what another run made; no stale output of an earlier run stays
beside a new one.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gen_ad.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GEN_AD_OFFLINE": "1"}


def _slide(path: Path, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((210, 120, 175), 12, (side, side, 3)), 0, 255).astype(np.uint8)
    img[:, :32] = 246  # glass
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from gen_ad.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _signal_when(cmd: list[str], ready: Callable[[], bool], sig: int,
                 timeout: float = 120.0) -> tuple[int, str, float]:
    """Run ``cmd``; send ``sig`` once ``ready()`` holds; return (rc, stderr, seconds to exit)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=ENV)
    t0 = time.monotonic()
    while not ready() and p.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    if p.poll() is None:
        p.send_signal(sig)
    sent = time.monotonic()
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.returncode, err, time.monotonic() - sent


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, object]:
    from gen_ad.app.knn import fit_folder
    from gen_ad.data.synthetic import write_folder

    slides = []
    for i in range(3):
        slides.append(tmp_path / f"s{i}.tif")
        _slide(slides[-1], 320, i)
    write_folder(tmp_path / "normal", 12, 32, 0, 0.0)
    fit_folder("colour-stats", tmp_path / "normal", tmp_path / "bank", k=3, size=32,
               workers=0, calib_size=12, device="cpu")
    (tmp_path / "labels.csv").write_text("slide,label\ns0,0\ns1,1\ns2,0\n", encoding="utf-8")
    args = ["slide", *map(str, slides), "--bank", str(tmp_path / "bank"), "--out",
            str(tmp_path / "out"), "--level", "0", "--labels", str(tmp_path / "labels.csv"),
            "--n-boot", "20", "--min-tissue", "0.5", "--device", "cpu"]
    return {"args": args, "out": tmp_path / "out"}


def test_cohort_killed_then_rerun_reuses_finished_slides_and_mixes_nothing(
        cohort: dict, capsys: pytest.CaptureFixture) -> None:
    out: Path = cohort["out"]
    args: list[str] = cohort["args"]
    assert main(args) == 0  # a finished cohort (stride 32)
    first_s0 = json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8"))
    # the same cohort with other settings, killed (SIGKILL) once s1 has been tiled
    rerun = [*args, "--stride", "16"]
    before = (out / "s1" / "tiles.csv").stat().st_mtime_ns
    rc, _, _ = _signal_when(_cli(*rerun), lambda: (out / "s1" / "tiles").is_dir() and
                            (out / "s1" / "tiles" / "manifest.csv").stat().st_mtime_ns > before,
                            signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # no table of the first run beside the slides the killed run redid
    assert not (out / "cohort.json").exists() and not (out / "slides.csv").exists()
    new_s0 = json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8"))
    assert new_s0["settings"]["stride"] == 16 != first_s0["settings"].get("stride")
    s1 = out / "s1" / "slide.json"
    assert not s1.exists() or json.loads(s1.read_text(encoding="utf-8"))["settings"][
        "stride"] == 16  # an unfinished slide has no slide.json: never taken for finished
    capsys.readouterr()
    assert main(rerun) == 0
    err = capsys.readouterr().err
    assert "slide s0: reused" in err and "slide s2: scoring again" in err
    assert json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8")) == new_s0
    table = _rows(out / "slides.csv")
    assert [r["slide"] for r in table] == ["s0", "s1", "s2"]
    for r in table:  # every row matches its slide's own files, all from this run's settings
        rec = json.loads((out / r["slide"] / "slide.json").read_text(encoding="utf-8"))
        assert rec["settings"]["stride"] == 16
        n = int(r["n_tiles"])
        assert n == rec["n_tiles"] == len(_rows(out / r["slide"] / "tiles.csv"))
        assert n == len(_rows(out / r["slide"] / "scores.csv"))


def test_a_changed_slide_file_is_scored_again(cohort: dict,
                                              capsys: pytest.CaptureFixture) -> None:
    args: list[str] = cohort["args"]
    assert main(args) == 0
    s1 = Path(args[2])
    _slide(s1, 320, 7)  # the same name, other content
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "slide s0: reused" in err and "slide s1: scoring again" in err
    assert "slide s2: reused" in err


def test_slide_without_threshold_leaves_no_stale_flagged_csv(tmp_path: Path) -> None:
    from gen_ad.app.slide import score_slide
    from tests.unit.app.test_cohort import DarkScorer

    _slide(tmp_path / "s.tif", 320, 0)
    kw = {"size": 32, "level": 0, "min_tissue": 0.5, "progress": False}
    score_slide(tmp_path / "s.tif", DarkScorer(), tmp_path / "out", threshold=0.0, **kw)
    assert (tmp_path / "out" / "s" / "flagged.csv").is_file()
    score_slide(tmp_path / "s.tif", DarkScorer(), tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "s" / "flagged.csv").exists()
    metrics = json.loads((tmp_path / "out" / "s" / "metrics.json").read_text(encoding="utf-8"))
    assert "threshold" not in metrics


def test_tile_ctrl_c_stops_promptly_and_keeps_finished_slides(tmp_path: Path) -> None:
    _slide(tmp_path / "a.tif", 320, 0)
    _slide(tmp_path / "b.tif", 2560, 1)  # ~25,000 tiles of 16 px: tens of seconds
    out = tmp_path / "tiles"
    cmd = _cli("tile", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(out),
               "--size", "16", "--level", "0", "--min-tissue", "0.5", "--workers", "1")
    started = out / "b_x32_y0.png"
    rc, err, took = _signal_when(cmd, started.is_file, signal.SIGINT, timeout=60)
    assert rc == 130 and "gen-ad: interrupted" in err
    assert took < 10, f"Ctrl-C took {took:.1f} s to stop the tiling"
    rows = _rows(out / "manifest.csv")  # slide a, finished before the interrupt, is listed
    assert {r["slide"] for r in rows} == {"a"} and all((out / r["path"]).is_file()
                                                         for r in rows)


def test_cells_interrupted_keeps_the_previous_crops_whole(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import gen_ad.app.cells as cells_mod
    from gen_ad.data.fields import write_study

    study = write_study(tmp_path / "s", {"a": (2, 0.0)}, size=128, seed=0)
    out = tmp_path / "out"
    args = ["cells", str(study["slides"]), "--out", str(out), "--mpp", "1", "--size", "16",
            "--slide-mpp", "1", "--detect-mpp", "1"]
    assert main(args) == 0
    old = {p.name: p.read_bytes() for p in (out / "crops" / "a-01").glob("*.png")}
    real, n = cells_mod._write_crop, [0]

    def interrupted(*a: object) -> None:
        n[0] += 1
        if n[0] > 5:
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(cells_mod, "_write_crop", interrupted)
    assert main([*args[:-4], "--mpp", "0.5", "--slide-mpp", "1", "--detect-mpp", "1"]) == 130
    now = {p.name: p.read_bytes() for p in (out / "crops" / "a-01").glob("*.png")}
    assert now == old  # the earlier crops, whole: none deleted, none replaced at another mpp
    assert not [p for p in (out / "crops").iterdir() if p.name.startswith(".")]
    listed = {Path(r["path"]).name for r in _rows(out / "cells.csv") if r["slide"] == "a-01"}
    assert listed == set(old)


def test_benchmark_interrupted_leaves_no_earlier_results(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import gen_ad.app.benchmark as bench
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "train", 8, 32, 0, 0.0)
    write_folder(tmp_path / "val", 8, 32, 1, 0.0)
    write_folder(tmp_path / "test", 8, 32, 2, 0.5)
    out = tmp_path / "out"
    cfg = bench.BenchmarkConfig(**{
        "out": str(out), "data": bench.BenchDataConfig(test=str(tmp_path / "test"),
                                                      val=str(tmp_path / "val"), size=32),
        "methods": [bench.MethodConfig(knn=bench.KNNMethodConfig(
            extractor="colour-stats", k=3, bank=str(tmp_path / "train")))],
        "n_boot": 20, "device": "cpu", "examples": 0, "fid": bench.FIDConfig(enabled=False)})
    bench.run_benchmark(cfg, progress=False)
    assert (out / "results.json").is_file()

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "evaluate_method", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(cfg, progress=False)
    assert not (out / "results.json").exists() and not (out / "report.html").exists()


def test_groups_rerun_without_animals_leaves_no_stale_per_animal_csv(tmp_path: Path) -> None:
    from gen_ad.app.groups import write_group_outputs
    from gen_ad.metrics.stats import GroupSettings, group_analysis

    slides = [f"s{i}" for i in range(8) for _ in range(4)]
    scores = [float(i % 4 + (i // 4 >= 4)) for i in range(32)]
    groups = {f"s{i}": "control" if i < 4 else "treated" for i in range(8)}
    settings = GroupSettings(control="control", n_boot=20)
    animals = {f"s{i}": f"a{i // 2}" for i in range(8)}
    with_animals = group_analysis(slides, scores, groups, 2.5, settings, slide_animals=animals)
    assert "per_animal.csv" in {p.name for p in write_group_outputs(with_animals,
                                                                     tmp_path).values()}
    write_group_outputs(group_analysis(slides, scores, groups, 2.5, settings), tmp_path)
    assert not (tmp_path / "per_animal.csv").exists()
