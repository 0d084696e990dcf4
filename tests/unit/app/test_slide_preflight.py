"""``gen-ad slide`` checks every slide before scoring any (one error lists every bad slide), and
reuses a finished slide when the resolved tiling is the same, whatever flags produced it; the
reason it scores again names the top-level settings that differ (``code`` for gen_ad's sources).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

import gen_ad.app.slide as app_slide
import gen_ad.utils.identity as identity
from gen_ad.app.evaluate import LoadedScorer
from gen_ad.cli import main
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch


class CountingScorer(AnomalyScorer):
    """Score = 1 - mean intensity; counts the tiles it scored."""

    name = "dark"

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def score(self, x: torch.Tensor) -> ScoreBatch:
        self.seen += int(x.shape[0])
        return ScoreBatch(scores=1.0 - x.mean(dim=(1, 2, 3)))


def _tif(path: Path, mpp: float | None = None, side: int = 128) -> Path:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((200, 110, 170), 35, (side, side, 3)), 0, 255).astype(np.uint8)
    extra: dict[str, Any] = {}
    if mpp is not None:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", **extra)
    return path


@pytest.fixture
def scorer(monkeypatch: pytest.MonkeyPatch) -> CountingScorer:
    """A scorer loaded for any --run, identified by a constant (so its slides can be reused)."""
    s = CountingScorer()
    monkeypatch.setattr(app_slide, "load_scorer", lambda **kw: LoadedScorer(s, 16, "dark"))
    monkeypatch.setattr(app_slide, "scorer_identity", lambda run, bank: {"fixed": 1})
    return s


def _run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["slide", "--run", "unused", "--size", "16", "--device", "cpu", "--min-tissue",
               "0", *map(str, args)])
    return rc, capsys.readouterr().err


def test_every_slide_is_checked_before_any_is_scored(
        tmp_path: Path, scorer: CountingScorer, capsys: pytest.CaptureFixture[str]) -> None:
    """The first slide is fine; two record no mpp (needed by --mpp), one is missing: one error
    lists all three and nothing is scored or written."""
    good = _tif(tmp_path / "a.tif", mpp=0.25)
    no_mpp = [_tif(tmp_path / "b.tif"), _tif(tmp_path / "c.tif")]
    out = tmp_path / "out"
    rc, err = _run(capsys, good, *no_mpp, tmp_path / "gone.tif", "--out", out, "--mpp", "0.5")
    assert rc == 2 and scorer.seen == 0
    assert not (out / "a").exists() and not (out / "b").exists()
    [line] = [ln for ln in err.splitlines() if ln.startswith("gen-ad: error:")]
    assert "3 of 4 slide(s) cannot be scored, so none was" in line
    assert f"(1) slide {no_mpp[0]} does not record its microns per pixel" in line
    assert f"(2) slide {no_mpp[1]} does not record" in line
    assert f"(3) slide not found: {tmp_path / 'gone.tif'}" in line
    assert "a.tif" not in line and line.count("--slide-mpp") == 1  # the advice, once
    rc, err = _run(capsys, good, *no_mpp, "--out", out, "--level", "1")
    assert rc == 2 and scorer.seen == 0
    assert "level 1 does not exist" in err and "3 of 3" in err  # every slide has one level
    rc, _ = _run(capsys, good, *no_mpp, "--out", out, "--mpp", "0.5", "--slide-mpp", "0.25")
    assert rc == 0 and scorer.seen > 0
    assert all((out / s / "slide.json").is_file() for s in "abc")


def test_a_slide_smaller_than_a_tile_is_named_before_scoring(
        tmp_path: Path, scorer: CountingScorer, capsys: pytest.CaptureFixture[str]) -> None:
    small = _tif(tmp_path / "small.tif", mpp=0.25, side=24)
    rc, err = _run(capsys, _tif(tmp_path / "a.tif", mpp=0.25), small, "--out", tmp_path / "o",
                   "--level", "0", "--size", "32")
    assert rc == 2 and scorer.seen == 0
    assert f"(1) slide {small} (24 x 24 level-0 px) is smaller than one tile (32" in err


def test_reuse_compares_the_resolved_tiling_not_the_flags(
        tmp_path: Path, scorer: CountingScorer, capsys: pytest.CaptureFixture[str]) -> None:
    """A slide recording 0.25 um/px: --slide-mpp it ignores, --level 0 for the --mpp 0.25 it
    equals, --stride equal to --size change nothing; --slide-mpp-force changes the tiles."""
    slide = _tif(tmp_path / "s.tif", mpp=0.25)
    base = [slide, "--out", tmp_path / "out"]
    assert _run(capsys, *base, "--mpp", "0.5")[0] == 0
    first = json.loads((tmp_path / "out" / "s" / "slide.json").read_text())
    assert (first["settings"]["slide_mpp"], first["settings"]["downsample"]) == (0.25, 2.0)
    for extra in (["--mpp", "0.5", "--slide-mpp", "0.5"],  # ignored (recorded 0.25 wins)
                  ["--mpp", "0.5", "--stride", "16"]):
        with pytest.warns(RuntimeWarning) if "--slide-mpp" in extra else _nothing():
            rc, err = _run(capsys, *base, *extra)
        assert rc == 0 and "slide s: reused" in err, (extra, err)
    rc, err = _run(capsys, *base, "--mpp", "0.5", "--slide-mpp", "0.5", "--slide-mpp-force")
    assert rc == 0
    assert "scoring again (it was scored with other settings (downsample, read_size, " \
           "slide_mpp))" in err
    assert _run(capsys, *base, "--mpp", "0.25")[0] == 0  # level 0, read 16 px: as --level 0
    assert "slide s: reused" in _run(capsys, *base, "--level", "0")[1]


def test_edited_code_says_code_and_old_records_are_scored_again(
        tmp_path: Path, scorer: CountingScorer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    slide = _tif(tmp_path / "s.tif", mpp=0.25)
    base = [slide, "--out", tmp_path / "out", "--mpp", "0.5"]
    assert _run(capsys, *base)[0] == 0
    path = tmp_path / "out" / "s" / "slide.json"
    rec = json.loads(path.read_text())
    assert rec["settings"]["code"] == identity.code_identity()
    assert "code" not in rec["settings"]["scorer"]
    monkeypatch.setattr(app_slide, "code_identity",
                        lambda: {**identity.code_identity(), "sources_sha256": "0" * 64})
    rc, err = _run(capsys, *base)
    assert rc == 0 and "scoring again (it was scored with other settings (code))" in err
    monkeypatch.setattr(app_slide, "code_identity", identity.code_identity)  # edit undone
    old = json.loads(path.read_text())  # as an earlier gen_ad wrote it: code in the scorer
    old["settings"]["scorer"]["code"] = old["settings"].pop("code")
    for k in ("downsample", "read_size"):
        old["settings"].pop(k)
    old["settings"].update(level=None, mpp=0.5, slide_mpp=None, force_slide_mpp=False,
                           stride=None)
    old["settings_sha256"] = "0" * 64
    path.write_text(json.dumps(old))
    rc, err = _run(capsys, *base)
    assert rc == 0 and "slide s: scoring again (it was scored with other settings (scorer, " \
                       "code, downsample, level, read_size, slide_mpp, stride))" in err
    assert json.loads(path.read_text())["settings"] == rec["settings"]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
