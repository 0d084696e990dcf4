"""The patch cache off Linux: the liveness check of an abandoned build's process never
signals it on Windows (``os.kill`` terminates a Windows process whatever the signal), and a
cache another process installed first is found though Windows refuses the rename with "access
denied" rather than "directory not empty"."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gen_ad.data import cache
from gen_ad.data.folders import PatchFolder

STILL_ACTIVE, ACCESS_DENIED, INVALID_PARAMETER = 259, 5, 87


class FakeKernel32:
    """OpenProcess / GetExitCodeProcess / CloseHandle over a table ``pid -> exit code``
    (259: running); ``denied`` pids exist but belong to someone else."""

    def __init__(self, exit_codes: dict[int, int], denied: tuple[int, ...] = (),
                 query_fails: bool = False) -> None:
        self.exit_codes, self.denied, self.query_fails = exit_codes, denied, query_fails
        self.error = 0
        self.open: set[int] = set()
        self.closed: list[int] = []

    def last_error(self) -> int:
        return self.error

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:  # noqa: N802
        assert access == 0x1000 and not inherit  # PROCESS_QUERY_LIMITED_INFORMATION
        if pid in self.denied or pid not in self.exit_codes:
            self.error = ACCESS_DENIED if pid in self.denied else INVALID_PARAMETER
            return 0
        self.open.add(pid + 10_000)
        return pid + 10_000

    def GetExitCodeProcess(self, handle: int, code: Any) -> int:  # noqa: N802
        assert handle in self.open
        if self.query_fails:
            return 0
        code.contents.value = self.exit_codes[handle - 10_000]
        return 1

    def CloseHandle(self, handle: int) -> int:  # noqa: N802
        self.open.remove(handle)
        self.closed.append(handle)
        return 1


@pytest.fixture
def on_windows(monkeypatch: pytest.MonkeyPatch) -> FakeKernel32:
    """The cache module as on Windows, with a fake kernel32 (pid 111 running, 222 exited,
    333 another user's) and an ``os.kill`` that fails the test."""
    k32 = FakeKernel32({111: STILL_ACTIVE, 222: 0}, denied=(333,))
    monkeypatch.setattr(cache, "_WINDOWS", True)
    monkeypatch.setattr(cache, "_windows_kernel32", lambda: (k32, k32.last_error))

    def kill(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}) would terminate the process on Windows")

    monkeypatch.setattr(os, "kill", kill)
    return k32


def test_windows_liveness_asks_kernel32_and_never_signals(on_windows: FakeKernel32) -> None:
    assert cache._pid_alive(111) is True
    assert cache._pid_alive(222) is False  # exited, handle still around
    assert cache._pid_alive(333) is True  # exists, not ours to open
    assert cache._pid_alive(444) is False  # no such process
    assert on_windows.open == set() and on_windows.closed == [10_111, 10_222]


def test_windows_liveness_says_alive_when_unsure() -> None:
    k32 = FakeKernel32({111: 0}, query_fails=True)
    assert cache._windows_pid_alive(111, k32, k32.last_error) is True  # nothing gets deleted
    assert k32.open == set()


def test_windows_abandoned_build_of_a_dead_process_is_removed(
        tmp_path: Path, on_windows: FakeKernel32) -> None:
    final = tmp_path / "cache" / "0123abcd"
    dead = final.parent / f".{final.name}.tmp-222-0123abcd"
    alive = final.parent / f".{final.name}.tmp-111-4567abcd"
    for p in (dead, alive):
        p.mkdir(parents=True)
        (p / "images.u8").write_bytes(b"x")
        for q in (p / "images.u8", p):
            os.utime(q, (1_000_000, 1_000_000))
    with pytest.warns(UserWarning, match="removed 1 abandoned patch-cache build"):
        assert cache._drop_abandoned(final) == [dead]
    assert alive.exists()


def test_posix_liveness_is_unchanged() -> None:
    assert cache._WINDOWS is (os.name == "nt")
    assert cache._pid_alive(os.getpid()) is True


def test_windows_rename_onto_an_installed_cache_uses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows' rename onto an existing folder fails with EACCES (WinError 5), not ENOTEMPTY:
    the cache another process installed first is still found and used."""
    (tmp_path / "data" / "normal").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (10 * i, 20, 30)).save(tmp_path / "data" / "normal" / f"{i}.png")
    folder = PatchFolder(root=tmp_path / "data", size=16, classes=["normal"])
    where = tmp_path / "cache" / "k"
    cache.build_cache(folder, where, "key")  # the other process's, in place
    real = os.replace

    def windows_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).is_dir():
            raise PermissionError(errno.EACCES, "Access is denied", str(src))
        real(src, dst)

    monkeypatch.setattr(cache, "_WINDOWS", True)
    monkeypatch.setattr(os, "replace", windows_replace)
    got = cache.build_cache(folder, where, "key")
    assert got.folder == where and len(got) == 3
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k"]  # its temporary dropped


def test_posix_access_denied_is_not_taken_for_an_occupied_folder(tmp_path: Path) -> None:
    e = PermissionError(errno.EACCES, "Permission denied")
    assert not cache._occupied(e, tmp_path)
    assert cache._occupied(OSError(errno.ENOTEMPTY, "Directory not empty"), tmp_path)

