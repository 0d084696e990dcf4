"""SIGTERM (a scheduler's ``scancel``, ``kill``, a container stop) on commands other than training:
the command stops as on Ctrl-C (cleanup runs, nothing half-written stays), prints one line and
exits 143; the handler is the process's own (restored after, never run by a forked child)."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gen_ad.cli import Terminated, _guarded, main, sigterm_as_exception

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _slide(path: Path, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((210, 120, 175), 12, (side, side, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb")


def test_sigterm_during_tile_stops_cleanly_with_143(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _slide(tmp_path / "a.tif", 256, 0)
    _slide(tmp_path / "b.tif", 2560, 1)  # ~25,000 tiles of 16 px: tens of seconds
    out = tmp_path / "tiles"
    sent: list[float] = []

    def kill_when_b_starts() -> None:  # the real signal, to this process, mid-slide
        t0 = time.monotonic()
        while not (out / "b_x32_y0.png").is_file() and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        sent.append(time.monotonic())
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # never kill pytest itself
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=kill_when_b_starts, daemon=True)
    watcher.start()
    rc = main(["tile", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(out),
               "--size", "16", "--level", "0", "--min-tissue", "0.5", "--workers", "1"])
    watcher.join()
    err = capsys.readouterr().err
    assert rc == 143, err  # without the handler the process (here: pytest) would be gone
    assert "gen-ad: terminated (SIGTERM)" in err and "Traceback" not in err
    assert time.monotonic() - sent[0] < 10, "tiling went on after the signal"
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))  # slide a, finished before the signal, is listed
    assert {r["slide"] for r in rows} == {"a"}
    assert not [q.name for q in out.rglob("*.tmp")], "a temporary was left behind"


def test_guarded_turns_sigterm_into_143_after_cleanup(capsys: pytest.CaptureFixture[str]) -> None:
    cleaned: list[bool] = []

    def run() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, in the main thread
            return 0
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    assert _guarded(run, debug=False) == 143
    assert cleaned == [True]
    assert "gen-ad: terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_forked_child_dies_of_sigterm_as_without_the_handler() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    with sigterm_as_exception():
        pid = os.fork()
        if pid == 0:  # child: the inherited handler must not raise Terminated into its code
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except BaseException:  # noqa: BLE001 - any exception here is the bug
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_terminated_is_an_interrupt() -> None:
    assert issubclass(Terminated, KeyboardInterrupt)  # every Ctrl-C cleanup path runs for it


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:  # a thread may end between the listing and the read
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_the_process_group_with_data_workers_prints_one_line(tmp_path: Path) -> None:
    """A scheduler signals the whole process group: the data workers ignore it and the main
    process stops them, so no "DataLoader worker ... killed by signal" traceback follows the
    command's one line (workers that died of the signal made PyTorch raise in its clean-up)."""
    import subprocess

    from PIL import Image

    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(normal / f"{i}.png")
    cmd = [sys.executable, "-m", "gen_ad", "knn", "fit", "--extractor", "colour-stats",
           "--normal", str(normal), "--out", str(tmp_path / "bank"), "--workers", "2",
           "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, text=True)
    t0 = time.monotonic()
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are loading batches
    assert proc.poll() is None, "finished before the signal: make the folder larger"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "gen-ad: terminated (SIGTERM)", err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert not [p.name for p in (tmp_path / "bank").glob("*") if p.name != ".gen-ad.lock"]
