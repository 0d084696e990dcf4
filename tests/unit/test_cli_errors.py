"""Issue 16 class 5: every user error is one line, exit 2, naming the key, value or path."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from gen_ad.cli import main

REPO = Path(__file__).resolve().parents[2]
WGAN = str(REPO / "configs" / "wgan" / "demo.yaml")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 170)).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _png()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin.yaml").write_bytes(b"out: caf\xe9\n")
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: [1,\n  max_steps: }\n")
    (tmp_path / "data" / "normal").mkdir(parents=True)
    (tmp_path / "imgs" / "normal").mkdir(parents=True)  # enough for --k 1: the weights are read
    for i in range(3):
        (tmp_path / "imgs" / "normal" / f"{i}.png").write_bytes(_PNG)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    return {k: tmp_path / k for k in ("afile", "latin.yaml", "bad.yaml", "data", "evil.pt",
                                      "imgs")}


def _cases(f: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    a, data = str(f["afile"]), str(f["data"])
    knn = ["knn", "fit", "--extractor", "dino-vits16", "--tiny", "--normal", data]
    return [
        (["train", "wgan", "--config", WGAN, f"out={a}"], f"run folder {a} is an existing file"),
        (["synth", "--out", a, "--n", "2"], f"{a} is an existing file"),
        (["tile", str(tmp / "s.svs"), "--out", a, "--size", "64"], f"{a} is an existing file"),
        ([*knn, "--random-init", "--out", a], f"bank folder {a} is an existing file"),
        (["score", str(tmp / "run"), "--data", data, "--out", a], f"{a} is an existing file"),
        ([*knn, "--random-init", "--out", str(tmp / "b"), "--workers", "-1"],
         "argument --workers: must be an integer >= 0, got -1"),
        (["tile", str(tmp / "s.svs"), "--out", str(tmp / "t"), "--size", "64", "--mpp", "nan"],
         "argument --mpp: must be a positive number, got nan"),
        (["score", str(tmp / "run"), "--data", data, "--out", str(tmp / "o"), "--device",
          "tpu9"], "--device 'tpu9' is not a device"),
        (["train", "wgan", "--config", str(f["latin.yaml"])], "is not UTF-8 text"),
        (["train", "wgan", "--config", str(f["bad.yaml"])], "is not valid YAML: expected the "
         "node content, but found '}' at line 3, column 14"),
        (["train", "wgan", "--config", WGAN, "train.seed=-1", f"out={tmp / 'r'}"],
         "config key 'train.seed': must be >= 0, got -1"),
        ([*knn[:-1], str(f["imgs"]), "--k", "1", "--weights", str(f["evil.pt"]), "--out",
          str(tmp / "b2")],
         "was refused: it holds Python objects other than tensors"),
    ]


def test_user_errors_are_one_line_exit_2(files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expected in _cases(files, tmp_path):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and expected in err[0], (argv, rc, err)
    assert files["afile"].read_text() == "x"
    assert not (tmp_path / "pwned").exists()


def test_train_scripts_print_errors_as_the_cli_does(capsys: pytest.CaptureFixture) -> None:
    """``train/<family>.py`` (train_main) gives the same one-line ``gen-ad: error:`` and exit 2
    as ``gen-ad train`` (it printed a bare ``error:``)."""
    from gen_ad.cli import train_main

    assert train_main("wgan", ["--config", WGAN, "train.batch_size=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen-ad: error:") and "train.batch_size" in err and "\n" not in err


def test_other_processes_of_a_launch_stay_quiet_about_shared_errors(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``accelerate launch`` every process runs the CLI: a config error (met alike by
    all) is printed by the main process only; another error names the process it came from."""
    from gen_ad.cli import _print_error
    from gen_ad.errors import CheckpointError, ConfigError, DataError

    monkeypatch.setenv("RANK", "1")
    assert main(["train", "wgan", "--config", WGAN, "train.batch_size=-1"]) == 2
    assert capsys.readouterr().err == ""
    handed_on = CheckpointError("no checkpoint (the main process could not resume)")
    handed_on.from_main_process = True  # type: ignore[attr-defined]
    _print_error(handed_on)
    _print_error(ConfigError("bad key"))
    assert capsys.readouterr().err == ""
    _print_error(DataError("corrupt shard"))
    assert capsys.readouterr().err == "gen-ad: error (process 1): corrupt shard\n"
    monkeypatch.setenv("RANK", "0")
    _print_error(ConfigError("bad key"))
    assert capsys.readouterr().err == "gen-ad: error: bad key\n"


def test_only_training_runs_under_a_multi_process_launch(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch -m gen_ad.cli knn fit`` started two fits of one bank (the second
    refused by the lock, the launcher then killed the first): now refused before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen-ad: error: gen-ad synth runs in one process") and "\n" not in \
        err.strip()
    assert not (tmp_path / "s").exists()
