"""One writer per output folder: an exclusive lock every writing command holds.

:func:`folder_lock` takes an exclusive lock on ``<folder>/.gen-ad.lock`` (``flock`` on POSIX,
``msvcrt.locking`` of one byte on Windows) and records the holder (pid, host, command, start time)
in it. A second writer stops at once with a
:class:`~gen_ad.errors.FolderLockedError` naming the holder. The kernel releases the lock when
its process dies, however it dies (SIGKILL included), so a lock left by a dead process is simply
taken over (with a warning naming it). Nested use in one process (a command calling another on
the same folder) is allowed. Both locks belong to the open file (the handle), so a second open in
the same process conflicts as a second process would.

A command that fails (an exception, Ctrl-C) in a folder the lock created, having written nothing
there, leaves no folder: the lock file is removed while still held (POSIX; on Windows an open
file cannot be deleted and the folder stays), then the folders it created, where empty. A writer
that took the lock of a file removed that way notices (the name no longer leads to its file)
and opens the lock again.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import socket
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gen_ad.errors import DataError, FolderLockedError

LOCK_NAME = ".gen-ad.lock"
WINDOWS_LOCK_OFFSET = 1 << 20  # the byte Windows locks: far past the holder record (<= 4 KiB)
F = TypeVar("F", bound=Callable[..., Any])


class _Locker(Protocol):
    def try_lock(self, fd: int) -> bool:
        """Take the exclusive lock of ``fd`` without waiting; ``False`` when another holds it."""
        ...

    def unlock(self, fd: int) -> None:
        """Release the lock ``fd`` holds."""
        ...


@dataclass(frozen=True)
class FlockLocker:
    """POSIX: ``flock`` of the whole file (``fcntl`` is the module, injectable for tests)."""

    fcntl: Any

    def try_lock(self, fd: int) -> bool:
        try:
            self.fcntl.flock(fd, self.fcntl.LOCK_EX | self.fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self, fd: int) -> None:
        self.fcntl.flock(fd, self.fcntl.LOCK_UN)


@dataclass(frozen=True)
class MsvcrtLocker:
    """Windows: ``msvcrt.locking`` of the byte at :data:`WINDOWS_LOCK_OFFSET` (``msvcrt`` is the
    module, injectable for tests). Windows byte-range locks are mandatory, so the locked byte
    lies past the holder record, which a second writer must still read."""

    msvcrt: Any

    def _locking(self, fd: int, mode: int) -> None:
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        self.msvcrt.locking(fd, mode, 1)

    def try_lock(self, fd: int) -> bool:
        try:
            self._locking(fd, self.msvcrt.LK_NBLCK)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EDEADLOCK):  # another handle holds it
                return False
            raise
        return True

    def unlock(self, fd: int) -> None:
        self._locking(fd, self.msvcrt.LK_UNLCK)


def platform_locker(platform: str = sys.platform) -> _Locker:
    """The lock implementation for ``platform`` (a ``sys.platform`` value)."""
    if platform == "win32":
        import msvcrt

        return MsvcrtLocker(msvcrt)
    import fcntl

    return FlockLocker(fcntl)


_LOCKER = platform_locker()
# O_BINARY: Windows opens in text mode otherwise; O_NOFOLLOW: a lock file that is a link (in a
# copied or downloaded folder) is refused, never followed and truncated. Windows has no
# O_NOFOLLOW: there _open_lock_file's lstat checks refuse the link (and hard links everywhere)
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(os.path.basename(a) if i == 0 else a
                                for i, a in enumerate(sys.argv[:6])),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int, tries: int = 20) -> dict[str, Any]:
    """The holder recorded in the lock file (retrying briefly while the holder writes it)."""
    for _ in range(tries):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            info = json.loads(raw.decode("utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    return {}


def _prepare_folder(folder: Path, what: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{what} {folder} is an existing file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {what} {folder}: {e.strerror or e}") from e


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not recorded itself yet)"
    cmd = f", '{info['command']}'" if info.get("command") else ""
    return (f"pid {info.get('pid')} on {info.get('host', '?')}{cmd}, since "
            f"{info.get('since', '?')}")


@contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "output folder") -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (created if needed) for the block.

    Args:
        folder: the folder a command writes (run folder, bank, tile/score/benchmark output).
        what: how messages name the folder (e.g. ``"run folder"``).
    Yields:
        The folder path.
    Raises:
        DataError: ``folder`` is an existing file, or cannot be created, or its lock file is
            no plain file of its own (a link, hard link, FIFO, ...: the message says what to do).
        FolderLockedError: another live process holds the lock (the message names it).
    """
    d = Path(folder).expanduser()
    made = _first_missing(d)  # the outermost folder this call creates (None: d exists)
    _prepare_folder(d, what)
    fd = _acquire(d, what)
    if isinstance(fd, dict):  # another handle holds it: its holder's record
        holder = fd
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            yield d  # nested: this process already holds it
            return
        raise FolderLockedError(
            f"{what} {d} is being written by another gen-ad process ({_describe(holder)}); "
            "wait for it to finish or choose another folder") from None
    done, removed = False, False
    try:
        previous = _read_holder(fd, tries=1)
        if previous:
            warnings.warn(f"took over the lock of {d} left by {_describe(previous)}, which is "
                          "no longer running", stacklevel=3)
        os.ftruncate(fd, 0)
        _write_holder(fd, _holder_info())
        _sweep(d)
        yield d
        done = True
    finally:
        try:
            if not done and made is not None:  # failed: drop a folder it made and left empty
                removed = _remove_lone_lock(d)
            os.ftruncate(fd, 0)  # released cleanly: nothing to take over
        finally:  # released and closed even when emptying the record fails
            try:
                _LOCKER.unlock(fd)
            finally:
                os.close(fd)
        if removed and made is not None:
            _remove_empty_folders(d, made)


