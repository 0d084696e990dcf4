"""The writer lock off Linux: on Windows (no ``fcntl``) it imports and works through
``msvcrt.locking``, with the POSIX lock's semantics and messages.

Windows is simulated: ``sys.platform`` reads ``win32``, ``fcntl`` cannot be imported, and a fake
``msvcrt`` module (below) stands in. Its ``locking`` keeps the real one's contract: it locks
``nbytes`` at the file position, LK_NBLCK fails at once with ``OSError(EACCES)`` when another
handle holds the lock, and the OS drops the lock with the handle (emulated with ``flock``, which
is per open file too). Every call is recorded to check where the lock lies.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gen_ad.errors import FolderLockedError
from gen_ad.utils import lock

FAKE_MSVCRT = '''
"""A stand-in for Windows' msvcrt: locking() only (see test_lock_portable)."""
import errno
import fcntl as _fcntl
import os

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4
calls = []


def locking(fd, mode, nbytes):
    calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR), nbytes))
    if mode == LK_NBLCK:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None
    elif mode == LK_UNLCK:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    else:
        raise ValueError(f"mode {mode} is not used by gen_ad")
'''

# Imports the lock module as Windows would (no fcntl), then holds or takes the lock of argv[1].
WINDOWS_CHILD = '''
import functools, inspect, json, socket, sys, time, warnings
import gen_ad.utils.io  # what the lock imports, first, on the real platform
from gen_ad.errors import FolderLockedError
import fake_msvcrt as msvcrt  # from PYTHONPATH; as "msvcrt" it would fool subprocess too
sys.modules["fcntl"] = None  # as on Windows: import fcntl raises ImportError
sys.modules["msvcrt"] = msvcrt
real, sys.platform = sys.platform, "win32"
from gen_ad.utils import lock
sys.platform = real
del sys.modules["msvcrt"]
assert type(lock._LOCKER).__name__ == "MsvcrtLocker", lock._LOCKER
if sys.argv[2] == "hold":
    with lock.folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
else:
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with lock.folder_lock(sys.argv[1], "run folder"):
                print("took", lock.lock_holder(sys.argv[1])["pid"], *[str(w.message) for w in seen])
    except FolderLockedError as e:
        print("locked", e)
    print("calls", msvcrt.calls)
