"""A TIFF read with ``tifffile`` is refused from its header when its decoded pixels would be too
large: a few kilobytes of file can declare gigabytes, and ``asarray`` would allocate them all."""

from __future__ import annotations

import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gen_ad.data.folders import read_mask, read_rgb
from gen_ad.errors import DataError


def _declaring(path: Path, stored: np.ndarray, width: int, height: int, **kw: object) -> Path:
    """A small (zlib, one strip) TIFF of ``stored`` whose header then claims ``width x
    height`` pixels: what a damaged or hostile file looks like."""
    tifffile.imwrite(path, stored, compression="zlib", rowsperstrip=1 << 16,
                     **kw)  # type: ignore[arg-type]
    with tifffile.TiffFile(path) as tif:
        tags = {t.code: t for t in tif.pages[0].tags.values()}  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    for code, value in ((256, width), (257, height)):
        fmt = "<H" if tags[code].dtype == 3 else "<I"  # SHORT or LONG
        struct.pack_into(fmt, data, tags[code].valueoffset, value)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_asarray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if any pixel data is decoded (the refusal must come before)."""
    calls: list[str] = []

    def refuse(self: tifffile.TiffFile, *args: object, **kw: object) -> np.ndarray:
        calls.append(str(self.filehandle.path))
        raise AssertionError("tifffile.TiffFile.asarray was called")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", refuse)
    return calls


def test_a_tiny_file_declaring_gigabytes_is_refused_before_decoding(
        tmp_path: Path, no_asarray: list[str]) -> None:
    """9000 x 9000 float64 RGB: 81 M pixels (under Pillow's 179 M pixel limit), but 1.9 GB of
    decoded samples, over the byte bound (MAX_IMAGE_PIXELS x 2 pixels x 4 samples x 2 bytes)."""
    path = _declaring(tmp_path / "big.tif", np.zeros((16, 16, 3), np.float64), 9000, 9000,
                      photometric="rgb")
    assert path.stat().st_size < 10_000
    max_pixels = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
    limit, decoded = max_pixels * 4 * 2, 9000 * 9000 * 3 * 8
    assert 9000 * 9000 <= max_pixels and decoded > limit  # only the byte bound catches it
    tracemalloc.start()
    try:
        for reader, what in ((read_rgb, "image"), (read_mask, "mask")):
            with pytest.raises(DataError, match=(
                    rf"cannot read {what} .*big\.tif: 9000x9000x3 samples of 8 byte\(s\) would "
                    rf"decode to {decoded} bytes, over the limit of {limit} ")):
                reader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20  # nothing near the declared size was allocated
    assert no_asarray == []


def test_more_than_four_samples_per_pixel_is_refused(tmp_path: Path,
                                                     no_asarray: list[str]) -> None:
    """The reviewer's file: 4.5 KB declaring 9000 x 9000 x 1000 uint8 (75 GiB)."""
    path = _declaring(tmp_path / "wide.tif", np.zeros((16, 16, 1000), np.uint8), 9000, 9000,
                      photometric="minisblack", planarconfig="contig")
    with pytest.raises(DataError, match=re.escape(
            "wide.tif: 1000 samples per pixel (at most 4 are supported")):
        read_rgb(path)
    assert no_asarray == []


def test_the_bounds_follow_pillows_limit(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_IMAGE_PIXELS = 1000: at most 2000 pixels and 2000 x 4 x 2 = 16000 bytes."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rgb16 = np.full((30, 30, 3), 257 * 7, np.uint16)  # 900 pixels, 5400 bytes: read
    tifffile.imwrite(tmp_path / "ok.tif", rgb16, photometric="rgb")
    assert (read_rgb(tmp_path / "ok.tif") == 7).all()
    rgba = np.ones((30, 30, 4), np.float64)  # 900 pixels but 28800 bytes: refused
    tifffile.imwrite(tmp_path / "deep.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.raises(DataError, match=r"deep\.tif: 30x30x4 samples of 8 byte\(s\) would "
                                        r"decode to 28800 bytes, over the limit of 16000 "):
        read_rgb(tmp_path / "deep.tif")
    tifffile.imwrite(tmp_path / "wide.tif", np.ones((50, 50, 3), np.float32),
                     photometric="rgb")  # 2500 pixels: over the pixel limit
    with pytest.raises(DataError, match=r"wide\.tif: 50x50 pixels, over Pillow's "
                                        r"decompression-bomb limit of 2000"):
        read_rgb(tmp_path / "wide.tif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user lifted the limit
    assert read_rgb(tmp_path / "deep.tif").shape == (30, 30, 3)
