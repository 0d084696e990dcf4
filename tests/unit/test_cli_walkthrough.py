"""Findings of a new-user walkthrough of ``gen-ad``: ``--fpr`` selects its rule, warnings are one
line each, help text renders and says what the code does, ``score --limit``, ``score`` without
a threshold says so."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import gen_ad.app.knn as app_knn
import gen_ad.app.score as app_score
from gen_ad import cli


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse exits for --help and usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _metrics(**extra: Any) -> dict[str, Any]:
    return {"method": "m", "n": 3, "ms_per_image": 1.0, "threshold_source": "s", **extra}


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments ``gen-ad score`` / ``gen-ad knn score`` pass to the command layer
    (which is replaced: it returns metrics without a threshold)."""
    seen: list[dict[str, Any]] = []

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return {"m": _metrics()} if "normal_classes" in kwargs else _metrics()

    monkeypatch.setattr(app_score, "score_run", fake)
    monkeypatch.setattr(app_knn, "score_folder", fake)
    return seen


SCORE = ["score", "run", "--data", "d", "--out", "o"]
KNN = ["knn", "score", "bank", "--data", "d", "--out", "o"]


@pytest.mark.parametrize("cmd", [SCORE, KNN], ids=["score", "knn-score"])
@pytest.mark.parametrize(("extra", "rule"), [
    ([], ("iqr", 0.05)),
    (["--fpr", "0.3"], ("fpr", 0.3)),
    (["--threshold", "fpr"], ("fpr", 0.05)),
    (["--threshold", "fpr", "--fpr", "0.2"], ("fpr", 0.2)),
    (["--threshold", "iqr"], ("iqr", 0.05)),
])
def test_fpr_implies_the_fpr_rule(calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
                                  cmd: list[str], extra: list[str],
                                  rule: tuple[str, float]) -> None:
    rc, _, err = _run(capsys, *cmd, *extra)
    assert rc == 0, err
    assert (calls[0]["threshold_method"], calls[0]["fpr"]) == rule


@pytest.mark.parametrize("cmd", [SCORE, KNN], ids=["score", "knn-score"])
def test_fpr_with_another_rule_is_a_usage_error(calls: list[dict[str, Any]],
                                                capsys: pytest.CaptureFixture[str],
                                                cmd: list[str]) -> None:
    rc, _, err = _run(capsys, *cmd, "--threshold", "iqr", "--fpr", "0.3")
    assert rc == 2 and not calls
    assert err.strip().splitlines() == ["gen-ad: error: --fpr 0.3 applies to --threshold fpr, "
                                        "not --threshold iqr; drop one of them"]


def test_score_without_threshold_says_nothing_is_flagged(
        calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, *SCORE, "--limit", "7")
    assert rc == 0 and calls[0]["limit"] == 7
    assert cli.NO_THRESHOLD_NOTE in out.splitlines()
    assert "--normal DIR" in cli.NO_THRESHOLD_NOTE and "flagged.csv" in cli.NO_THRESHOLD_NOTE


def test_score_limit_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, *SCORE, "--limit", "0")
    assert rc == 2 and "argument --limit: must be a positive integer" in err


# ----------------------------------------------------------------------------- warnings


