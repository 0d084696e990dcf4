"""Every format turns the way image viewers show it, images and masks alike, exactly once.

Pillow's TIFF loader turns the pixels itself while loading (and drops the orientation tag),
PNG/JPEG/WebP leave the turn to the reader, and ``tifffile`` never turns: whatever the path,
:func:`read_rgb` and :func:`read_mask` must equal ``ImageOps.exif_transpose`` of the file, and an
image and its mask stored with the same orientation must stay aligned.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from gen_ad.data.folders import read_mask, read_rgb

_ORIENTATION = 0x0112
_H, _W = 12, 20  # not square: a quarter turn changes the shape
_BLOCK = (slice(0, 5), slice(0, 8))  # the anomalous region, top-left as stored

Writer = Callable[[Path, np.ndarray, int], None]


def _stored_rgb() -> np.ndarray:
    """``[H,W,3]`` uint8, asymmetric in every direction: red 255 inside the block (40 outside),
    green rising along columns, blue along rows."""
    rows, cols = np.mgrid[0:_H, 0:_W]
    rgb = np.stack([np.full((_H, _W), 40), cols * 12, rows * 20], axis=-1).astype(np.uint8)
    rgb[_BLOCK + (0,)] = 255
    return rgb


def _stored_mask() -> np.ndarray:
    """``[H,W]`` bool: the block."""
    mask = np.zeros((_H, _W), bool)
    mask[_BLOCK] = True
    return mask


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif


def _pillow(fmt: str, **kw: object) -> Writer:
    """Save the array with Pillow (EXIF block, or the TIFF tag for TIFFs)."""
    def write(path: Path, arr: np.ndarray, orientation: int) -> None:
        tag: dict[str, object] = ({"tiffinfo": {274: orientation}} if fmt == "TIFF"
                                  else {"exif": _exif(orientation)})
        Image.fromarray(arr).save(path, format=fmt, **tag, **kw)  # type: ignore[arg-type]
    return write


def _tifffile(path: Path, arr: np.ndarray, orientation: int) -> None:
    """Write the array with ``tifffile`` (RGB or grey) and an orientation tag (274, SHORT)."""
    tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 else "minisblack",
                     extratags=[(274, "H", 1, orientation, True)])


def _gray(arr: np.ndarray) -> np.ndarray:
    return arr[..., 0] if arr.ndim == 3 else arr


def _gray16(arr: np.ndarray) -> np.ndarray:
    return _gray(arr).astype(np.uint16) * 257


def _rgb16(arr: np.ndarray) -> np.ndarray:
    rgb = np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr
    return rgb.astype(np.uint16) * 257


def _float(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) / 255.0


def _rgba(arr: np.ndarray) -> np.ndarray:
    rgb = np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr
    return np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], axis=-1)  # opaque


# (suffix, writer, stored pixels from the uint8 picture [H,W,3] or mask [H,W] 0/255, lossy)
_FORMATS: dict[str, tuple[str, Writer, Callable[[np.ndarray], np.ndarray], bool]] = {
    "png": (".png", _pillow("PNG"), lambda a: a, False),
    "jpg": (".jpg", _pillow("JPEG", quality=100, subsampling=0), lambda a: a, True),
    "webp": (".webp", _pillow("WEBP", lossless=True), lambda a: a, False),
    "webp_lossy": (".webp", _pillow("WEBP", quality=90), lambda a: a, True),
    "tif": (".tif", _pillow("TIFF"), lambda a: a, False),
    "tif_lzw": (".tif", _pillow("TIFF", compression="tiff_lzw"), lambda a: a, False),
    "tif_deflate": (".tiff", _pillow("TIFF", compression="tiff_adobe_deflate"), lambda a: a,
                    False),
    "tif_jpeg": (".tif", _pillow("TIFF", compression="jpeg", quality=75), lambda a: a, True),
    "tif_rgba": (".tif", _pillow("TIFF"), _rgba, False),
    "tif_gray": (".tif", _pillow("TIFF"), _gray, False),
    "tif_gray16": (".tif", _pillow("TIFF"), _gray16, False),  # Pillow decodes it (I;16)
    "tif_rgb16": (".tif", _tifffile, _rgb16, False),  # tifffile decodes it
    "tif_float": (".tif", _tifffile, _float, False),  # Pillow can't open float RGB
}
_ORIENTATIONS = range(1, 9)


def _write(tmp_path: Path, name: str, fmt: str, picture: np.ndarray, orientation: int) -> Path:
    suffix, write, stored, _ = _FORMATS[fmt]
    path = tmp_path / f"{name}_{fmt}_o{orientation}{suffix}"
    write(path, stored(picture), orientation)
    return path


def _as_shown(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` (uint8) as a viewer shows it with ``orientation``: ``ImageOps.exif_transpose``
    of a PNG holding these pixels and that orientation (PNG readers leave the turn to it)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", exif=_exif(orientation))
    with Image.open(buf) as im:
        return np.asarray(ImageOps.exif_transpose(im))


def _viewer(path: Path) -> np.ndarray | None:
    """The file as a viewer shows it (``ImageOps.exif_transpose``), in its own values; None
    when Pillow cannot open it.

    Read from a file object: from a path, Pillow (13) memory-maps an uncompressed grey, RGBA or
    16-bit TIFF with orientation 5..8 at its turned size and scrambles it (see
    ``test_pillows_memory_mapped_tiffs_are_not_trusted``)."""
    with path.open("rb") as fh:
        try:
            im = Image.open(fh)
        except OSError:
            return None
        with im:
            return np.asarray(ImageOps.exif_transpose(im))


def _viewer_rgb8(path: Path) -> np.ndarray | None:
    """:func:`_viewer` as RGB uint8 (16-bit values ``/ 257``, grey repeated)."""
    shown = _viewer(path)
    if shown is None:
        return None
    if shown.dtype == np.uint16:
        shown = np.rint(shown / 257.0).astype(np.uint8)
    return np.repeat(shown[..., None], 3, axis=-1) if shown.ndim == 2 else shown[..., :3]


def test_the_reference_turns_as_the_exif_standard_says() -> None:
    """The expectations below rest on ``_as_shown``: 6 is a quarter turn clockwise, 8 one
    counter-clockwise, 2 a mirror, 5 a transpose."""
    a = _stored_rgb()
    np.testing.assert_array_equal(_as_shown(a, 6), np.rot90(a, -1))
    np.testing.assert_array_equal(_as_shown(a, 8), np.rot90(a, 1))
    np.testing.assert_array_equal(_as_shown(a, 2), a[:, ::-1])
    np.testing.assert_array_equal(_as_shown(a, 5), a.swapaxes(0, 1))


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_read_rgb_shows_every_format_as_viewers_do(tmp_path: Path, fmt: str,
                                                   orientation: int) -> None:
    picture = _stored_rgb()
    path = _write(tmp_path, "img", fmt, picture, orientation)
    got = read_rgb(path)
    viewer = _viewer_rgb8(path)
    if viewer is not None:  # exactly what Pillow's own viewer-oriented decode gives
        np.testing.assert_array_equal(got, viewer)
    if fmt.startswith("tif_gray"):
        picture = np.repeat(picture[..., :1], 3, axis=-1)
    if not _FORMATS[fmt][3]:
        np.testing.assert_array_equal(got, _as_shown(picture, orientation))
        return
    # lossy: of the 8 ways to show the stored picture, the nearest is this orientation's
    error = {o: np.abs(got.astype(int) - shown.astype(int)).mean()
             for o in _ORIENTATIONS if (shown := _as_shown(picture, o)).shape == got.shape}
    assert min(error, key=error.__getitem__) == orientation
    assert error[orientation] < 10


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_read_mask_shows_every_format_as_viewers_do(tmp_path: Path, fmt: str,
                                                    orientation: int) -> None:
    mask8 = _stored_mask().astype(np.uint8) * 255
    path = _write(tmp_path, "mask", fmt, mask8, orientation)
    got = read_mask(path)
    np.testing.assert_array_equal(got, _as_shown(mask8, orientation) != 0)
    viewer = _viewer(path)
    if viewer is not None:  # what Pillow's viewer-oriented decode shows, as a mask
        on = viewer >= 128 if _FORMATS[fmt][3] else viewer != 0
        np.testing.assert_array_equal(got, on[..., :3].any(axis=-1) if on.ndim == 3 else on)


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
@pytest.mark.parametrize("fmt", ["tif_gray16", "tif_rgb16", "tif_float"])
def test_deep_tiff_masks_of_zero_and_one_are_read_at_full_depth(tmp_path: Path, fmt: str,
                                                               orientation: int) -> None:
    """A 0/1 mask in a 16-bit or float TIFF: every nonzero value is anomalous (Pillow keeps only
    the high byte of 16-bit RGB, which is 0 for every value below 256, and cannot open float
    RGB)."""
    suffix, write, _, _ = _FORMATS[fmt]
    ones = _stored_mask().astype(np.uint16)
    stored = {"tif_gray16": ones, "tif_rgb16": np.repeat(ones[..., None], 3, axis=-1),
              "tif_float": ones.astype(np.float32)}[fmt]
    path = tmp_path / f"m{suffix}"
    write(path, stored, orientation)
    want = _as_shown(_stored_mask().astype(np.uint8), orientation) != 0
    np.testing.assert_array_equal(read_mask(path), want)


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_an_image_and_its_mask_stay_aligned(tmp_path: Path, fmt: str, orientation: int) -> None:
    """The image's red block (255 inside, 40 outside) is where its mask says, whatever the
    format and orientation (the same stored geometry, the same tag)."""
    image = _write(tmp_path, "img", fmt, _stored_rgb(), orientation)
    mask = _write(tmp_path, "mask", fmt, _stored_mask().astype(np.uint8) * 255, orientation)
    block = read_rgb(image)[..., 0] >= 128
    np.testing.assert_array_equal(block, read_mask(mask))


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("stored", ["L", "RGBA", "I;16"])
def test_pillows_memory_mapped_tiffs_are_not_trusted(tmp_path: Path, stored: str,
                                                     orientation: int) -> None:
    """Given a path, Pillow memory-maps an uncompressed single-strip TIFF of these modes with
    its turned size when the orientation swaps width and height, and the pixels come out
    scrambled; the readers must still give the picture turned by the standard's table."""
    rgb = _stored_rgb()
    arr = {"L": rgb[..., 0], "RGBA": _rgba(rgb), "I;16": _gray16(rgb)}[stored]
    Image.fromarray(arr).save(tmp_path / "x.tif", tiffinfo={274: orientation})
    Image.fromarray(_stored_mask()).save(tmp_path / "m.tif", tiffinfo={274: orientation})
    turn = {5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}[orientation]
    want = rgb if stored == "RGBA" else np.repeat(rgb[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(read_rgb(tmp_path / "x.tif"), turn(want))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), turn(_stored_mask()))
