"""Hostile or broken files handed to gen_ad: refused with a clear error, never followed, never
expanded, never executed (the security review for hospital deployments)."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gen_ad.utils.io as gio
from gen_ad.data.annotations import read_asap_xml, read_geojson
from gen_ad.errors import CheckpointError, DataError
from gen_ad.utils.lock import LOCK_NAME, folder_lock
from gen_ad.weights.safe_pickle import load_array_file

# ----------------------------------------------------------------------------- pickles


def _pickle_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "w.ckpt"
    path.write_bytes(data)
    return path


def test_a_dict_containing_itself_is_refused(tmp_path: Path) -> None:
    d: dict[str, Any] = {"w": np.zeros(2, np.float32)}
    d["again"] = d
    with pytest.raises(CheckpointError, match="reached twice"):
        load_array_file(_pickle_file(tmp_path, pickle.dumps(d, protocol=3)))


def test_shared_dicts_do_not_expand_exponentially(tmp_path: Path) -> None:
    """18 levels of one dict referenced twice: 2**18 leaves from a pickle of a few hundred bytes
    (at 40 levels the flattening would never end)."""
    tree: dict[str, Any] = {"w": np.zeros(1, np.float32)}
    for _ in range(18):
        tree = {"a": tree, "b": tree}
    with pytest.raises(CheckpointError, match="reached twice"):
        load_array_file(_pickle_file(tmp_path, pickle.dumps(tree, protocol=3)))


def _reduce_ndarray(n: int) -> bytes:
    """``{"w": numpy.ndarray((n,), "f8")}``: uninitialised memory of any size, by REDUCE."""
    return (b"\x80\x02}X\x01\x00\x00\x00wcnumpy\nndarray\n" + pickle.dumps((n,), 2)[2:-1]
            + pickle.dumps("f8", 3)[2:-1] + b"\x86Rs.")


def _reconstruct(n: int) -> bytes:
    """``{"w": _reconstruct(ndarray, (n,), b"b")}``: NumPy's own constructor, asked for n bytes."""
    return (b"\x80\x03}X\x01\x00\x00\x00wcnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            + pickle.dumps((n,), 3)[2:-1] + b"C\x01b\x87Rs.")


@pytest.mark.parametrize("data", [_reduce_ndarray(10**6), _reduce_ndarray(10**13),
                                  _reconstruct(10**13)], ids=["ndarray", "ndarray-huge",
                                                              "reconstruct-huge"])
def test_arrays_larger_than_the_pickle_are_never_allocated(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(CheckpointError, match="not a pickle of NumPy arrays only"):
        load_array_file(_pickle_file(tmp_path, data))


def test_real_array_pickles_still_load(tmp_path: Path) -> None:
    tree = {"a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.ones(3)}
    out = load_array_file(_pickle_file(tmp_path, pickle.dumps(tree, protocol=4)))
    np.testing.assert_array_equal(out["a/k"], tree["a"]["k"])


def test_torch_files_warn_on_a_torch_with_an_exploitable_weights_only_loader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch.torch_version import TorchVersion

    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.warns(RuntimeWarning, match="CVE-2025-32434"):
        assert torch.equal(gio.torch_load(path)["w"], torch.zeros(2))


# ----------------------------------------------------------------------------- files and links


def test_a_linked_lock_file_is_not_followed_nor_truncated(tmp_path: Path) -> None:
    """A run folder from a colleague holding ``.gen-ad.lock -> ~/notes.txt``: taking the lock
    used to truncate the target and write the holder record into it."""
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n", encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(DataError, match="cannot write in"), folder_lock(run):
        pass
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_atomic_writes_never_change_the_process_umask(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to 0 to read it gave files other threads created meanwhile (the
    TensorBoard writer, loader threads) mode 0666."""
    old = os.umask(0o027)
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
    try:
        gio.write_text(tmp_path / "a.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert calls == []
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _manifest_folder(tmp_path: Path, rel: str, size: int) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path / "model"
    folder.mkdir()
    return folder, {"files": {rel: {"size": size, "sha256": "0" * 64}}}


def _finishes(fn: Any, seconds: float = 10.0) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised, or fail if it is still blocked."""
    box: list[BaseException | None] = [None]

    def go() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box[0] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked reading a FIFO"
    return box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_a_downloaded_folder_is_refused_not_read(tmp_path: Path) -> None:
    folder, manifest = _manifest_folder(tmp_path, "G.safetensors", 10)
    os.mkfifo(folder / "G.safetensors")
    os.mkfifo(folder / gio.MANIFEST)
    try:
        err = _finishes(lambda: gio.checked_bytes(folder, manifest, "G.safetensors"))
        assert isinstance(err, CheckpointError) and "not a regular file" in str(err)
        err = _finishes(lambda: gio.read_manifest_file(folder))
        assert isinstance(err, CheckpointError) and "not a regular file" in str(err)
    finally:  # release a reader the old code left blocked
        for name in ("G.safetensors", gio.MANIFEST):
            fd = os.open(folder / name, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)


def test_a_file_larger_than_its_manifest_entry_is_refused_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, manifest = _manifest_folder(tmp_path, "G.safetensors", 10)
    (folder / "G.safetensors").write_bytes(b"\0" * 4096)
    reads: list[int] = []
    real_open = open

    class Tracked:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Tracked:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def fileno(self) -> int:
            return self.f.fileno()

        def read(self, *a: Any) -> bytes:
            data = self.f.read(*a)
            reads.append(len(data))
            return data

    monkeypatch.setattr(gio, "open", lambda *a, **k: Tracked(real_open(*a, **k)),
                        raising=False)
    with pytest.raises(CheckpointError, match="has 4096 bytes, the manifest recorded 10"):
        gio.checked_bytes(folder, manifest, "G.safetensors")
    assert reads == []


def test_deeply_nested_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not valid JSON"):
        gio.json_object(b"[" * 200_000, tmp_path / "model.json")


# ----------------------------------------------------------------------------- annotations


_ASAP = ("<ASAP_Annotations><Annotations><Annotation Name='t' Type='Polygon' "
         "PartOfGroup='Tumor'><Coordinates><Coordinate Order='0' X='{x}' Y='0'/>"
         "<Coordinate Order='1' X='10' Y='0'/><Coordinate Order='2' X='10' Y='10'/>"
         "</Coordinates></Annotation></Annotations></ASAP_Annotations>")


def test_asap_xml_with_entities_is_refused_whatever_the_expat_version(tmp_path: Path) -> None:
    """Entity expansion is refused by the file's form, not by expat's amplification limit (a
    Python linked to a system expat older than 2.4 has none)."""
    small = tmp_path / "small.xml"
    small.write_text("<?xml version='1.0'?><!DOCTYPE a [<!ENTITY zero '0'>]>"
                     + _ASAP.format(x="&zero;"), encoding="utf-8")
    with pytest.raises(DataError, match="document type declaration"):
        read_asap_xml(small)
    lols = "".join(f"<!ENTITY l{i} '{f'&l{i - 1};' * 10 if i else 'lol'}'>" for i in range(10))
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(f"<?xml version='1.0'?><!DOCTYPE a [{lols}]>" + _ASAP.format(x="&l9;"),
                    encoding="utf-8")
    with pytest.raises(DataError, match="document type declaration"):
        read_asap_xml(bomb)
    plain = tmp_path / "plain.xml"
    plain.write_text("<?xml version='1.0'?>" + _ASAP.format(x="0"), encoding="utf-8")
    assert len(read_asap_xml(plain).polygons) == 1


@pytest.mark.parametrize("data", [b"\xff\xfe{", b"[" * 200_000], ids=["not-utf8", "deep"])
def test_unreadable_geojson_is_a_data_error(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "s.geojson"
    p.write_bytes(data)
    with pytest.raises(DataError, match="not readable GeoJSON"):
        read_geojson(p)


# ----------------------------------------------------------------------------- images


def test_a_tiff_over_the_pixel_limit_is_refused_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float RGB TIFFs (which Pillow cannot identify) go to tifffile, which has no
    decompression-bomb limit: a header claiming 50k x 50k allocated 30 GB."""
    import tifffile
    from PIL import Image

    from gen_ad.data.folders import read_rgb

    p = tmp_path / "big.tif"
    tifffile.imwrite(p, np.zeros((40, 40, 3), np.float32), photometric="rgb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 pixels > 2 x 500

    def no_decode(*a: Any, **k: Any) -> Any:
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", no_decode)
    with pytest.raises(DataError, match="decompression-bomb limit"):
        read_rgb(p)


# ----------------------------------------------------------------------------- report


def test_report_escapes_every_value_from_the_inputs(tmp_path: Path) -> None:
    from gen_ad.report.html import render_report

    evil = "<img src=x onerror=alert(1)>"
    method = {"name": evil, "kind": evil, "description": evil, "notes": [evil],
              "has_maps": False, "ms_per_patch": 1.0, "size": evil, "generator": None,
              "threshold": {"method": "iqr", "value": 1.0, "n": evil, "params": {}},
              "metrics": {"auroc": None, "aupr": None, "per_class": {evil: {"n": evil}},
                          "at_threshold": {"sensitivity": evil, "specificity": evil}}}
    results = {"title": evil, "created": evil, "environment": {"device": evil, "cpu": evil},
               "figures": {}, "methods": [method],
               "test": {"root": evil, "n": evil, "n_normal": evil, "n_anomalous": evil,
                        "val": evil, "masks": evil}}
    text = render_report(json.loads(json.dumps(results)), tmp_path)
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
