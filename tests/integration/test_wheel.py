"""The wheel a user installs (``pip install gen_ad``, no source checkout) holds the built-in
configs, and gen_ad run from it finds them from any folder: ``--config`` names, ``gen-ad
configs``, and the configs ``gen-ad demo`` trains with.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation
--no-index``: no network, nothing written into the checkout), unpacked, and imported from a
folder outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gen_ad

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gen_ad wheel, built from a copy of pyproject.toml, README.md, gen_ad/ and configs/."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("gen_ad", "configs"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--no-index", "-q", str(src), "-w", str(dist)],
                         capture_output=True, text=True, encoding="utf-8", timeout=600)
    if res.returncode != 0 and "No module named pip" in res.stderr:
        pytest.skip("pip is not installed in this environment")
    assert res.returncode == 0, res.stderr
    (whl,) = dist.glob("gen_ad-*.whl")
    return whl


def test_wheel_holds_every_config_inside_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*/*.yaml"))
    assert configs and {f"gen_ad/{c}" for c in configs} <= names
    assert not any(n.startswith("configs/") for n in names)  # nothing outside gen_ad/
    assert {"gen_ad/__main__.py", "gen_ad/app/configs.py"} <= names
    assert wheel.name.startswith(f"gen_ad-{gen_ad.__version__}-")


def test_installed_wheel_finds_its_configs_from_any_folder(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"  # the user's own folder: no configs/ in it
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    probe = ("import gen_ad, gen_ad.config as c, gen_ad.app.demo as d\n"
             "print(gen_ad.__file__)\n"
             "print(c.resolve_config_file('configs/ddpm/demo.yaml'))\n"
             "print(c.builtin_config('benchmark/demo'))\n"
             "print(d._config('wgan', 'demo_encoder'))\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True,
                         text=True, encoding="utf-8", timeout=300)
    assert res.returncode == 0, res.stderr
    pkg = (site / "gen_ad").resolve()
    found = [Path(line) for line in res.stdout.splitlines()]
    assert found == [pkg / "__init__.py", pkg / "configs" / "ddpm" / "demo.yaml",
                     pkg / "configs" / "benchmark" / "demo.yaml",
                     pkg / "configs" / "wgan" / "demo_encoder.yaml"]
    shown = subprocess.run([sys.executable, "-m", "gen_ad", "configs", "show", "ddpm/demo"],
                           cwd=work, env=env, capture_output=True, text=True, encoding="utf-8",
                           timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (ROOT / "configs" / "ddpm" / "demo.yaml").read_text(encoding="utf-8")
