"""A hub extractor's weights when the hub cannot be reached: one quick error, no retry noise.

``hf_hub_download`` retries a network failure or a 5xx answer five times with back-off; a
``gen-ad knn fit --extractor uni`` without network printed ten ``Retrying in 8s [Retry 4/5]``
lines over 33 s before gen_ad's own error. A local server (127.0.0.1, an ephemeral port) stands
in for the hub here: one that refuses connections, one that answers 503, and one that serves
the file (the online path must keep working).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.baselines.extractors import get_spec, resolve_weights
from gen_ad.cli import main
from gen_ad.errors import WeightsNotFoundError

BODY = b"not really UNI weights, only bytes to fetch"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _handler(status: int, seen: list[str]) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        def _head(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(status)
            if status == 200:
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"abc123"')
            self.send_header("Content-Length", str(len(BODY) if status == 200 else 0))
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._head()

        def do_GET(self) -> None:  # noqa: N802
            self._head()
            if status == 200:
                self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    return Hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., list[str]]]:
    """``hub(status)`` points huggingface_hub at a local server answering ``status`` (``None``:
    a port nobody listens on; ``0``: one that never answers) and returns the requests it saw;
    online mode, an empty cache, a 1 s ``HF_HUB_ETAG_TIMEOUT``."""
    import huggingface_hub.constants as c

    servers: list[ThreadingHTTPServer] = []
    sockets: list[socket.socket] = []

    def start(status: int | None) -> list[str]:
        seen: list[str] = []
        if status == 0:  # listens, never answers: the request times out
            silent = socket.socket()
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            sockets.append(silent)
            port = silent.getsockname()[1]
        elif status is None:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()  # connections to it are refused
        else:
            srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(status, seen))
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            servers.append(srv)
            port = srv.server_address[1]
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE",
                            url + "/{repo_id}/resolve/{revision}/{filename}")
        return seen

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("GEN_AD_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(c, "HF_HUB_ETAG_TIMEOUT", 1)
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    for sock in sockets:
        sock.close()


def _fails_fast(caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights(get_spec("uni"), None)
    took = time.monotonic() - t0
    noisy = [r.getMessage() for r in caplog.records
             if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]
    assert noisy == [] and took < 4.0, (took, noisy[:3])  # was 23 s of back-off, 10 lines
    msg = str(e.value)
    assert "\n" not in msg and "could not download weights for 'uni'" in msg
    assert "--weights" in msg and "MahmoodLab/UNI" in msg
    return msg


def test_a_refused_connection_fails_at_once_and_quietly(hub: Callable[..., list[str]],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    hub(None)
    assert "the hub is unreachable (offline) for MahmoodLab/UNI: ConnectError" in \
        _fails_fast(caplog)


def test_a_hub_answering_503_fails_at_once_and_quietly(hub: Callable[..., list[str]],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    seen = hub(503)
    assert "the hub answered HTTP 503" in _fails_fast(caplog)
    assert seen == ["HEAD /MahmoodLab/UNI/resolve/main/pytorch_model.bin"]  # asked once


def test_a_hub_that_never_answers_fails_after_the_etag_timeout(
        hub: Callable[..., list[str]], caplog: pytest.LogCaptureFixture) -> None:
    hub(0)
    msg = _fails_fast(caplog)
    assert "Timeout" in msg and "HF_HUB_ETAG_TIMEOUT = 1 s" in msg


def test_the_cli_prints_one_error_line(hub: Callable[..., list[str]], tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str],
                                       caplog: pytest.LogCaptureFixture) -> None:
    """(huggingface_hub's log handler writes to the stderr of when it was imported, which
    ``capfd`` may not see: its records are checked through ``caplog``.)"""
    hub(None)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(normal / f"{i}.png")
    t0 = time.monotonic()
    rc = main(["knn", "fit", "--extractor", "uni", "--k", "2", "--normal", str(normal),
               "--out", str(tmp_path / "bank"), "--workers", "0", "--device", "cpu"])
    took = time.monotonic() - t0
    err = capfd.readouterr().err.strip().splitlines()
    assert rc != 0 and took < 4.0 and len(err) == 1, (took, err[:4])
    assert err[0].startswith("gen-ad: error: could not download weights for 'uni'")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")
                and r.levelno >= logging.WARNING]
    assert not (tmp_path / "bank").exists()


def test_a_reachable_hub_still_downloads(hub: Callable[..., list[str]]) -> None:
    seen = hub(200)
    got = resolve_weights(get_spec("uni"), None)
    assert got.read_bytes() == BODY and got.name == "pytorch_model.bin"
    assert seen[0] == "HEAD /MahmoodLab/UNI/resolve/main/pytorch_model.bin"  # the probe
    assert any(s.startswith("GET ") for s in seen)
