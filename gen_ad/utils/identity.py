"""What a finished output depends on, as plain JSON data: an input file's identity, the code's,
and a digest of the whole (commands that reuse finished work compare it: ``gen-ad slide``,
``gen-ad tile``, ``gen-ad benchmark``).

The code identity (:func:`code_identity`) is gen_ad's version and a sha256 of its Python sources,
not the git commit: a README edit or a commit that changes no code must not invalidate hours of
results, while edited, uncommitted code must."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The gen_ad package, whose ``*.py`` sources :func:`code_identity` hashes.
PACKAGE = Path(__file__).resolve().parents[1]


def file_identity(path: str | os.PathLike[str], sample: int = 0) -> dict[str, Any]:
    """Resolved path, size and modification time of a file (a slide is too large to hash per
    run); with ``sample > 0`` also the sha256 of its first and last ``sample`` bytes (cheap, and
    catches a file replaced by another of the same size and time). A missing file is
    ``{"path": ..., "missing": True}``: reading it will say what is wrong."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    found: dict[str, Any] = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if sample > 0:
        digest = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                digest.update(f.read(sample))
                if st.st_size > sample:
                    f.seek(max(sample, st.st_size - sample))
                    digest.update(f.read(sample))
        except OSError:
            return {**found, "unreadable": True}
        found["sha256_head_tail"] = digest.hexdigest()
    return found


def code_identity() -> dict[str, Any]:
    """gen_ad's version and the sha256 of its Python sources (:func:`sources_sha256` of
    :data:`PACKAGE`), read once per process (the code a process runs is the code it imported).
    The commit is not part of it: records note it beside (:func:`code_record`)."""
    from gen_ad._version import __version__

    return {"gen_ad": __version__, "sources_sha256": _package_sha256(PACKAGE)}


def code_record() -> dict[str, Any]:
    """:func:`code_identity` with the git source commit (``None`` for an installed wheel): what
    a record notes beside its settings, never compared."""
    from gen_ad.utils.provenance import source_commit

    return {**code_identity(), "source": source_commit()}


@functools.lru_cache(maxsize=4)
def _package_sha256(pkg: Path) -> str:
    return sources_sha256(pkg)


def sources_sha256(pkg: Path) -> str:
    """sha256 of the names and bytes of the ``*.py`` files under ``pkg``, skipping hidden names
    (an editor's dangling ``.#x.py`` lock link) and files that cannot be read."""
    sha = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        sha.update(rel.as_posix().encode("utf-8") + b"\0" + data + b"\0")
    return sha.hexdigest()


def settings_changed(record: Mapping[str, Any], settings: Mapping[str, Any],
                     verb: str) -> str | None:
    """``None`` when ``record`` (a finished output's record) holds the digest of ``settings``
    (``{"settings": ..., "settings_sha256": ...}``); else why it is redone: ``it was <verb> with
    other settings (<the keys that differ>)``."""
    if record.get("settings_sha256") == settings["settings_sha256"]:
        return None
    old, now = record.get("settings"), settings["settings"]
    diff = [k for k in now if not isinstance(old, dict) or old.get(k) != now[k]]
    return f"it was {verb} with other settings ({', '.join(diff) or 'unrecorded'})"


def settings_digest(found: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``found`` as it reads back from a JSON file (tuples become lists, other objects strings)
    and the sha256 of its canonical JSON text."""
    plain = json.loads(json.dumps(dict(found), default=str))
    text = json.dumps(plain, sort_keys=True)
    return plain, hashlib.sha256(text.encode("utf-8")).hexdigest()
