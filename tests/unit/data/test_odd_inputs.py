"""Messy real-world patch folders: every reader decodes an image the same way (EXIF orientation
included), links are followed once, junk is skipped, bad files and copies are named."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from gen_ad.config import DataConfig
from gen_ad.data import build_dataset
from gen_ad.data.cache import cached_folder, content_key
from gen_ad.data.folders import PatchFolder, load_image, read_mask, read_rgb
from gen_ad.errors import DataError

_ORIENTATION = 0x0112


def _rgb(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normal(root: Path, n: int = 3) -> Path:
    (root / "normal").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_rgb(i)).save(root / "normal" / f"p{i}.png")
    return root / "normal"


def _exif_jpeg(path: Path, arr: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=100, subsampling=0)


def _quiet(**kw: object) -> PatchFolder:
    """A PatchFolder that must build without any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return PatchFolder(**kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / f"o{orientation}.JPG"
    _exif_jpeg(path, _rgb(1, 6, 10), orientation)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(read_rgb(path), want)


def test_orientation_of_deep_tiffs_and_masks(tmp_path: Path) -> None:
    rgb16 = _rgb(2, 6, 10).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "deep.tif", rgb16, photometric="rgb",
                     extratags=[(274, "H", 1, 6, True)])  # rotate 90 degrees clockwise
    np.testing.assert_array_equal(read_rgb(tmp_path / "deep.tif"),
                                  np.rot90((rgb16 // 257).astype(np.uint8), -1))
    mask = np.zeros((6, 10), np.uint8)
    mask[0, :] = 255
    exif = Image.Exif()
    exif[_ORIENTATION] = 8  # rotate 90 degrees counter-clockwise: the top row becomes the left
    Image.fromarray(mask).save(tmp_path / "m.png", exif=exif)
    got = read_mask(tmp_path / "m.png")
    assert got.shape == (10, 6) and got[:, 0].all() and not got[:, 1:].any()


def test_a_rotated_jpeg_reads_alike_in_every_reader(tmp_path: Path) -> None:
    from gen_ad.metrics.fid import _folder_batches

    src = _normal(tmp_path / "d", 2)
    arr = _rgb(3, 16, 8)  # tall as stored, wide as shown
    _exif_jpeg(src / "rot.jpg", arr, 6)
    folder = _quiet(root=tmp_path / "d", size=8, resize="center_crop")
    cache = cached_folder(tmp_path / "cache", root=tmp_path / "d", size=8, resize="center_crop")
    i = folder.paths.index(str(src / "rot.jpg"))
    assert read_rgb(src / "rot.jpg").shape == (8, 16, 3)
    np.testing.assert_array_equal(cache.rgb8(i), folder.rgb8(i))
    assert (load_image(src / "rot.jpg", 8, "center_crop") == folder[i]["image"]).all()
    fid_batch = next(_folder_batches([src / "rot.jpg"], 1, size=8, resize="center_crop"))
    np.testing.assert_array_equal(fid_batch[0].permute(1, 2, 0).numpy(), folder.rgb8(i))


# ----------------------------------------------------------------------------- listing


def test_junk_hidden_files_and_checkpoint_copies_are_skipped(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "README.txt"):
        (src / name).write_bytes(b"junk")
    (src / "._p0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (src / ".ipynb_checkpoints").mkdir()
    shutil.copy(src / "p0.png", src / ".ipynb_checkpoints" / "p0-checkpoint.png")
    ds = _quiet(root=tmp_path / "d", size=8)
    assert sorted(Path(p).name for p in ds.paths) == ["p0.png", "p1.png", "p2.png"]


def test_linked_folders_are_read_once_and_loops_end(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d", 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(_rgb(9)).save(elsewhere / "far.png")
    os.symlink(elsewhere, src / "linked")
    os.symlink(tmp_path / "d", src / "loop")  # points back up: must not recurse forever
    ds = _quiet(root=tmp_path / "d", size=8)
    assert sorted(Path(p).relative_to(src).as_posix() for p in ds.paths) == \
        ["linked/far.png", "p0.png", "p1.png"]
    key = content_key(tmp_path / "d", {})
    Image.fromarray(_rgb(10, 14, 14)).save(elsewhere / "far.png")
    assert content_key(tmp_path / "d", {}) != key  # the cache follows the linked files


def test_broken_link_is_named_and_skipped_by_the_cache_too(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d", 30)
    os.symlink(tmp_path / "gone.png", src / "gone.png")
    cfg = DataConfig(train=str(tmp_path / "d"), size=8, cache=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=r"gone\.png \(broken symbolic link .*gone\.png does "):
        ds = build_dataset(cfg)
    assert len(ds) == 30  # type: ignore[arg-type]


def test_unreadable_files_say_why(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d", 1)
    (src / "zero.png").write_bytes(b"")
    (src / "junk.PNG").write_bytes(b"not an image at all")
    data = (src / "p0.png").read_bytes()
    (src / "cut.png").write_bytes(data[: len(data) // 2])
    why = {"zero.png": "empty file (0 bytes)", "junk.PNG": "not an image file",
           "cut.png": "truncated file"}
    for name, reason in why.items():
        with pytest.raises(DataError, match=rf"cannot read image .*{name}: {re.escape(reason)}"):
            read_rgb(src / name)
    with pytest.raises(DataError, match=r"3 of 4 images .* unreadable .*replace or remove them"):
        PatchFolder(root=tmp_path / "d", size=8)


def test_pixel_identical_copies_are_named(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d")
    shutil.copy(src / "p1.png", src / "p1 (1).png")
    Image.fromarray(_rgb(2)).save(src / "p2.tif")  # the same pixels in another format
    with pytest.warns(UserWarning, match="2 images are pixel-identical copies") as rec:
        ds = PatchFolder(root=tmp_path / "d", size=8)
    msg = str(rec[0].message)
    assert f"{src / 'p1.png'} = {src / 'p1 (1).png'}" in msg
    assert f"{src / 'p2.tif'} = {src / 'p2.png'}" in msg
    assert len(ds) == 5  # still used: the warning informs, it does not drop


@pytest.mark.skipif(os.name == "nt", reason="Windows file names are always Unicode")
def test_names_that_are_not_utf8_are_refused_before_the_cache(tmp_path: Path) -> None:
    src = _normal(tmp_path / "d", 2)
    latin1 = os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.png")  # a Latin-1 name from a zip
    shutil.copy(src / "p0.png", latin1)
    for build in (lambda: PatchFolder(root=tmp_path / "d", size=8),
                  lambda: cached_folder(tmp_path / "cache", root=tmp_path / "d", size=8)):
        with pytest.raises(DataError, match=r"1 file name is not valid UTF-8 .*caf\\xe9\.png; "
                                            "rename"):
            build()
