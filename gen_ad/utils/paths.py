"""Where shared data and caches live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The real-data folder: ``$GEN_AD_DATA`` or ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("GEN_AD_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def names_a_folder(name: str) -> bool:
    """Whether ``name`` (a file stem, a method name) can name an output folder inside another:
    not empty, not ``.`` or ``..``, no path separator."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def cache_dir() -> Path:
    """gen_ad's cache (FID reference statistics, ...): ``$GEN_AD_CACHE`` or ``~/.cache/gen_ad``."""
    env = os.environ.get("GEN_AD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gen_ad"
