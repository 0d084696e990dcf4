"""``gen-ad configs`` (list, show, copy the built-in configs), ``--config NAME`` from a folder
without configs/, ``gen-ad --version`` and ``python -m gen_ad``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gen_ad
from gen_ad.cli import main
from gen_ad.config import builtin_config, builtin_configs

ROOT = Path(__file__).resolve().parents[3]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse exits for --version, --help and usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_names_every_builtin_config(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["configs"], ["configs", "list"]):
        rc, out, _ = _run(capsys, *argv)
        lines = out.splitlines()
        assert rc == 0 and [ln.split()[0] for ln in lines[:-1]] == list(builtin_configs())
        assert "ddpm/demo" in out and "Tiny DDPM on synthetic tissue" in out
        assert lines[-1].startswith(f"({len(builtin_configs())} built-in configs in ")
        assert all(len(ln) <= 100 for ln in lines[:-1])


def test_show_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "configs", "show", "configs/wgan/demo_encoder.yaml")
    assert rc == 0 and out == builtin_config("wgan/demo_encoder").read_text(encoding="utf-8")


def test_copy_writes_editable_copies_and_never_overwrites(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, "configs", "copy", "ddpm/demo", "wgan")
    wgan = sorted(n for n in builtin_configs() if n.startswith("wgan/"))
    written = [Path("configs") / f"{n}.yaml" for n in ["ddpm/demo", *wgan]]
    assert rc == 0 and out.splitlines() == [f"wrote {p}" for p in written]
    for p in written:
        assert p.read_bytes() == builtin_config(p.relative_to("configs").as_posix()).read_bytes()
    edited = tmp_path / "configs" / "ddpm" / "demo.yaml"
    edited.write_text("out: edited\n", encoding="utf-8")
    rc, out, err = _run(capsys, "configs", "copy", "all")
    assert rc == 2 and out == "" and "configs/ddpm/demo.yaml" in err and "--force" in err
    assert edited.read_text(encoding="utf-8") == "out: edited\n"
    assert not (tmp_path / "configs" / "stylegan2").exists()  # nothing copied at all
    rc, out, _ = _run(capsys, "configs", "copy", "all", "--force", "--to", "mine")
    assert rc == 0 and len(out.splitlines()) == len(builtin_configs())


def test_unknown_name_is_one_line_with_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "configs", "show", "ddpm/dmeo")
    assert rc == 2 and err.strip().splitlines() == [
        "gen-ad: error: no built-in config 'ddpm/dmeo'; did you mean ddpm/demo, ddpm/pcam64? "
        "(`gen-ad configs list` lists them)"]


def test_train_config_path_from_another_folder(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ``--config configs/wgan/demo.yaml`` from a folder without it: the built-in
    config is used and named in a warning (one stderr line under the CLI; the bad override
    then stops it before any work)."""
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"^config configs/wgan/demo.yaml: no such file here, "
                      r"using the built-in config wgan/demo \("):
        rc, _, err = _run(capsys, "train", "wgan", "--config", "configs/wgan/demo.yaml",
                          "bogus=1")
    assert rc == 2 and err.startswith("gen-ad: error: unknown config key 'bogus'")
    assert not (tmp_path / "checkpoints").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out == f"gen-ad {gen_ad.__version__}\n"


def test_python_dash_m_gen_ad(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "gen_ad", "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert res.returncode == 0 and res.stdout == f"gen-ad {gen_ad.__version__}\n", res.stderr