def _acquire(d: Path, what: str, tries: int = 3) -> int | dict[str, Any]:
    """Open ``d``'s lock file and take its lock: the descriptor, or the holder's record
    (``{}`` when unreadable) when another handle holds it. A lock taken on a file that the
    previous holder removed meanwhile (:func:`_remove_lone_lock`) is dropped and taken again."""
    for _ in range(tries):
        fd = _open_lock_file(d, what)
        if not _LOCKER.try_lock(fd):
            try:
                return _read_holder(fd)
            finally:
                os.close(fd)
        if _names_it(d / LOCK_NAME, fd):
            return fd
        try:
            _LOCKER.unlock(fd)
        finally:
            os.close(fd)
        _prepare_folder(d, what)  # its folder may be gone with it
    raise FolderLockedError(f"{what} {d}: its lock file keeps being removed by another process "
                            "while this one takes it; run again")


def _names_it(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    st, now = os.fstat(fd), _lstat(path)
    return now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _first_missing(d: Path) -> Path | None:
    """The outermost folder of ``d``'s path that does not exist yet (``None``: ``d`` exists)."""
    if d.exists() or d.is_symlink():
        return None
    top = d
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _remove_lone_lock(d: Path) -> bool:
    """Delete ``d``'s lock file (still held) when it is all ``d`` holds; whether it was."""
    try:
        if [p.name for p in d.iterdir()] != [LOCK_NAME]:
            return False
        (d / LOCK_NAME).unlink()
    except OSError:  # Windows: an open file cannot be deleted; the folder stays
        return False
    return True


def _remove_empty_folders(d: Path, top: Path) -> None:
    """Remove ``d`` and its parents up to ``top`` (the folders a lock created), while empty."""
    for p in [d, *d.parents]:
        try:
            p.rmdir()
        except OSError:  # not empty (another writer is there), or gone
            return
        if p == top:
            return


def _open_lock_file(folder: Path, what: str) -> int:
    """Open (creating it) ``folder``'s lock file, which must be a plain file of its own: never
    a link (symbolic or hard: taking the lock empties the file), FIFO, device or folder.

    A symbolic link is refused three ways: ``os.lstat`` before opening (nothing odd is even
    opened), ``O_NOFOLLOW`` where the platform has it, and ``os.lstat`` again once open, which
    on Windows (no ``O_NOFOLLOW``) catches a link made in between. ``os.fstat`` of the open file
    catches what the name led to: not a regular file, or more than one name (a hard link).

    Raises:
        DataError: the lock file cannot be opened, or is no plain file of its own (the message
            names it and says what to do).
    """
    path = folder / LOCK_NAME
    try:
        _refuse_odd_lock(path, _lstat(path), folder, what)
        fd = os.open(path, _OPEN_FLAGS | os.O_CREAT, 0o644)
        try:
            _refuse_odd_lock(path, os.fstat(fd), folder, what)
            _refuse_odd_lock(path, _lstat(path), folder, what)
        except BaseException:
            os.close(fd)
            raise
    except OSError as e:
        raise DataError(f"cannot write in {what} {folder}: {e.strerror or e}") from e
    return fd


def _lstat(path: Path) -> os.stat_result | None:
    """``os.lstat(path)`` (the name itself, never what it links to), ``None`` when absent."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _refuse_odd_lock(path: Path, st: os.stat_result | None, folder: Path, what: str) -> None:
    """Raise DataError unless ``st`` (of the lock file ``path``; ``None``: absent) is a plain
    file with one name."""
    if st is None:
        return
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        problem = "is a symbolic link"
    elif not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "not a regular file")
        problem = f"is {kind}"
    elif st.st_nlink > 1:
        problem = (f"is a hard link (the same file has {st.st_nlink} names, so emptying it "
                   "would empty the others)")
    else:
        return
    raise DataError(
        f"cannot write in {what} {folder}: its lock file {path} {problem}, and gen_ad only uses "
        f"a plain file of its own there; delete {path} (only that name: whatever it points to "
        "or shares contents with is left as it is) and run again")


def _write_holder(fd: int, info: dict[str, Any]) -> None:
    """Write the holder record at the start of the (truncated) lock file (no ``os.pwrite`` on
    Windows)."""
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode("utf-8"))


def _sweep(folder: Path) -> None:
    """Remove the temporaries interrupted writers left in ``folder`` (its lock is held)."""
    from gen_ad.utils.io import sweep_temporaries

    removed = sweep_temporaries(folder)
    if removed:
        shown = ", ".join(str(p.relative_to(folder)) for p in removed[:3])
        warnings.warn(f"removed {len(removed)} temporary file(s) an interrupted gen-ad command "
                      f"left in {folder} ({shown}{', ...' if len(removed) > 3 else ''})",
                      stacklevel=4)


def writes_folder(param: str, what: str = "output folder") -> Callable[[F], F]:
    """Decorate a command so it holds :func:`folder_lock` on its argument ``param`` (a folder
    path) for the whole call."""
    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with folder_lock(bound.arguments[param], what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def lock_holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of ``folder`` now (``None`` when nobody does)."""
    p = Path(folder).expanduser() / LOCK_NAME
    try:
        st = _lstat(p)
    except OSError:
        return None
    if st is None or not stat.S_ISREG(st.st_mode):  # absent, or no lock file (a link, a FIFO)
        return None
    fd = os.open(p, _OPEN_FLAGS)
    try:
        if not _LOCKER.try_lock(fd):
            return _read_holder(fd)
        _LOCKER.unlock(fd)
        return None
    finally:
        os.close(fd)
