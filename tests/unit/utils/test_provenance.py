"""Provenance: the package versions, the source commit and the one-line description."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest

import gen_ad.utils.provenance as pv


def test_package_versions_are_the_installed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    got = pv.package_versions()
    assert got["torch"] == metadata.version("torch")
    assert got["numpy"] == metadata.version("numpy")
    monkeypatch.setattr(pv, "_PACKAGES", (("no-such-dist-xyz",), ("no-such-dist-xyz", "numpy")))
    assert pv.package_versions() == {"no-such-dist-xyz": None, "numpy": metadata.version("numpy")}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_source_commit_and_dirty_flag(tmp_path: Path) -> None:
    assert pv.source_commit(tmp_path) is None  # not a checkout (an installed wheel)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n", encoding="utf-8")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("not counted", encoding="utf-8")
    assert pv.source_commit(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n", encoding="utf-8")
    assert pv.source_commit(tmp_path) == {"commit": sha, "dirty": True}


def test_environment_and_its_one_line_description() -> None:
    import gen_ad

    env = pv.environment("cpu")
    assert env["gen_ad"] == gen_ad.__version__ and env["device"] == "cpu" and "gpu" not in env
    import torch

    assert env["threads"] == torch.get_num_threads()
    line = pv.describe({**env, "source": {"commit": "0123456789abcdef", "dirty": True}})
    assert line.startswith(f"gen_ad {gen_ad.__version__} (commit 0123456, modified)")
    assert f"torch {env['packages']['torch']}" in line
    assert pv.describe({**env, "source": None}).startswith(f"gen_ad {gen_ad.__version__} · ")


def test_the_decoders_of_slides_and_tiffs_are_recorded() -> None:
    """tifffile/imagecodecs/openslide/tiffslide decide the pixels a slide or TIFF patch gives."""
    got = pv.package_versions()
    for name in ("tifffile", "imagecodecs", "openslide-python", "tiffslide"):
        assert name in got
    assert got["tifffile"] == metadata.version("tifffile")
