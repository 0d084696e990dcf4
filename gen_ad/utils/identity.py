"""What a finished output depends on, as plain JSON data: an input file's identity, the code's,
and a digest of the whole (commands that reuse finished slides compare it: ``gen-ad slide``,
``gen-ad tile``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    """gen_ad's version and source commit (``None`` for an installed wheel)."""
    from gen_ad._version import __version__
    from gen_ad.utils.provenance import source_commit

    return {"gen_ad": __version__, "source": source_commit()}


def settings_digest(found: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``found`` as it reads back from a JSON file (tuples become lists, other objects strings)
    and the sha256 of its canonical JSON text."""
    plain = json.loads(json.dumps(dict(found), default=str))
    text = json.dumps(plain, sort_keys=True)
    return plain, hashlib.sha256(text.encode("utf-8")).hexdigest()
