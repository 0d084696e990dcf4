"""``gen-ad configs``: list, show and copy the built-in configs.

The repository's ``configs/`` folder ships inside the package, so an installed gen_ad (a wheel,
no source checkout) has every config the README names. ``--config`` falls back to them by
itself (:func:`gen_ad.config.resolve_config_file`); ``copy`` writes editable copies, by default
into ``./configs/<folder>/<name>.yaml``, where the README's ``--config configs/...`` paths then
find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gen_ad.config import builtin_config, builtin_config_dir, builtin_configs
from gen_ad.errors import ConfigError
from gen_ad.utils.io import write_bytes


def _summary(path: Path, width: int) -> str:
    """The first comment line of a config file (its description), at most ``width`` chars."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            return text if len(text) <= width else text[:width - 3] + "..."
        if line.strip():
            break
    return ""


def list_lines() -> list[str]:
    """One line per built-in config (``name  description``), then where they live."""
    found = builtin_configs()
    pad = max((len(n) for n in found), default=0)
    lines = [f"{name:<{pad}}  {_summary(path, 98 - pad)}".rstrip()
             for name, path in found.items()]
    return [*lines, f"({len(found)} built-in configs in {builtin_config_dir()}; use one with "
                    "--config NAME, or edit a copy: gen-ad configs copy NAME)"]


def show(name: str) -> str:
    """The text of the built-in config ``name`` (``ddpm/demo``)."""
    return builtin_config(name).read_text(encoding="utf-8")


def select(names: Sequence[str]) -> dict[str, Path]:
    """The built-in configs ``names`` mean: a config (``ddpm/demo``), a folder (``ddpm``: all
    of it) or ``all``."""
    known = builtin_configs()
    chosen: dict[str, Path] = {}
    for name in names:
        folder = name.strip("/")
        if folder == "all":
            chosen.update(known)
        elif "/" not in folder and any(k.startswith(f"{folder}/") for k in known):
            chosen.update({k: p for k, p in known.items() if k.startswith(f"{folder}/")})
        else:
            path = builtin_config(name)
            chosen[path.relative_to(builtin_config_dir()).with_suffix("").as_posix()] = path
    return chosen


def copy_configs(names: Sequence[str], dest: str | Path = "configs",
                 force: bool = False) -> list[Path]:
    """Copy the built-in configs ``names`` (see :func:`select`) to ``dest/<folder>/<name>.yaml``.

    Nothing is written when a target exists and ``force`` is not set (an error names them), so
    edited copies are never overwritten by accident. Returns the written files.
    """
    chosen = select(names)
    targets = {Path(dest) / f"{name}.yaml": src for name, src in chosen.items()}
    present = [str(t) for t in targets if t.exists()]
    if present and not force:
        verb = "exists" if len(present) == 1 else "exist"
        raise ConfigError(f"{', '.join(present)} already {verb} (nothing was copied); pass "
                          "--force to overwrite")
    for target, src in targets.items():
        write_bytes(target, src.read_bytes())
    return list(targets)