def _show_like_python(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """What ``warnings.showwarning`` does outside pytest (which records warnings instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.fixture()
def warning_command(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make ``gen-ad score`` warn one message three times and another once, shown as a plain
    Python process shows warnings."""

    def fake(*args: Any, **kwargs: Any) -> dict[str, Any]:
        for text in ("same thing", "same thing", "other thing", "same thing"):
            warnings.warn(text, UserWarning, stacklevel=1)
        return {"m": _metrics()}

    monkeypatch.setattr(app_score, "score_run", fake)
    monkeypatch.setattr(warnings, "showwarning", _show_like_python)

    def arm() -> None:
        warnings.simplefilter("always")

    return arm


def test_warnings_are_one_line_each_once(warning_command: Callable[[], None],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warning_command()
        rc, _, err = _run(capsys, *SCORE)
    assert rc == 0
    assert err.splitlines() == ["gen-ad: warning: same thing", "gen-ad: warning: other thing"]
    assert warnings.formatwarning is before  # library users keep Python's format


def test_debug_keeps_the_full_warning_format(warning_command: Callable[[], None],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warning_command()
        rc, _, err = _run(capsys, "--debug", *SCORE)
    assert rc == 0 and "UserWarning: same thing" in err and "gen-ad: warning" not in err


@pytest.mark.parametrize("rank,shown", [("0", True), ("1", False)])
def test_only_the_main_process_writes_warnings(monkeypatch: pytest.MonkeyPatch, rank: str,
                                               shown: bool) -> None:
    """Under ``accelerate launch`` every process would repeat each config or data warning."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with cli.cli_warnings():
        text = warnings.formatwarning("skipping 1 unreadable of 9 images", UserWarning, "f.py", 1)
    assert text == ("gen-ad: warning: skipping 1 unreadable of 9 images\n" if shown else "")


def test_cli_warnings_restores_the_format_after_an_error() -> None:
    before = warnings.formatwarning
    with pytest.raises(RuntimeError), cli.cli_warnings():
        assert warnings.formatwarning is not before
        raise RuntimeError("boom")
    assert warnings.formatwarning is before


def test_stray_image_warning_as_a_user_sees_it(tmp_path: Path) -> None:
    """``gen-ad synth`` leaves contact_sheet.png beside the class folders: the warning names
    it, in one line, once, although the folder is listed twice."""
    for j in range(4):
        (tmp_path / "data" / "normal").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (120 + j, 80, 140)).save(tmp_path / "data" / "normal"
                                                             / f"{j}.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "data" / "contact_sheet.png")
    proc = subprocess.run([sys.executable, "-m", "gen_ad.cli", "knn", "fit", "--extractor",
                           "colour-stats", "--normal", str(tmp_path / "data"), "--out",
                           str(tmp_path / "bank"), "--k", "1", "--workers", "0", "--device",
                           "cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()]
    assert warned == [f"gen-ad: warning: 1 image directly in {tmp_path / 'data'} "
                      "(contact_sheet.png) is ignored because it has class subfolders (normal)"]


# ----------------------------------------------------------------------------- help text


@pytest.fixture()
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Help text on one long line per option (argparse wraps at hyphens otherwise)."""
    monkeypatch.setenv("COLUMNS", "2000")


def test_descriptions_render_percent_signs(capsys: pytest.CaptureFixture[str],
                                           wide: None) -> None:
    _, score, _ = _run(capsys, "score", "--help")
    _, slide, _ = _run(capsys, "slide", "--help")
    assert "95% CIs" in score and "top 1%)" in slide
    assert "%%" not in score + slide


def test_fid_help_gives_the_weights_lookup_order(capsys: pytest.CaptureFixture[str],
                                                 wide: None) -> None:
    _, out, _ = _run(capsys, "fid", "--help")
    text = " ".join(out.split())
    order = ["gen-ad weights install", "gen_ad-fid-inception.safetensors",
             "weights-inception-2015-12-05-6726825d.pth", "download"]
    assert all(s in text for s in order), text
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)


def test_knn_help_describes_and_lists_every_extractor(capsys: pytest.CaptureFixture[str],
                                                       wide: None) -> None:
    from gen_ad.baselines.extractors import extractor_names

    _, fit, _ = _run(capsys, "knn", "fit", "--help")
    _, score, _ = _run(capsys, "knn", "score", "--help")
    assert "Embed a folder of normal patches" in fit
    assert "Score a patch folder by the distance" in score
    options = fit.split("options:")[1]
    listed = options.split("--extractor NAME")[1].split("--weights")[0].replace(",", " ").split()
    assert "colour-stats" in listed
    assert set(extractor_names()) <= set(listed), listed
