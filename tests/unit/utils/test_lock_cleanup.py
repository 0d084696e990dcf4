"""A command that fails in an output folder its lock created, having written nothing, leaves no
folder (only ``.gen-ad.lock`` was there); anything else stays as it was. A writer that takes the
lock of a lock file removed that way meanwhile takes it again on the file that is there."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gen_ad.errors import FolderLockedError
from gen_ad.utils import lock
from gen_ad.utils.lock import LOCK_NAME, FlockLocker, folder_lock


class Boom(Exception):
    pass


def _fail_in(folder: Path, write: str | None = None,
             error: type[BaseException] = Boom) -> None:
    with pytest.raises(error):
        with folder_lock(folder):
            if write:
                (folder / write).write_text("x")
            raise error()


def test_a_failure_in_a_folder_it_created_removes_every_level_it_created(tmp_path: Path) -> None:
    _fail_in(tmp_path / "a" / "b" / "bank")
    assert list(tmp_path.iterdir()) == []  # a/, a/b/ and bank/ were all made by the lock


def test_an_interrupt_counts_as_a_failure(tmp_path: Path) -> None:
    _fail_in(tmp_path / "bank", error=KeyboardInterrupt)
    assert not (tmp_path / "bank").exists()


def test_a_folder_that_existed_stays(tmp_path: Path) -> None:
    (tmp_path / "a" / "bank").mkdir(parents=True)
    _fail_in(tmp_path / "a" / "bank")
    assert sorted(p.name for p in (tmp_path / "a" / "bank").iterdir()) == [LOCK_NAME]


def test_only_the_levels_it_created_are_removed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _fail_in(tmp_path / "a" / "b" / "bank")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and list((tmp_path / "a").iterdir()) == []


def test_a_folder_with_something_written_stays(tmp_path: Path) -> None:
    _fail_in(tmp_path / "out", write="partial.csv")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME, "partial.csv"]


def test_a_success_keeps_the_folder_it_created(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "out"):
        pass
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]


def test_nested_use_the_outer_lock_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Boom):
        with folder_lock(out):
            with folder_lock(out):  # the same process again: it created nothing
                raise Boom()
    assert not out.exists()


@dataclass
class RemovedUnderfoot:
    """A locker whose first ``removals`` successful locks find their lock file removed (and
    its folder) by the previous holder between the open and the lock."""

    folder: Path
    removals: int
    inner: FlockLocker = field(default_factory=lambda: FlockLocker(fcntl))
    taken: int = 0

    def try_lock(self, fd: int) -> bool:
        ok = self.inner.try_lock(fd)
        if ok and self.taken < self.removals:
            self.taken += 1
            (self.folder / LOCK_NAME).unlink()
            self.folder.rmdir()
        return ok

    def unlock(self, fd: int) -> None:
        self.inner.unlock(fd)


def test_a_lock_taken_on_a_removed_file_is_taken_again(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    locker = RemovedUnderfoot(out, removals=1)
    monkeypatch.setattr(lock, "_LOCKER", locker)
    with folder_lock(out):
        path = out / LOCK_NAME
        assert locker.taken == 1 and path.is_file()  # the folder and its lock file are back
        assert json.loads(path.read_text())["pid"] == os.getpid()  # and this process holds it
        probe = os.open(path, os.O_RDWR)
        try:
            assert not FlockLocker(fcntl).try_lock(probe)  # the file at that name is locked
        finally:
            os.close(probe)


def test_a_lock_file_removed_every_time_is_an_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "_LOCKER", RemovedUnderfoot(tmp_path / "out", removals=99))
    with pytest.raises(FolderLockedError, match="keeps being removed"):
        with folder_lock(tmp_path / "out"):
            pass


def test_where_an_open_lock_file_cannot_be_deleted_the_folder_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows refuses to delete an open file: the folder and its lock file stay, as before."""
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == LOCK_NAME:
            raise PermissionError(13, "The process cannot access the file", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    _fail_in(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]
