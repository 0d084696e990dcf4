"""``gen-ad score`` saves threshold, calibration and context as one unit: a save killed at any
point leaves the previous set or the new one, never a mix that a later score would reuse; a set
saved by an older gen_ad as separate files is still read (with a warning)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import gen_ad.utils.io as gio
from gen_ad.app.evaluate import LoadedScorer
from gen_ad.app.score import _threshold, calibration_context
from gen_ad.data.synthetic import write_folder
from gen_ad.errors import DataError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.thresholds import Threshold

FPR = 0.2


class _MeanScorer(AnomalyScorer):
    """Score = image mean minus the mean ``fit`` learned (its calibration)."""

    name = "mean"

    def __init__(self) -> None:
        self.offset = 0.0

    def fit(self, normal_batches: Iterable[torch.Tensor]) -> _MeanScorer:
        self.offset = float(torch.cat(list(normal_batches)).mean())
        return self

    def calibration(self) -> dict[str, float]:
        return {"offset": self.offset}

    def load_calibration(self, state: dict[str, float]) -> None:
        self.offset = float(state["offset"])

    def score(self, x: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(x.mean(dim=(1, 2, 3)) - self.offset)


class _Killed(RuntimeError):
    """Stands for the process being killed."""


def _loaded() -> LoadedScorer:
    return LoadedScorer(_MeanScorer(), 16, "mean", run=SimpleNamespace(step=3))  # type: ignore[arg-type]


def _context(ls: LoadedScorer, method: str) -> dict[str, Any]:
    return calibration_context(ls, None, method, FPR)


def _set(ls: LoadedScorer, run: Path, normal: Path | None, method: str,
         limit: int | None) -> Threshold | None:
    """Calibrate on ``normal`` and save (or, with ``normal=None``, reuse) the ``m`` set."""
    return _threshold(ls, "m", run, normal, ("normal",), _context(ls, method), batch_size=4,
                      device="cpu", method=method, fpr=FPR, limit=limit)


@pytest.fixture
def val(tmp_path: Path) -> Path:
    write_folder(tmp_path / "val", n=10, size=16, seed=4, anomaly_fraction=0.0)
    return tmp_path / "val"


def _expected(tmp_path: Path, val: Path, method: str, limit: int | None
              ) -> tuple[Threshold, float]:
    """The threshold and calibration of a clean save with these settings."""
    ls = _loaded()
    th = _set(ls, tmp_path / "clean", val, method, limit)
    assert th is not None
    return th, ls.scorer.offset  # type: ignore[attr-defined]


@pytest.mark.parametrize("kill", ["before_first_write", "after_first_write"])
def test_killed_save_leaves_a_consistent_set(tmp_path: Path, val: Path, kill: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Set A (iqr, all 10 images) is saved; saving set B (fpr, 4 images: another threshold
    and calibration) is killed before or right after its first file write. A later score
    reuses whichever set is stored whole (A or B), and refuses the other's settings."""
    run = tmp_path / "run"
    a_th, a_cal = _expected(tmp_path, val, "iqr", None)
    b_th, b_cal = _expected(tmp_path, val, "fpr", 4)
    assert a_th != b_th and a_cal != b_cal
    assert _set(_loaded(), run, val, "iqr", None) == a_th

    real = gio.write_bytes

    def killed(path: Any, data: bytes) -> None:
        if kill == "after_first_write":
            real(path, data)
        raise _Killed(str(path))

    monkeypatch.setattr(gio, "write_bytes", killed)
    with pytest.raises(_Killed):
        _set(_loaded(), run, val, "fpr", 4)
    monkeypatch.undo()

    stored, stale = ("iqr", "fpr") if kill == "before_first_write" else ("fpr", "iqr")
    want_th, want_cal = (a_th, a_cal) if stored == "iqr" else (b_th, b_cal)
    ls = _loaded()
    assert _set(ls, run, None, stored, 4 if stored == "fpr" else None) == want_th
    assert ls.scorer.offset == want_cal  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="calibrated for other settings"):
        _set(_loaded(), run, None, stale, None)


def test_the_set_is_one_file_a_threshold_file_reader_accepts(tmp_path: Path, val: Path) -> None:
    """``<run>/thresholds/<m>.json`` holds threshold, calibration and context; it is still a
    threshold file (``Threshold.load``, ``gen-ad groups --threshold-file``)."""
    run = tmp_path / "run"
    ls = _loaded()
    th = _set(ls, run, val, "fpr", 4)
    assert sorted(p.name for p in (run / "thresholds").iterdir()) == ["m.json"]
    saved = json.loads((run / "thresholds" / "m.json").read_text())
    assert saved["calibration"] == {"offset": ls.scorer.offset}  # type: ignore[attr-defined]
    assert saved["context"] == {**_context(ls, "fpr"), "normal": str(val), "limit": 4}
    assert Threshold.load(run / "thresholds" / "m.json") == th


