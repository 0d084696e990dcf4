"""The writer lock: a second writer stops at once naming the holder; a dead holder's lock is
taken over; nested use in one process; an existing file is no folder."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from gen_ad.cli import main
from gen_ad.errors import DataError, FolderLockedError
from gen_ad.utils.lock import LOCK_NAME, folder_lock, lock_holder, writes_folder


def _hold_in_child(folder: Path, die: bool = False) -> int:
    """Fork a child that takes the lock; it waits (or SIGKILLs itself) once it holds it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            with folder_lock(folder):
                os.write(w, b"1")
                if die:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def test_second_writer_stops_naming_the_holder(tmp_path: Path) -> None:
    pid = _hold_in_child(tmp_path / "out")
    try:
        holder = lock_holder(tmp_path / "out")
        assert holder is not None and holder["pid"] == pid
        assert holder["host"] == socket.gethostname()
        with pytest.raises(FolderLockedError, match=rf"pid {pid} on {socket.gethostname()}"):
            with folder_lock(tmp_path / "out", "run folder"):
                pass
    finally:
        _reap(pid)
    assert lock_holder(tmp_path / "out") is None  # released when its process died
    with pytest.warns(UserWarning, match=rf"took over the lock .* left by pid {pid}"), \
            folder_lock(tmp_path / "out"):
        pass


def test_cli_second_writer_exits_2_with_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pid = _hold_in_child(tmp_path / "syn")
    try:
        rc = main(["synth", "--out", str(tmp_path / "syn"), "--n", "2", "--size", "16"])
    finally:
        _reap(pid)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pid {pid}" in err[0], err
    assert not (tmp_path / "syn" / "normal").exists()  # nothing written


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    pid = _hold_in_child(tmp_path / "out", die=True)
    os.waitpid(pid, 0)
    with pytest.warns(UserWarning, match=rf"took over the lock .* pid {pid}"):
        with folder_lock(tmp_path / "out"):
            assert lock_holder(tmp_path / "out")["pid"] == os.getpid()


def test_nested_use_in_one_process_and_decorator(tmp_path: Path) -> None:
    calls = []

    @writes_folder("out", "test folder")
    def command(x: int, out: Path) -> int:
        calls.append(lock_holder(out)["pid"])
        with folder_lock(out):  # the same process may lock it again
            return x

    with folder_lock(tmp_path / "o"):
        assert command(3, out=tmp_path / "o") == 3
    assert calls == [os.getpid()] and (tmp_path / "o" / LOCK_NAME).is_file()


def test_existing_file_is_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(DataError, match=rf"run folder {f} is an existing file"):
        with folder_lock(f, "run folder"):
            pass
    assert f.read_text() == "x"


@pytest.mark.parametrize("command", ["groups", "cells"])
def test_groups_and_cells_outputs_are_locked(tmp_path: Path, command: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scores.csv").write_text("path,score,slide\na.png,1.0,s1\n")
    (tmp_path / "groups.csv").write_text("slide,group\ns1,control\n")
    argv = {"groups": ["groups", "--scores", str(tmp_path / "scores.csv"), "--groups",
                       str(tmp_path / "groups.csv"), "--threshold", "0.5"],
            "cells": ["cells", str(tmp_path / "scores.csv")]}[command]
    pid = _hold_in_child(tmp_path / "out")
    try:
        rc = main([*argv, "--out", str(tmp_path / "out")])
    finally:
        _reap(pid)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pid {pid}" in err[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]  # nothing written
