"""pyproject.toml lists every package the wheel must hold: each gen_ad subpackage, and the
built-in configs (the repository's configs/ folder, shipped as gen_ad/configs/)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

import gen_ad

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_subpackage_and_config_folder_is_listed() -> None:
    listed = set(_setuptools()["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gen_ad").rglob(
        "__init__.py")}
    configs = {f"gen_ad.configs.{p.name}" for p in (ROOT / "configs").iterdir()
               if any(p.glob("*.yaml"))}
    assert code | configs | {"gen_ad.configs"} == listed


def test_configs_folder_is_the_configs_package() -> None:
    st = _setuptools()
    assert st["package-dir"] == {"gen_ad.configs": "configs"}
    assert st["package-data"]["gen_ad.configs"] == ["*/*.yaml"]
    assert not (ROOT / "gen_ad" / "configs").exists()  # one copy: configs/ at the root


def test_version_has_one_source() -> None:
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    module, _, name = data["tool"]["setuptools"]["dynamic"]["version"]["attr"].rpartition(".")
    assert getattr(importlib.import_module(module), name) == gen_ad.__version__
