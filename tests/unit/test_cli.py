"""The gen-ad command line: help, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gen_ad.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse exits for --help and usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_working_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for cmd in ("train", "score", "synth", "tile", "fid", "knn", "groups"):
        assert cmd in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys)
    assert rc == 2 and "usage" in out


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "frobnicate")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "train", "wgan", "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2
    missing = tmp_path / "nope.yaml"
    assert err.strip().splitlines() == [f"gen-ad: error: config file not found: {missing}"]


def test_bad_config_key_named_before_any_work(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out: {tmp_path / 'run'}\n")
    rc, _, err = _run(capsys, "train", "ddpm", "--config", str(cfg), "train.batch_sise=3")
    assert rc == 2 and "train.batch_sise" in err and "train.batch_size" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_score_missing_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "score", str(tmp_path / "norun"), "--data", str(tmp_path),
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and "run folder not found" in err


def test_console_script_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "gen_ad.cli", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "gen-ad" in proc.stdout