'''


@pytest.fixture
def fake_msvcrt() -> types.ModuleType:
    """The fake ``msvcrt`` as a module object (fresh call record)."""
    mod = types.ModuleType("msvcrt")
    exec(FAKE_MSVCRT, mod.__dict__)  # noqa: S102 - the test's own fake module source
    return mod


@pytest.fixture
def windows_lock(monkeypatch: pytest.MonkeyPatch,
                 fake_msvcrt: types.ModuleType) -> Iterator[types.ModuleType]:
    """The lock module using the Windows implementation, without ``os.pwrite`` (Windows has
    none); yields the fake ``msvcrt``."""
    monkeypatch.setattr(lock, "_LOCKER", lock.MsvcrtLocker(fake_msvcrt))
    monkeypatch.delattr(os, "pwrite", raising=False)
    yield fake_msvcrt


def _windows_child(tmp_path: Path, checkout_env: Callable[..., dict[str, str]], folder: Path,
                   action: str) -> subprocess.Popen[str]:
    (tmp_path / "fake").mkdir(exist_ok=True)
    (tmp_path / "fake" / "fake_msvcrt.py").write_text(FAKE_MSVCRT, encoding="utf-8")
    env = checkout_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env["PYTHONPATH"]])
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(WINDOWS_CHILD), str(folder),
                             action], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.slow  # three subprocesses importing gen_ad: ~25-55 s on 2 cores; the in-process
# tests below cover the same locker on a fake msvcrt
def test_windows_processes_lock_take_over_and_name_the_holder(
        tmp_path: Path, checkout_env: Callable[..., dict[str, str]]) -> None:
    """Without fcntl the module imports; a second Windows writer stops naming the first; once
    the first is killed its lock is taken over with the usual warning."""
    out = tmp_path / "run"
    holder = _windows_child(tmp_path, checkout_env, out, "hold")
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.strip() == "held", holder.stderr.read() if holder.stderr else line
        second = _windows_child(tmp_path, checkout_env, out, "take")
        got, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert (f"locked run folder {out} is being written by another gen-ad process "
                f"(pid {holder.pid} on {socket.gethostname()}") in got, got
        assert f"calls [(2, {lock.WINDOWS_LOCK_OFFSET}, 1)]" in got  # LK_NBLCK past the record
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    third = _windows_child(tmp_path, checkout_env, out, "take")
    got, err = third.communicate(timeout=60)
    assert third.returncode == 0, err
    assert f"took {third.pid} took over the lock of {out} left by pid {holder.pid}" in got, got


def test_windows_lock_nests_and_reports_its_holder(tmp_path: Path,
                                                   windows_lock: types.ModuleType) -> None:
    with lock.folder_lock(tmp_path / "out") as d:
        info = lock.lock_holder(d)
        assert info is not None and info["pid"] == os.getpid()
        with lock.folder_lock(d):  # nested in one process: allowed
            pass
        assert lock.lock_holder(d)["pid"] == os.getpid()  # still held by the outer block
    assert lock.lock_holder(tmp_path / "out") is None
    with lock.folder_lock(tmp_path / "out"):  # released: taken again without a warning
        pass
    modes = {m for m, _, _ in windows_lock.calls}
    assert modes == {windows_lock.LK_NBLCK, windows_lock.LK_UNLCK}
    assert {(at, n) for _, at, n in windows_lock.calls} == {(lock.WINDOWS_LOCK_OFFSET, 1)}


def test_windows_lock_keeps_the_record_readable(tmp_path: Path,
                                                windows_lock: types.ModuleType) -> None:
    """Windows locks are mandatory: the holder record must lie before the locked byte."""
    with lock.folder_lock(tmp_path / "out") as d:
        size = (d / lock.LOCK_NAME).stat().st_size
        assert 0 < size <= 4096 < lock.WINDOWS_LOCK_OFFSET
        assert (d / lock.LOCK_NAME).read_bytes().startswith(b'{"pid": ')  # binary, no \r\n


def test_windows_lock_failure_other_than_contention_is_raised(
        tmp_path: Path, fake_msvcrt: types.ModuleType) -> None:
    def broken(fd: int, mode: int, nbytes: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    fake_msvcrt.locking = broken
    locker = lock.MsvcrtLocker(fake_msvcrt)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            locker.try_lock(fd)
    finally:
        os.close(fd)


def test_platform_picks_the_implementation(monkeypatch: pytest.MonkeyPatch,
                                           fake_msvcrt: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "msvcrt", fake_msvcrt)
    assert isinstance(lock.platform_locker("win32"), lock.MsvcrtLocker)
    for name in ("linux", "darwin"):
        assert isinstance(lock.platform_locker(name), lock.FlockLocker)


def test_posix_second_open_in_one_process_conflicts_like_on_windows(tmp_path: Path) -> None:
    """flock, like Windows' locks, belongs to the open file: what nested use relies on."""
    locker = lock.platform_locker("linux")
    a = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    b = os.open(tmp_path / "f", os.O_RDWR)
    try:
        assert locker.try_lock(a) and not locker.try_lock(b)
        locker.unlock(a)
        assert locker.try_lock(b)
        locker.unlock(b)
    finally:
        os.close(a)
        os.close(b)


def test_a_lock_held_elsewhere_stops_a_writer(tmp_path: Path,
                                              windows_lock: types.ModuleType) -> None:
    """A lock held through another handle (another process, on Windows) stops a writer with
    the usual error, even before the holder has recorded itself."""
    (tmp_path / "out").mkdir()
    other = os.open(tmp_path / "out" / lock.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        assert lock.MsvcrtLocker(windows_lock).try_lock(other)
        with pytest.raises(FolderLockedError, match="it has not recorded itself yet"):
            with lock.folder_lock(tmp_path / "out"):
                pass
    finally:
        os.close(other)
