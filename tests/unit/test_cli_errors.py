"""Issue 16 class 5: every user error is one line, exit 2, naming the key, value or path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gen_ad.cli import main

REPO = Path(__file__).resolve().parents[2]
WGAN = str(REPO / "configs" / "wgan" / "demo.yaml")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin.yaml").write_bytes(b"out: caf\xe9\n")
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: [1,\n  max_steps: }\n")
    (tmp_path / "data" / "normal").mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    return {k: tmp_path / k for k in ("afile", "latin.yaml", "bad.yaml", "data", "evil.pt")}


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
        ([*knn, "--weights", str(f["evil.pt"]), "--out", str(tmp / "b2")],
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
