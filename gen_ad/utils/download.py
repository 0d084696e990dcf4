"""Offline mode and the one way gen_ad downloads a weights file.

Hospital networks often reach a package registry and nothing else; a download there may fail at
once or hang until a proxy gives up. Every weights lookup (LPIPS trunks, FID Inception, KNN
extractors) asks :func:`offline` before touching the network and downloads with
:func:`download_file`: a bounded timeout, a temporary file renamed into place only when whole
(and hash-checked when the file name carries a SHA-256 prefix), and one line on stderr saying
what is fetched from where.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from pathlib import Path

from gen_ad.utils.io import atomic_path

OFFLINE_ENV = ("GEN_AD_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a stalled connection fails, a slow one goes on
_CHUNK = 1 << 20


def offline() -> bool:
    """True when ``GEN_AD_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (``1``,
    ``true``, ``yes``, ``on``; any case): no weights lookup touches the network then."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in OFFLINE_ENV)


def download_file(url: str, dest: str | os.PathLike[str], sha256_prefix: str | None = None,
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically (``dest`` appears only when complete).

    Args:
        url: the file's address.
        dest: where it goes (parent folders are made).
        sha256_prefix: the leading hex digits its SHA-256 must start with (torchvision and
            torch-fidelity name their files ``<name>-<prefix>.pth``), or ``None``.
        timeout: seconds any one socket operation may wait.
    Returns:
        ``dest`` as a Path.
    Raises:
        OSError: every failure: the network failed or timed out, the server's answer was
            garbled or ended before the announced length, or the file has the wrong hash
            (nothing is left at ``dest`` then, and no temporary).
    """
    dst = Path(dest)
    print(f"gen-ad: downloading {url} -> {dst}", file=sys.stderr)
    try:
        _fetch(url, dst, sha256_prefix, timeout)
    except http.client.HTTPException as e:  # a cut chunked body, a garbled status line, ...
        raise OSError(f"{url}: the download failed ({_http_failure(e)}); nothing was saved at "
                      f"{dst}, try again") from e
    return dst


def _http_failure(e: http.client.HTTPException) -> str:
    """One line saying what went wrong in an HTTP exchange (no tracebacks, no raw newlines)."""
    if isinstance(e, http.client.IncompleteRead):
        return "the connection ended in the middle of the file"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    detail = " ".join(str(e).split())[:120]
    if isinstance(e, http.client.BadStatusLine):
        return f"the server's answer is not HTTP: {detail!r}"
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _fetch(url: str, dst: Path, sha256_prefix: str | None, timeout: float) -> None:
    """:func:`download_file`'s transfer: ``dst`` is published only when every announced byte
    arrived (and the hash matches); raises ``OSError`` or ``http.client.HTTPException``."""
    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dst) as tmp, \
            open(tmp, "wb") as f:
        # http.client's length (Content-Length; None when chunked or unannounced): read(n)
        # returns b"" when the connection ends early instead of raising, so it is counted here
        expected = getattr(resp, "length", None)
        got = 0
        while chunk := resp.read(_CHUNK):
            sha.update(chunk)
            f.write(chunk)
            got += len(chunk)
        if isinstance(expected, int) and got != expected:
            raise OSError(f"{url}: the connection ended after {got} of the {expected} bytes "
                          f"announced; nothing was saved at {dst}, try again")
        if sha256_prefix and not sha.hexdigest().startswith(sha256_prefix.lower()):
            raise OSError(f"{url}: the downloaded file has the wrong SHA-256 "
                          f"({sha.hexdigest()[:12]}..., expected {sha256_prefix}...)")


def hash_prefix_of(file_name: str) -> str | None:
    """The SHA-256 prefix a ``<name>-<hex>.<ext>`` file name carries (torch hub's convention),
    else ``None``."""
    stem = file_name.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail.lower() if len(tail) >= 8 and all(c in "0123456789abcdefABCDEF" for c in tail) \
        else None