def test_a_set_saved_as_separate_files_is_still_read(tmp_path: Path, val: Path) -> None:
    """An older gen_ad's three files are reused (context checked, calibration loaded) with a
    warning; the next calibration replaces them by one file."""
    run, ls = tmp_path / "run", _loaded()
    th = _set(ls, run, val, "iqr", None)
    assert th is not None
    folder = run / "thresholds"
    saved = json.loads((folder / "m.json").read_text())
    th.save(folder / "m.json")  # the old layout: threshold, calibration and context apart
    (folder / "m.calibration.json").write_text(json.dumps(saved["calibration"]))
    (folder / "m.context.json").write_text(json.dumps(saved["context"]))

    again = _loaded()
    with pytest.warns(UserWarning, match="saved by an older gen_ad as separate files"):
        assert _set(again, run, None, "iqr", None) == th
    assert again.scorer.offset == ls.scorer.offset  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="calibrated for other settings"):
        _set(_loaded(), run, None, "fpr", None)

    (folder / "m.context.json").unlink()  # older still: no context at all
    with pytest.warns(UserWarning, match="no record of what it was calibrated for"):
        assert _set(_loaded(), run, None, "fpr", None) == th

    _set(_loaded(), run, val, "fpr", 4)
    assert sorted(p.name for p in folder.iterdir()) == ["m.json"]


def test_a_damaged_or_newer_set_is_refused(tmp_path: Path, val: Path) -> None:
    run = tmp_path / "run"
    _set(_loaded(), run, val, "iqr", None)
    path = run / "thresholds" / "m.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "format": 99}))
    with pytest.raises(DataError, match="format 99.*newer gen_ad"):
        _set(_loaded(), run, None, "iqr", None)
    path.write_text(json.dumps({**saved, "context": None}))
    with pytest.raises(DataError, match="damaged: context is not an object"):
        _set(_loaded(), run, None, "iqr", None)


# ----------------------------------------------------------------------------- default folder


def _saved_set(path: Path, context: dict[str, Any]) -> None:
    from gen_ad.scoring.thresholds import ThresholdSet

    ThresholdSet(Threshold(1.5, "iqr"), {"offset": 0.1}, context).save(path)


def test_without_normal_the_set_saved_for_the_same_settings_on_data_val_is_reused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --normal: a set the run saved on its data.val for the same settings, limit and pixel
    FPR is reused instead of fitting and calibrating again (minutes for a projection scorer);
    any other difference calibrates on data.val again."""
    from gen_ad.app.score import default_normal

    val = tmp_path / "val"
    val.mkdir()
    data = SimpleNamespace(val=str(val))
    th_file = tmp_path / "thresholds" / "mean.json"
    context = {"step": 4, "options": {"steps": 20}, "rule": "iqr"}
    pixel = {"status": "ok", "value": 0.3, "fpr": 0.01}
    _saved_set(th_file, {**context, "normal": str(val), "limit": 512, "pixel_threshold": pixel})
    assert default_normal(data, th_file, context, 512, 0.01) is None
    assert "reusing the threshold saved with the run" in capsys.readouterr().err
    assert default_normal(data, th_file, context, 256, 0.01) == str(val)  # another limit
    assert default_normal(data, th_file, context, 512, 0.05) == str(val)  # another pixel FPR
    assert default_normal(data, th_file, {**context, "step": 5}, 512, 0.01) == str(val)
    _saved_set(th_file, {**context, "normal": str(val), "limit": 512})  # before pixel thresholds
    assert default_normal(data, th_file, context, 512, 0.01) == str(val)


def test_a_data_val_not_found_from_here_falls_back_to_the_saved_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen_ad.app.score import default_normal

    data = SimpleNamespace(val="data/valid")  # relative: not found from this directory
    th_file = tmp_path / "thresholds" / "mean.json"
    context = {"step": 4, "rule": "iqr"}
    with pytest.raises(DataError, match="pass --normal DIR"):
        default_normal(data, th_file, context, 512, 0.01)  # nothing saved
    _saved_set(th_file, {**context, "normal": "data/valid", "limit": 512})
    assert default_normal(data, th_file, context, 512, 0.01) is None
    assert "is not found from" in capsys.readouterr().err
    with pytest.raises(DataError, match="pass --normal DIR"):
        default_normal(data, th_file, {**context, "step": 5}, 512, 0.01)  # saved for others
