"""Test-wide settings: offline hub, temporary caches, real-data and GPU markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


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
