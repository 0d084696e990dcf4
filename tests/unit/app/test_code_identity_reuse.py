"""One code identity (:func:`gen_ad.utils.identity.code_identity`: gen_ad's version and a sha256
of its ``*.py`` sources) keys the reuse of finished slides (``gen-ad slide``) and benchmark
methods; a README edit or a commit that changes no code invalidates nothing, an edited source
does. ``gen-ad tile`` notes it beside its settings (tiling keys on the version and
:data:`~gen_ad.data.tile_records.TILING_SCHEME` only).

The package hashed is pointed at a temporary one; clearing the per-process cache stands for a
new process (the code a process runs is the code it imported).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

import gen_ad.utils.identity as identity
import gen_ad.utils.provenance as provenance
from gen_ad.cli import main


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary package in place of gen_ad's sources, and a settable source commit."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n", encoding="utf-8")
    (pkg / "sub" / "b.py").write_text("y = 2\n", encoding="utf-8")
    monkeypatch.setattr(identity, "PACKAGE", pkg)
    _commit(monkeypatch, "a" * 40)
    identity._package_sha256.cache_clear()
    yield pkg
    identity._package_sha256.cache_clear()  # no temporary package's hash outlives the test


def _commit(monkeypatch: pytest.MonkeyPatch, sha: str) -> None:
    monkeypatch.setattr(provenance, "source_commit",
                        lambda *a, **k: {"commit": sha, "dirty": False})


def _new_process() -> None:
    identity._package_sha256.cache_clear()


def _slide(path: Path, side: int = 192) -> Path:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((210, 120, 175), 12, (side, side, 3)), 0, 255).astype(np.uint8)
    img[:, :32] = 246  # glass
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
    return path


def _err(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().err


def test_code_identity_is_the_version_and_the_sources_hash(package: Path) -> None:
    from gen_ad._version import __version__

    found = identity.code_identity()
    assert found == {"gen_ad": __version__, "sources_sha256": identity.sources_sha256(package)}
    assert identity.code_record() == {**found, "source": {"commit": "a" * 40, "dirty": False}}
    (package / "a.py").write_text("x = 3\n", encoding="utf-8")
    assert identity.code_identity() == found  # read once per process
    _new_process()
    assert identity.code_identity() != found


def test_benchmark_reuse_has_no_code_identity_of_its_own() -> None:
    import gen_ad.app.benchmark_reuse as reuse

    assert reuse.code_identity is identity.code_identity
    assert not hasattr(reuse, "sources_sha256")


def test_a_slide_is_reused_across_commits_and_rescored_for_edited_code(
        package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Slide reuse keyed on the commit: a README edit or a code-free commit rescored every
    slide, and an edited but uncommitted source reused slides scored by other code."""
    from gen_ad.app.knn import fit_folder
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "normal", 8, 32, 0, 0.0)
    fit_folder("colour-stats", tmp_path / "normal", tmp_path / "bank", k=3, size=32,
               workers=0, calib_size=8, device="cpu")
    out = tmp_path / "out"
    args = ["slide", str(_slide(tmp_path / "s0.tif")), "--bank", str(tmp_path / "bank"),
            "--out", str(out), "--level", "0", "--min-tissue", "0.5", "--device", "cpu"]
    _err(capsys, args)
    first = json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8"))
    assert first["settings"]["code"]["sources_sha256"] == identity.sources_sha256(package)
    assert first["code"]["source"]["commit"] == "a" * 40  # noted, not compared
    (package / "README.md").write_text("edited\n", encoding="utf-8")  # no code changes
    (package / "sub" / "data.json").write_text("{}\n", encoding="utf-8")
    _commit(monkeypatch, "b" * 40)
    _new_process()
    assert "slide s0: reused" in _err(capsys, args)
    assert json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8")) == first
    (package / "sub" / "b.py").write_text("y = 3\n", encoding="utf-8")  # uncommitted edit
    _new_process()
    err = _err(capsys, args)
    assert "slide s0: scoring again (it was scored with other settings (code))" in err
    again = json.loads((out / "s0" / "slide.json").read_text(encoding="utf-8"))
    assert again["settings"]["code"]["sources_sha256"] == \
        identity.sources_sha256(package) != first["settings"]["code"]["sources_sha256"]
    assert again["code"]["source"]["commit"] == "b" * 40
    _new_process()
    assert "slide s0: reused" in _err(capsys, args)


def test_tiles_note_the_code_and_are_reused_across_commits_and_edits(
        package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Tiling keys on gen_ad's version and the tiling scheme only (hours of tiling are not
    redone for an edit elsewhere); the record notes the code identity and the commit."""
    out = tmp_path / "out"
    args = ["tile", str(_slide(tmp_path / "s0.tif")), "--out", str(out), "--size", "32",
            "--level", "0", "--min-tissue", "0.5", "--workers", "1"]
    _err(capsys, args)
    rec: dict[str, Any] = json.loads((out / "tiled" / "s0.json").read_text(encoding="utf-8"))
    assert rec["code"] == identity.code_record()
    assert rec["code"]["sources_sha256"] == identity.sources_sha256(package)
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (package / "a.py").write_text("x = 5\n", encoding="utf-8")
    _commit(monkeypatch, "c" * 40)
    _new_process()
    assert "tile s0: reused" in _err(capsys, args)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == times
