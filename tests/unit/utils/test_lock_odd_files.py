"""The lock file must be a plain file of its own: a hard link, a FIFO or (on Windows, which has
no ``O_NOFOLLOW``) a symbolic link named ``.gen-ad.lock`` is refused with a DataError that says
what to do, before anything is emptied; and a lock whose release fails is still unlocked and
closed.

Windows is simulated as in ``test_lock_portable``: the lock module's flags lose ``O_NOFOLLOW``
and its locker is ``MsvcrtLocker`` over a small fake ``msvcrt`` (``flock`` underneath).
"""

from __future__ import annotations

import errno
import fcntl
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gen_ad.errors import DataError
from gen_ad.utils import lock
from gen_ad.utils.lock import LOCK_NAME, folder_lock, lock_holder

PRECIOUS = "important data\n" * 100


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of someone's that a lock file may link to."""
    p = tmp_path / "precious.txt"
    p.write_text(PRECIOUS, encoding="utf-8")
    return p


def _fake_msvcrt() -> types.ModuleType:
    """``msvcrt.locking`` with the real one's contract, emulated with ``flock``."""
    lk_unlck, lk_nblck = 0, 2

    def locking(fd: int, mode: int, nbytes: int) -> None:
        if mode == lk_nblck:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EACCES, "Permission denied") from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)

    mod = types.ModuleType("msvcrt")
    mod.__dict__.update(LK_UNLCK=lk_unlck, LK_NBLCK=lk_nblck, locking=locking)
    return mod


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The lock module as on Windows: no ``O_NOFOLLOW`` in its open flags, ``msvcrt`` locks."""
    monkeypatch.setattr(lock, "_OPEN_FLAGS", lock._OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    monkeypatch.setattr(lock, "_LOCKER", lock.MsvcrtLocker(_fake_msvcrt()))
    monkeypatch.delattr(os, "pwrite", raising=False)
    yield


def _refused(folder: Path, what: str) -> None:
    """folder_lock(folder) raises the DataError naming the lock file and ``what`` it is."""
    with pytest.raises(DataError) as info, folder_lock(folder, "run folder"):
        pytest.fail("the lock was taken")
    msg = str(info.value)
    assert msg.startswith(f"cannot write in run folder {folder}: its lock file "
                          f"{folder / LOCK_NAME} {what}"), msg
    assert f"delete {folder / LOCK_NAME}" in msg and "\n" not in msg


def test_a_hard_linked_lock_file_is_refused_not_emptied(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / LOCK_NAME)
    before = _open_fds()
    _refused(out, "is a hard link")
    assert victim.read_text(encoding="utf-8") == PRECIOUS
    assert _open_fds() == before  # closed
    (out / LOCK_NAME).unlink()  # what the message says to do
    with folder_lock(out):
        pass
    assert victim.read_text(encoding="utf-8") == PRECIOUS


def test_a_fifo_lock_file_is_refused_without_leaking_a_descriptor(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / LOCK_NAME)
    before = _open_fds()
    _refused(out, "is a FIFO")
    assert _open_fds() == before
    assert lock_holder(out) is None


def test_a_lock_whose_release_fails_is_still_unlocked_and_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emptying the holder record on release raises (EIO on a network share): the lock is
    still released and its descriptor closed, and the error is reported."""
    real = os.ftruncate
    state = {"releasing": False}

    def ftruncate(fd: int, length: int) -> None:
        if state["releasing"]:
            raise OSError(errno.EIO, "Input/output error")
        real(fd, length)

    before = _open_fds()
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(OSError, match="Input/output error"), folder_lock(tmp_path / "out"):
        state["releasing"] = True
    monkeypatch.undo()
    assert _open_fds() == before  # no descriptor leaked
    assert lock_holder(tmp_path / "out") is None  # nobody holds it


def test_windows_a_symlinked_lock_file_is_refused_not_followed(
        tmp_path: Path, victim: Path, windows: None) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    before = _open_fds()
    _refused(out, "is a symbolic link")
    assert victim.read_text(encoding="utf-8") == PRECIOUS
    assert _open_fds() == before
    assert lock_holder(out) is None  # nor read through the link


def test_windows_a_link_made_while_the_lock_is_opened_is_refused(
        tmp_path: Path, victim: Path, windows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name turns into a link between the first look and the open (which follows it
    without O_NOFOLLOW): the look after opening refuses it before anything is written."""
    out = tmp_path / "out"
    out.mkdir()
    real = os.open

    def open_after_swap(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == out / LOCK_NAME and not Path(path).is_symlink():
            Path(path).unlink(missing_ok=True)
            Path(path).symlink_to(victim)
        return real(path, flags, *args, **kwargs)

    before = _open_fds()
    monkeypatch.setattr(os, "open", open_after_swap)
    try:
        _refused(out, "is a symbolic link")
    finally:
        monkeypatch.setattr(os, "open", real)
    assert victim.read_text(encoding="utf-8") == PRECIOUS
    assert _open_fds() == before


def test_windows_a_plain_lock_still_works(tmp_path: Path, windows: None) -> None:
    """Control: the checks let gen_ad's own lock file through, new or left from a past run."""
    for _ in range(2):
        with folder_lock(tmp_path / "out") as d:
            info = lock_holder(d)
            assert info is not None and info["pid"] == os.getpid()
    assert (tmp_path / "out" / LOCK_NAME).is_file()
