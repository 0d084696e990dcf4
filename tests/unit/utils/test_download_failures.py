"""A download that goes wrong on the wire is an ``OSError`` and leaves nothing behind.

A local server (127.0.0.1, an ephemeral port, one thread per answer) stands in for the network
and sends canned bytes: a body shorter than its Content-Length (``HTTPResponse.read(n)`` then
returns ``b""`` instead of raising, and the torn file used to be published and cached for good
when its name carries no hash), a chunked body cut mid-chunk or between chunks, and a status line
that is not HTTP (``http.client`` raises ``IncompleteRead`` / ``BadStatusLine`` there, which are
not ``OSError``: they escaped the callers' ``except OSError`` and their install hints).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gen_ad.errors import WeightsNotFoundError
from gen_ad.utils.download import download_file

Serve = Callable[[bytes], str]

HEAD_OK = b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
ANSWERS = {
    # 5000 of 100000 announced bytes, then the connection closes
    "short_body": HEAD_OK + b"Content-Length: 100000\r\n\r\n" + b"x" * 5000,
    # a 4096-byte chunk announced, 100 bytes sent
    "chunk_cut_inside": HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + b"y" * 100,
    # a whole chunk, then the connection closes before the next size line / last chunk
    "chunks_cut_between": HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"z" * 16
    + b"\r\n",
    "garbage_status_line": b"garbage\r\n\r\n",
}


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """``serve(raw)``: the URL of a one-shot local server that reads the request, sends
    ``raw`` and closes the connection. Proxies are bypassed (the server is local)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def answer(listener: socket.socket, raw: bytes) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # closed at teardown without a request
            return
        with conn:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                part = conn.recv(65536)
                if not part:
                    return
                request += part
            conn.sendall(raw)
            conn.shutdown(socket.SHUT_WR)

    def start(raw: bytes) -> str:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners.append(listener)
        t = threading.Thread(target=answer, args=(listener, raw), daemon=True)
        t.start()
        threads.append(t)
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()
    for t in threads:
        t.join(timeout=10)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode for the weights lookups (the test-wide default is offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("GEN_AD_OFFLINE", raising=False)


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("kind", list(ANSWERS))
def test_a_failed_transfer_is_an_oserror_and_publishes_nothing(tmp_path: Path, serve: Serve,
                                                               kind: str) -> None:
    """No hash in the name (dino_resnet50_pretrain.pth): only the length check stops a torn
    file; every failure is an OSError naming the URL; no file and no temporary remain."""
    url = f"{serve(ANSWERS[kind])}/dino_resnet50_pretrain.pth"
    dest = tmp_path / "hub" / "checkpoints" / "dino_resnet50_pretrain.pth"
    with pytest.raises(OSError, match="nothing was saved") as info:
        download_file(url, dest, None, timeout=10)
    assert url in str(info.value) and "\n" not in str(info.value)  # one line for the CLI
    assert not dest.exists()
    assert _left_in(dest.parent) == []  # no temporary either


def test_a_whole_answer_is_saved(tmp_path: Path, serve: Serve) -> None:
    """Control: the same server sending every announced byte (Content-Length, or chunked to
    the last chunk) gives the file."""
    body = bytes(range(256)) * 40
    chunked = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n"
                       for c in (body[:4000], body[4000:])) + b"0\r\n\r\n"
    for i, raw in enumerate([HEAD_OK + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
                             HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunked]):
        dest = tmp_path / f"w{i}.pth"
        assert download_file(f"{serve(raw)}/w.pth", dest, None, timeout=10) == dest
        assert dest.read_bytes() == body
    assert _left_in(tmp_path) == ["w0.pth", "w1.pth"]


@pytest.mark.parametrize("kind", ["short_body", "chunk_cut_inside", "garbage_status_line"])
def test_extractor_download_failure_names_where_to_put_the_file(
        serve: Serve, online: None, kind: str) -> None:
    """A URL-only extractor (dino-resnet50): a failed download is the usual
    WeightsNotFoundError, and the next lookup finds no damaged file in the cache."""
    from gen_ad.baselines import extractors

    spec = dataclasses.replace(extractors.get_spec("dino-resnet50"),
                               url=f"{serve(ANSWERS[kind])}/dino_resnet50_pretrain.pth")
    with pytest.raises(WeightsNotFoundError, match="could not download weights for "
                                                   "'dino-resnet50'"):
        extractors.resolve_weights(spec, None)
    assert extractors._from_caches(spec) is None  # nothing cached to be trusted next time


@pytest.mark.parametrize("kind", ["chunk_cut_inside", "garbage_status_line"])
def test_lpips_keeps_its_install_hint_when_the_download_breaks(
        monkeypatch: pytest.MonkeyPatch, serve: Serve, online: None, kind: str) -> None:
    import gen_ad.inversion.lpips_net as lp

    name = lp._TRUNKS["alex"][0]
    monkeypatch.setattr(lp, "_TRUNKS", {**lp._TRUNKS,
                                        "alex": (name, f"{serve(ANSWERS[kind])}/{name}")})
    with pytest.raises(WeightsNotFoundError, match=r"download failed .*gen-ad weights install"):
        lp.build_lpips("alex")
    assert _left_in(lp.trunk_file("alex").parent) == []


@pytest.mark.parametrize("kind", ["chunk_cut_inside", "garbage_status_line"])
def test_fid_inception_download_failure_is_weights_not_found(
        monkeypatch: pytest.MonkeyPatch, serve: Serve, online: None, kind: str) -> None:
    """What the benchmark's FID step catches (WeightsNotFoundError) to go on without FID."""
    import gen_ad.metrics.inception as inc

    monkeypatch.setattr(inc, "INCEPTION_URL", f"{serve(ANSWERS[kind])}/{inc.INCEPTION_FILE}")
    with pytest.raises(WeightsNotFoundError, match="download failed"):
        inc.resolve_inception_weights()
    assert _left_in(inc.inception_cache_path().parent) == []
