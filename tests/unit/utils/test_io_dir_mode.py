"""A folder published through :func:`atomic_dir` + :func:`publish_dir` (cell crops, model
exports, KNN bank staging) gets the mode any folder gets under the process umask, as files do:
``tempfile.mkdtemp`` made it 0700, so colleagues on a shared server could not read it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gen_ad.utils.io import atomic_dir, publish_dir, sweep_temporaries, write_text


@pytest.fixture(params=[0o022, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask set to the parameter for the test, and restored after it (it is
    process-wide: restored in ``finally`` whatever the test does)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o7777


def test_a_published_folder_has_the_umask_mode(tmp_path: Path, umask: int) -> None:
    reference = tmp_path / "made-by-mkdir"
    os.mkdir(reference)
    final = tmp_path / "crops" / "slide-1"
    tmp = atomic_dir(final)
    assert _mode(tmp) == _mode(reference) == 0o777 & ~umask
    write_text(tmp / "a.txt", "x")
    publish_dir(tmp, final)
    assert _mode(final) == _mode(reference)
    assert (final / "a.txt").read_text() == "x"
    assert sorted(p.name for p in final.parent.iterdir()) == ["slide-1"]


def test_temporary_folders_are_unique_and_swept(tmp_path: Path) -> None:
    """Guard (passes on the old code too): each call gets its own folder (an existing name is
    never reused), under a name the sweep of an interrupted writer recognises."""
    final = tmp_path / "model"
    made = {atomic_dir(final) for _ in range(20)}
    assert len(made) == 20 and all(p.is_dir() and p.parent == tmp_path for p in made)
    assert all(p.name.startswith(f".model.{os.getpid()}-") and p.name.endswith(".tmp")
               for p in made)
    assert sorted(sweep_temporaries(tmp_path)) == sorted(made)
    assert list(tmp_path.iterdir()) == []
