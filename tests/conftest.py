"""Test-wide settings: offline hub, temporary caches, real-data and GPU markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH: a subprocess imports
    this gen_ad whether or not it is installed (a GPU box running a shipped copy)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def checkout_env() -> Callable[..., dict[str, str]]:
    """``checkout_env(**extra)``: the environment for a subprocess that must import this
    checkout's gen_ad (see :func:`_checkout_env`)."""
    return _checkout_env


@pytest.fixture
def run_bench(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run ``bench/<name>`` (default ``--smoke``) in a subprocess from this checkout and return
    its JSON line; exit 0 is asserted with the bench's stderr as the message, and with
    ``one_line`` its stdout must be that one line."""

    def run(name: str, *args: str, one_line: bool = True, timeout: int = 600,
            cwd: Path | None = None) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *(args or ("--smoke",))],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or tmp_path, env=_checkout_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        if one_line:
            assert len(lines) == 1, proc.stdout[-2000:]
        return json.loads(lines[-1])

    return run


def pytest_configure(config: pytest.Config) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test gets empty TORCH_HOME / HF / gen_ad caches: nothing is read from the network."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("GEN_AD_CACHE", str(root / "gen_ad"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GEN_AD_WEIGHTS", raising=False)  # installed weights: $TORCH_HOME only
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """After each test, drop accelerate's process-wide state: a test that built a CUDA (or bf16)
    Accelerator would otherwise make a later test's plain ``Accelerator(cpu=True)`` in the same
    xdist worker raise 'AcceleratorState has already been initialized' (on a GPU machine)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the tests/gpu/ folder name
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (``$GEN_AD_DATA`` or ``../shared/data``); skips when absent."""
    from gen_ad.utils.paths import shared_data_dir

    d = shared_data_dir()
    if not (d / "pcam").is_dir():
        pytest.skip(f"real data not found at {d} (set GEN_AD_DATA to the shared data folder)")
    return d
