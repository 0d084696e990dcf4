"""What every ``bench/*.py`` JSON line says about the machine and the checkout, and the timing
rule the side-by-side benches share (interleaved rounds, best round each).

The benches import it as ``_common`` (``python bench/x.py`` puts ``bench/`` first on the path;
each bench also appends it, for a bench loaded by file path). Run on its own it prints the
machine as one JSON line (``make bench`` and ``scripts/gpu_check.py`` run every ``bench/*.py``;
this one takes a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gen_ad.utils.hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CPUINFO_KEYS = {"vendor_id": "vendor", "cpu family": "family", "model": "model",
                "stepping": "stepping", "microcode": "microcode"}


def _git(path: Path, *args: str) -> str | None:
    """The output of ``git -C path ARGS`` (stripped), None when git fails or is missing."""
    try:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                              encoding="utf-8", errors="replace", timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(path: Path = ROOT, *, own_checkout: bool = False) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``path``, else None (no git, no ``.git``:
    a copy shipped to a GPU box names its commit in ``GPU_CHECK_COMMIT`` when ``path`` is this
    checkout). ``own_checkout``: only when ``path`` is the top of its own checkout (a folder
    copied inside another repository, e.g. a reference under ``.ref/``, has no commit of its
    own: None)."""
    path = Path(path).resolve()
    if own_checkout:
        top = _git(path, "rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != path:
            return None
    commit = _git(path, "rev-parse", "HEAD") or None
    if commit is None and path == ROOT:
        return os.environ.get("GPU_CHECK_COMMIT")
    return commit


def tree_digest(path: Path, pattern: str = "**/*.py") -> str | None:
    """sha256 over the relative paths and contents of the files under ``path`` matching
    ``pattern`` (sorted): names a checkout that has no commit of its own (a copy without
    ``.git``); None when nothing matches."""
    root = Path(path)
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def git_dirty(path: Path = ROOT) -> bool | None:
    """Whether tracked files of the checkout differ from its commit (None without git)."""
    out = _git(path, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def cpu_ids(cpuinfo: str | None = None) -> dict[str, str]:
    """Vendor, family, model, stepping and microcode of the first CPU in ``/proc/cpuinfo``
    (``{}`` where the file or the fields do not exist: other systems, most ARM kernels)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return {}
    out: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() in CPUINFO_KEYS:
            out[CPUINFO_KEYS[key.strip()]] = value.strip()
    return out


def load_avg() -> list[float] | None:
    """1, 5 and 15-minute load averages now (None where the system has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The hardware and software a figure was measured on, and the checkout's commit.

    ``load_avg`` is read when this is called (call it when the bench ends, so the line says how
    busy the machine was while it ran); ``threads`` is torch's intra-op thread count."""
    dev = torch.device(device) if device is not None else None
    gpu = (torch.cuda.get_device_name(dev) if dev is not None and dev.type == "cuda"
           else None)
    return {"cpu": cpu_name(), "cpu_ids": cpu_ids(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform(),
            "commit": git_commit(), "commit_dirty": git_dirty(), "load_avg": load_avg()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` (device work included) and what it returned."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def interleaved_rounds(fns: Mapping[str, Callable[[], Any]], rounds: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds of every round of each method, timed in turn (a, b, a, b, ...): a machine that
    slows down for a while slows every method alike. Warm-ups are the caller's (untimed here).
    A method's figure is its best round (:func:`best`)."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device)[0])
    return seconds


def best(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    """Each method's best (shortest) round."""
    return {name: min(s) for name, s in seconds.items()}


if __name__ == "__main__":
    print(json.dumps({"bench": "machine", "hardware": machine()}))
