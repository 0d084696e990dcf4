"""A patch cache holds decoded pixels: one written by code that decoded differently (another
:data:`~gen_ad.data.folders.DECODER_VERSION` or cache :data:`~gen_ad.data.cache.VERSION`) is
rebuilt, never reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_ad.data.cache as cache_mod
import gen_ad.data.folders as folders
from gen_ad.data.cache import META, cached_folder
from gen_ad.data.folders import DECODER_VERSION, load_image


def _rotated_jpegs(root: Path, n: int = 3) -> Path:
    """``n`` distinct JPEG patches stored with EXIF orientation 6 (a quarter turn clockwise)."""
    (root / "normal").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(n):
        base = np.full((32, 32, 3), 10 * i, np.uint8)
        base[:8, :16] = 255  # a block top-left as stored, top-right as shown
        Image.fromarray(base).save(root / "normal" / f"p{i}.jpg", exif=exif, quality=100)
    return root


def test_the_decoder_version_is_recorded_and_in_the_key(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _rotated_jpegs(tmp_path / "data")
    cache = cached_folder(tmp_path / "cache", root=root, size=32)
    meta = json.loads((cache.folder / META).read_text(encoding="utf-8"))
    assert (meta["decoder"], meta["version"]) == (DECODER_VERSION, cache_mod.VERSION)
    monkeypatch.setattr(cache_mod, "DECODER_VERSION", DECODER_VERSION + 1)
    assert cached_folder(tmp_path / "cache", root=root, size=32).folder != cache.folder


def test_a_cache_older_code_built_is_rebuilt_not_reused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's case: a cache built by a decoder that did not turn by EXIF orientation,
    then the same folder opened by this decoder: the cached patches must be this decoder's."""
    root = _rotated_jpegs(tmp_path / "data")
    with monkeypatch.context() as m:  # the older code: no orientation, an older version
        m.setattr(folders, "apply_orientation", lambda arr, orientation: arr)
        m.setattr(cache_mod, "DECODER_VERSION", DECODER_VERSION - 1)
        old = cached_folder(tmp_path / "cache", root=root, size=32)
    fresh = load_image(root / "normal" / "p0.jpg", 32)
    assert not torch.allclose(old[0]["image"], fresh, atol=0.1)  # the old pixels: unturned
    new = cached_folder(tmp_path / "cache", root=root, size=32)
    assert new.folder != old.folder
    assert torch.equal(new[0]["image"], fresh)


@pytest.mark.parametrize("field,value", [("decoder", None), ("decoder", DECODER_VERSION - 1),
                                         ("version", None), ("version", 0)])
def test_a_cache_recording_another_version_under_this_key_is_rebuilt(
        tmp_path: Path, field: str, value: int | None) -> None:
    """Even where the key matches (a hand-copied folder, a key computed without the version),
    ``cache.json`` recording another version (or none: written before versions were recorded)
    means other pixels: the cache is rebuilt in place."""
    root = _rotated_jpegs(tmp_path / "data")
    first = cached_folder(tmp_path / "cache", root=root, size=32)
    meta_path = first.folder / META
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    images = first.folder / "images.u8"
    images.write_bytes(bytes(images.stat().st_size))  # the old decoder's (here: black) pixels
    os.utime(images, ns=(1, 1))
    with pytest.warns(UserWarning, match="incomplete or stale: rebuilding"):
        again = cached_folder(tmp_path / "cache", root=root, size=32)
    assert again.folder == first.folder
    assert os.stat(again.folder / "images.u8").st_mtime_ns != 1  # written anew
    assert json.loads(meta_path.read_text(encoding="utf-8"))[field] == \
        {"decoder": DECODER_VERSION, "version": cache_mod.VERSION}[field]
    assert torch.equal(again[0]["image"], load_image(root / "normal" / "p0.jpg", 32))
