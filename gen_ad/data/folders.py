"""Folders of image patches: any common format decoded to RGB, validated up front, seeded subsets.

Layout read by :class:`PatchFolder`::

    root/<class>/**/<image>      one class per subfolder (nested folders allowed)
    root/<image>                 or images directly in ``root`` (no subfolder holds images):
                                 one class named after the folder (``.../normal`` -> ``normal``)

Hidden files and folders (names starting with ``.``: ``.DS_Store``, ``._x.png`` AppleDouble
files, ``.ipynb_checkpoints``) and files without an image extension are ignored; linked folders
are followed, each real folder read once (:func:`walk_images`). Every image is decoded once when
the dataset is built; unreadable or truncated files are skipped with a single warning naming each
and why (or an error when too many are bad), so ``len()`` is exact before training starts, and
pixel-identical copies are named in one warning (they are kept). Every reader (training, the
patch cache, scoring, KNN, FID, slides) decodes through :func:`read_rgb`, so one file is one
RGB array everywhere.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from einops import rearrange
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from gen_ad.errors import DataError

if TYPE_CHECKING:
    from gen_ad.data.stain import StainNormalizer

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# What a file decodes to. BUMP IT WHENEVER DECODING CHANGES (read_rgb, read_mask, fit_size,
# orientation, depth or alpha rules): caches of decoded pixels (the patch cache) key on it, so
# caches built by older code are rebuilt instead of reused with other pixels.
# 1 (implicit, never recorded): every earlier decoder; 2: EXIF/TIFF orientation applied once,
# TIFFs included, masks read like images.
DECODER_VERSION = 2
ResizeMode = Literal["resize", "center_crop"]
_MAX_LISTED = 10
_UNREADABLE = "cannot read image "  # + "<path>: <reason>"


# ----------------------------------------------------------------------------- decoding


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and is not hidden."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def array_to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Convert a decoded pixel array of any depth and channel count to RGB uint8.

    Depth: uint8 as is; other integers holding only ``[0, 255]`` are 8-bit values in a wider
    type (kept), those in ``[0, 65535]`` are 16-bit (``round(v / 257)``: 65535 -> 255),
    otherwise min-max scaled; floats in ``[0, 1]`` are multiplied by 255, those in ``[0, 255]``
    kept, otherwise min-max scaled; booleans become 0/255.
    Channels: ``[H,W]`` or ``[H,W,1]`` grey is repeated; ``[H,W,2]`` (grey+alpha) and ``[H,W,4]``
    (RGBA) are composited on white; ``[H,W,3]`` is RGB.

    Args:
        arr: ``[H,W]`` or ``[H,W,C]`` array, C in 1..4.
    Returns:
        uint8 array ``[H,W,3]``.
    """
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or not 1 <= arr.shape[-1] <= 4:
        raise DataError(f"unsupported pixel array shape {tuple(arr.shape)}")
    a = _depth_to_float255(arr)
    if a.shape[-1] in (2, 4):
        alpha = a[..., -1:] / 255.0
        a = a[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _depth_to_float255(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    if arr.dtype == bool:
        return arr.astype(np.float64) * 255.0
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError("image holds NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.integer) and lo >= 0 and hi <= 65535:
        return a if hi <= 255 else a / 257.0  # 8-bit values in a wider type stay as they are
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 255:
        return a * 255.0 if hi <= 1 else a
    return (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)


def pil_to_rgb8(im: Image.Image) -> np.ndarray:
    """Convert an open PIL image of any mode to RGB uint8 ``[H,W,3]`` (transparency on white)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return pil_to_rgb8(im)
    if mode in ("1", "L"):
        return array_to_rgb8(np.asarray(im.convert("L")))
    if mode in ("LA", "La", "PA", "RGBa", "RGBX"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA" or mode.startswith("I") or mode == "F":
        return array_to_rgb8(np.asarray(im))
    return np.array(im.convert("RGB"), dtype=np.uint8)  # CMYK, YCbCr, HSV, ...


def _tiff_bits(im: Image.Image) -> int:
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258, 8) if tags is not None else 8
    return int(max(bits) if isinstance(bits, (tuple, list)) else bits)


def _tiff_array(path: Path) -> tuple[np.ndarray, int]:
    """The first image of a TIFF as ``[H,W]`` or ``[H,W,C]`` (planar ``[C,H,W]`` moved), and
    its orientation tag (1 when absent)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        _check_tiff_page_size(page)  # before anything is allocated
        arr = np.squeeze(tif.asarray(key=0))
        tag = page.tags.get(274)  # type: ignore[union-attr]
    if arr.ndim == 3 and arr.shape[0] <= 4 < arr.shape[-1]:
        arr = np.moveaxis(arr, 0, -1)
    return arr, _valid_orientation(tag.value if tag is not None else 1)


_MAX_SAMPLES = 4  # grey, grey+alpha, RGB, RGBA
_MAX_SAMPLE_BYTES = 2  # 16 bits; deeper samples are allowed while the whole fits the bound


def _check_tiff_page_size(page: Any) -> None:
    """Refuse a TIFF page (a ``tifffile.TiffPage``) whose decoded pixels would be too large,
    from its header alone (a few bytes of file can declare gigabytes).

    Bounds, from Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` (none when
    it is ``None``): at most twice that many pixels (Pillow's own error threshold), at most
    :data:`_MAX_SAMPLES` samples per pixel, and at most that many pixels x 4 samples x 2 bytes
    of decoded data.

    Raises:
        DataError: the page is over a bound (its sizes and the bound named).
    """
    w, h = int(page.imagewidth), int(page.imagelength)
    samples = int(page.samplesperpixel)
    if samples > _MAX_SAMPLES:
        raise DataError(f"{samples} samples per pixel (at most {_MAX_SAMPLES} are supported: "
                        "grey, grey+alpha, RGB, RGBA)")
    if not Image.MAX_IMAGE_PIXELS:
        return
    max_pixels = 2 * int(Image.MAX_IMAGE_PIXELS)
    if w * h > max_pixels:
        raise DataError(f"{w}x{h} pixels, over Pillow's decompression-bomb limit of "
                        f"{max_pixels} (PIL.Image.MAX_IMAGE_PIXELS x 2)")
    bits = page.bitspersample
    itemsize = page.dtype.itemsize if page.dtype is not None else -(-int(
        max(bits) if isinstance(bits, (tuple, list)) else bits) // 8)
    decoded = math.prod(int(n) for n in page.shape) * itemsize
    max_bytes = max_pixels * _MAX_SAMPLES * _MAX_SAMPLE_BYTES
    if decoded > max_bytes:
        shape = "x".join(str(int(n)) for n in page.shape)
        raise DataError(f"{shape} samples of {itemsize} byte(s) would decode to {decoded} bytes, "
                        f"over the limit of {max_bytes} (PIL.Image.MAX_IMAGE_PIXELS x 2 pixels "
                        f"x {_MAX_SAMPLES} samples x {_MAX_SAMPLE_BYTES} bytes)")


def _valid_orientation(value: Any) -> int:
    """An EXIF/TIFF orientation value as 1..8; anything else (missing, malformed) is 1."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return 1
    return v if 1 <= v <= 8 else 1


def _orientation(im: Image.Image) -> int:
    """The EXIF (or TIFF) orientation of an open image, 1 (as stored) when it has none."""
    try:
        return _valid_orientation(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the image unreadable
        return 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an ``[H,W]`` or ``[H,W,C]`` array the way an EXIF/TIFF ``orientation`` (1..8) says,
    so it looks as image viewers show the file (as ``PIL.ImageOps.exif_transpose``)."""
    ops = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[_valid_orientation(orientation)](arr))


def _decode(p: Path) -> tuple[np.ndarray, int]:
    """``p`` as RGB uint8, and the orientation still to apply (see :func:`read_rgb`)."""
    with _pil_image(p) as im:
        if im is None or _deep_tiff(im):
            arr, orientation = _tiff_array(p)  # tifffile does not turn: its tag still applies
            return array_to_rgb8(arr), orientation
        im.load()
        # Read the orientation only now: Pillow's TIFF loader turns the pixels during load()
        # and drops the tag; other formats keep both, and the turn is still to be done.
        return pil_to_rgb8(im), _orientation(im)


@contextmanager
def _pil_image(p: Path) -> Iterator[Image.Image | None]:
    """``p`` opened (not loaded) with Pillow and closed after, or None for a TIFF Pillow cannot
    identify (float RGB: ``tifffile`` reads it).

    Opened from a file object, not from the path: given a path, Pillow memory-maps an
    uncompressed single-strip image with its *displayed* size, which for a TIFF whose
    orientation swaps width and height (5..8) scrambles grey, RGBA and 16-bit pixels (seen
    with Pillow 13); decoded from a file object they come out right, turned once by ``load()``.
    """
    with open(p, "rb") as fh:
        try:
            im = Image.open(fh)
        except UnidentifiedImageError:
            if p.suffix.lower() not in (".tif", ".tiff"):
                raise
            yield None
            return
        with im:
            yield im


def _deep_tiff(im: Image.Image) -> bool:
    """Whether ``im`` (open, not loaded) is a multi-channel TIFF deeper than 8 bits, which
    Pillow would truncate to its high bytes: those are read with ``tifffile``."""
    return im.format == "TIFF" and _tiff_bits(im) > 8 and len(im.getbands()) > 1


def unreadable_reason(path: Path, error: BaseException) -> str:
    """Why ``path`` could not be decoded, in words a user can act on (``error``: what the
    decoder raised)."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    try:
        empty = path.is_file() and path.stat().st_size == 0
    except OSError:
        empty = False
    if empty:
        return "empty file (0 bytes)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can identify (is it an image at all?)"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return "truncated file (an interrupted copy or download?)"
    return f"{type(error).__name__}: {error}"


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file fully into RGB uint8 ``[H,W,3]``, turned as its EXIF/TIFF
    orientation says (as image viewers show it).

    Multi-channel TIFFs deeper than 8 bits, and TIFFs Pillow cannot decode (float RGB), are
    read with ``tifffile`` (exact 16-bit scaling; float scaling as below); everything else with
    Pillow. A multi-page TIFF gives its first page. See :func:`array_to_rgb8` for the depth and
    alpha rules.

    Raises:
        DataError: ``cannot read image <path>: <reason>``: the file is missing (or a broken
            link), empty, corrupt, truncated, not an image or of an unsupported kind, or its
            header declares more than Pillow's decompression-bomb limit allows (TIFFs read
            with ``tifffile``: pixels, samples per pixel and decoded bytes, checked before
            anything is decoded).
    """
    p = Path(path)
    try:
        rgb, orientation = _decode(p)
    except DataError as e:
        raise DataError(f"{_UNREADABLE}{p}: {e}") from e
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
        raise DataError(f"{_UNREADABLE}{p}: {unreadable_reason(p, e)}") from e
    return apply_orientation(rgb, orientation)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask file: any nonzero channel value = anomalous (0/1 and 0/255
    masks alike, 16-bit and float TIFFs at full depth); in a lossy file (JPEG, JPEG-compressed
    TIFF, lossy WebP), whose compression rings around edges, a value >= 128. Turned by its
    EXIF/TIFF orientation, as :func:`read_rgb` turns images (read the same way, so an image and
    its mask stored alike stay aligned).

    Returns:
        bool array ``[H,W]``.
    """
    p = Path(path)
    try:
        arr, orientation, lossy = _decode_mask(p)
    except DataError as e:
        raise DataError(f"cannot read mask {p}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read mask {p}: {unreadable_reason(p, e)}") from e
    arr = apply_orientation(arr, orientation)
    on = arr >= 128 if lossy else arr != 0
    return on.any(axis=-1) if arr.ndim == 3 else on


def _decode_mask(p: Path) -> tuple[np.ndarray, int, bool]:
    """A mask file's ``[H,W]`` or ``[H,W,C]`` values as stored (alpha dropped), its orientation
    and whether its format is lossy; TIFFs are read as by :func:`_decode` (deep or
    floating-point ones with ``tifffile``, at full depth)."""
    with _pil_image(p) as im:
        if im is None or _deep_tiff(im):
            return (*_without_alpha(_tiff_array(p)), False)
        im.load()  # then the orientation: Pillow turns TIFFs while loading (see _decode)
        arr = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "RGBa", "LA", "La") else im)
        return arr, _orientation(im), _lossy(im, p)


def _lossy(im: Image.Image, p: Path) -> bool:
    """Whether ``im`` (the open file ``p``) went through lossy compression (JPEG, JPEG in a
    TIFF, lossy WebP), whose ringing leaves small nonzero values around a mask's edges."""
    if im.format in ("JPEG", "MPO"):
        return True
    if im.format == "TIFF":
        return im.info.get("compression") in ("jpeg", "tiff_jpeg")
    return im.format == "WEBP" and _webp_lossy(p)


def _webp_lossy(p: Path) -> bool:
    """Whether the WebP file ``p`` holds a lossy (``VP8 ``) rather than a lossless (``VP8L``)
    bitstream, found by walking its RIFF chunks; lossy when neither is found (animations)."""
    with open(p, "rb") as fh:
        fh.seek(12)  # past "RIFF" <size> "WEBP"
        while len(head := fh.read(8)) == 8:
            fourcc, size = head[:4], int.from_bytes(head[4:], "little")
            if fourcc in (b"VP8 ", b"VP8L"):
                return fourcc == b"VP8 "
            fh.seek(size + size % 2, os.SEEK_CUR)
    return True


def _without_alpha(decoded: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
    """A ``tifffile`` array and orientation with a grey+alpha or RGBA image's alpha dropped."""
    arr, orientation = decoded
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        arr = arr[..., :-1]
    return arr, orientation


def fit_size(rgb: np.ndarray, size: int, mode: ResizeMode = "resize",
             resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Bring an ``[H,W]`` or ``[H,W,C]`` uint8 array to ``size x size``.

    ``resize`` scales the whole image (antialiased; the aspect ratio is not kept);
    ``center_crop`` crops the centre, first scaling the shorter side up to ``size`` if needed.
    """
    if mode not in ("resize", "center_crop"):
        raise ValueError(f"resize mode must be 'resize' or 'center_crop', got {mode!r}")
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    im = Image.fromarray(rgb)
    if mode == "resize":
        return np.asarray(im.resize((size, size), resample))
    if min(h, w) < size:
        scale = size / min(h, w)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[H,W,3]`` -> float32 ``[3,H,W]`` in ``[-1,1]``."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H,W,3], got {rgb.dtype} {tuple(rgb.shape)}")
    t = torch.from_numpy(rgb.astype(np.float32)).div_(127.5).sub_(1.0)
    return rearrange(t, "h w c -> c h w").contiguous()


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float ``[B,3,H,W]`` (or ``[3,H,W]``) in ``[-1,1]`` -> uint8 ``[B,H,W,3]`` (or ``[H,W,3]``).

    Values are mapped by ``round((x + 1) * 127.5)`` and clamped to ``[0, 255]``.
    """
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected [B,3,H,W] or [3,H,W], got {tuple(x.shape)}")
    u = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(u, "... c h w -> ... h w c").contiguous()


def load_image(path: str | os.PathLike[str], size: int, resize: ResizeMode = "resize",
               stain: StainNormalizer | None = None) -> torch.Tensor:
    """Read one image file as float32 ``[3,size,size]`` in ``[-1,1]`` (DataError if unreadable)."""
    rgb = fit_size(read_rgb(path), size, resize)
    if stain is not None:
        rgb = stain(rgb)
    return image_to_tensor(rgb)


# ----------------------------------------------------------------------------- discovery


def walk_images(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Image files under ``folder``, recursively, folder by folder (each folder's files sorted).

    Hidden files and folders (``.DS_Store``, ``._x.png`` AppleDouble files,
    ``.ipynb_checkpoints``) are skipped, as is every file without an image extension.
    Symbolic links to folders are followed, but every real folder is read once: a link loop,
    or a link to a folder read elsewhere in the walk, adds nothing.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))


def _images_under(folder: Path) -> list[Path]:
    return sorted(walk_images(folder), key=lambda p: p.as_posix())


MASK_FOLDER = "masks"
# what gen-ad synth (gen_ad.data.synthetic) writes beside its class folders
SYNTH_MANIFEST_NAME = "manifest.csv"
SYNTH_MANIFEST_HEADER = "path,label,kind"
SYNTH_SHEET_NAME = "contact_sheet.png"


def discover_classes(root: str | os.PathLike[str]) -> tuple[dict[str, list[Path]], bool]:
    """Find the class folders of ``root`` and their image files.

    A subfolder named ``masks`` holds ground-truth masks (the layout ``gen-ad synth`` writes),
    never a class of images: every command that lists a data folder (training, ``score``,
    ``knn fit|score``, ``benchmark``) skips it.

    Returns:
        ``({class name: sorted image paths}, flat)`` where ``flat`` is True when ``root`` holds
        images directly and no subfolder with images (one class named after ``root``).
    Raises:
        DataError: ``root`` is missing, not a folder, or holds no images.
    """
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(f"data folder not found: {r}")
    if not r.is_dir():
        raise DataError(f"data path is not a folder: {r}")
    subdirs = sorted(d for d in r.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and d.name != MASK_FOLDER)
    found = {d.name: _images_under(d) for d in subdirs}
    found = {k: v for k, v in found.items() if v}
    direct = sorted(p for p in r.iterdir() if p.is_file() and is_image_file(p))
    if not found:
        if not direct:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise DataError(f"no images found in {r} (looked for {exts} in it and its subfolders)")
        return {r.resolve().name: direct}, True
    direct = [p for p in direct if not _synth_sheet(p)]
    if direct:
        warnings.warn(_ignored_message(direct, r, found), stacklevel=3)
    return found, False


def _synth_sheet(p: Path) -> bool:
    """Whether ``p`` is the contact sheet ``gen-ad synth`` wrote beside its set (the folder's
    ``manifest.csv`` is a synth manifest): skipped without a warning, as the set's own file."""
    if p.name != SYNTH_SHEET_NAME:
        return False
    try:
        with open(p.parent / SYNTH_MANIFEST_NAME, encoding="utf-8") as f:
            return f.readline().strip() == SYNTH_MANIFEST_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _ignored_message(direct: Sequence[Path], root: Path, classes: Iterable[str]) -> str:
    """The warning about images directly in ``root`` beside its class folders, naming them
    (at most 3, then how many more)."""
    names = [p.name for p in direct]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    what = "1 image" if len(names) == 1 else f"{len(names)} images"
    verb = "is" if len(names) == 1 else "are"
    return (f"{what} directly in {root} ({shown}) {verb} ignored because it has class "
            f"subfolders ({', '.join(classes)})")


def find_mask_root(root: str | os.PathLike[str]) -> Path | None:
    """``root/masks`` when it exists (the layout ``gen-ad synth`` writes), else ``None``."""
    cand = Path(root).expanduser() / MASK_FOLDER
    return cand if cand.is_dir() else None


def _mask_index(mask_root: Path) -> dict[str, Path]:
    """Map ``relative/path/stem`` (with a ``_mask`` suffix removed) -> mask file."""
    if not mask_root.is_dir():
        raise DataError(f"mask folder not found: {mask_root}")
    index: dict[str, Path] = {}
    for p in _images_under(mask_root):
        rel = p.relative_to(mask_root).with_suffix("").as_posix()
        keys = {rel, rel[: -len("_mask")]} if rel.endswith("_mask") else {rel}
        for k in keys:
            if k in index and index[k] != p:
                raise DataError(f"two mask files match the same image: {index[k]} and {p}")
            index[k] = p
    return index


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Sample:
    path: str
    cls: str
    label: int
    mask: str | None


class PatchFolder(Dataset):
    """A folder of image patches as a map-style dataset of dicts.

    Items: ``{"image": float32 [3,size,size] in [-1,1], "label": int (0 normal, 1 anomalous),
    "path": str, "cls": str}``, plus ``"mask": float32 [size,size] in {0,1}`` when ``mask_root``
    is given.

    Args:
        root: folder of class subfolders, or of images directly (one class named after the folder).
        size: output side length in pixels.
        classes: class names to load (``None``: all class folders that hold images).
        normal_classes: classes with label 0; every other class has label 1.
        mask_root: folder of ground-truth masks mirroring ``root``: the mask of
            ``root/<rel>/<stem>.<ext>`` is ``mask_root/<rel>/<stem>[_mask].<any ext>``; a nonzero
            pixel is anomalous. Masks must have their image's size.
        missing_mask: for an anomalous image without a mask file, ``"error"`` (DataError at
            construction) or ``"full"`` (the whole image is marked anomalous). Normal images
            without a mask always get an all-zero mask.
        resize: ``resize`` (whole image to size) or ``center_crop``.
        max_bad_fraction: unreadable files are skipped with one warning; more than this fraction
            of bad files (or none readable) is a DataError.
        stain: optional stain normaliser applied to each uint8 patch after resizing.
        workers: threads for the up-front decode check (default: up to 8).
    Raises:
        DataError: missing/empty folder, unknown class, missing masks, too many bad files.
    """

    def __init__(self, *, root: str | os.PathLike[str], size: int,
                 classes: Sequence[str] | None = None,
                 normal_classes: Sequence[str] = ("normal",),
                 mask_root: str | os.PathLike[str] | None = None,
                 missing_mask: Literal["error", "full"] = "error",
                 resize: ResizeMode = "resize", max_bad_fraction: float = 0.05,
                 stain: StainNormalizer | None = None, workers: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if resize not in ("resize", "center_crop"):
            raise ValueError(f"resize must be 'resize' or 'center_crop', got {resize!r}")
        if missing_mask not in ("error", "full"):
            raise ValueError(f"missing_mask must be 'error' or 'full', got {missing_mask!r}")
        self.root = Path(root).expanduser()
        self.size = size
        self.resize = resize
        self.stain = stain
        self.missing_mask = missing_mask
        self.mask_root = Path(mask_root).expanduser() if mask_root is not None else None
        found, self.flat = discover_classes(self.root)
        if self.mask_root is not None and not self.flat:  # a mask folder inside root is no class
            found = {c: v for c, v in found.items()
                     if (self.root / c).resolve() != self.mask_root.resolve()}
        self.classes = self._select_classes(found, classes)
        self.normal_classes = tuple(normal_classes)
        candidates = self._candidates(found)
        self.samples, self.bad_files = self._scan(candidates, max_bad_fraction, workers)

    def _select_classes(self, found: dict[str, list[Path]],
                        classes: Sequence[str] | None) -> list[str]:
        if classes is None:
            return sorted(found)
        unknown = [c for c in classes if c not in found]
        if unknown:
            raise DataError(f"unknown class {', '.join(map(repr, unknown))} in {self.root} "
                            f"(classes with images: {', '.join(sorted(found))})")
        return list(dict.fromkeys(classes))

    def _candidates(self, found: dict[str, list[Path]]) -> list[_Sample]:
        index = _mask_index(self.mask_root) if self.mask_root is not None else None
        out: list[_Sample] = []
        missing: list[str] = []
        for cls in self.classes:
            label = 0 if cls in self.normal_classes else 1
            for p in found[cls]:
                mask = None
                if index is not None:
                    # masks mirror root (<class>/<stem>) or sit flat by stem (gen-ad synth)
                    rel = p.relative_to(self.root).with_suffix("")
                    m = index.get(rel.as_posix())
                    if m is None and not self.flat:
                        m = index.get(rel.relative_to(cls).as_posix())
                    mask = str(m) if m is not None else None
                    if m is None and label == 1 and self.missing_mask == "error":
                        missing.append(str(p))
                out.append(_Sample(str(p), cls, label, mask))
        if missing:
            raise DataError(f"{len(missing)} anomalous images have no mask in {self.mask_root}: "
                            f"{_listing(missing)} (set missing_mask='full' to mark them whole)")
        _check_names([s.path for s in out], self.root)
        return out

    def _scan(self, cands: list[_Sample], max_bad: float,
              workers: int | None) -> tuple[list[_Sample], list[tuple[str, str]]]:
        n_workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            checks = list(tqdm(pool.map(_check_sample, cands), total=len(cands),
                               desc=f"checking {self.root.name}", disable=len(cands) < 5000,
                               leave=False))
        good = [s for s, (r, _) in zip(cands, checks) if r is None]
        bad = [(s.path, r) for s, (r, _) in zip(cands, checks) if r is not None]
        if not good:
            raise DataError(f"none of the {len(cands)} images in {self.root} could be read: "
                            f"{_listing([f'{p} ({r})' for p, r in bad])}")
        if bad:
            frac = len(bad) / len(cands)
            listing = _listing([f"{p} ({r})" for p, r in bad])
            if frac > max_bad:
                raise DataError(f"{len(bad)} of {len(cands)} images in {self.root} are unreadable "
                                f"({frac:.1%} > max_bad_fraction {max_bad:.1%}): {listing}; "
                                "replace or remove them (or raise data.max_bad_fraction)")
            warnings.warn(f"skipping {len(bad)} unreadable of {len(cands)} images in {self.root}: "
                          f"{listing}", stacklevel=3)
        copies = _copies([(s.path, d) for s, (r, d) in zip(cands, checks) if r is None])
        if copies:
            warnings.warn(_copies_message(copies, self.root), stacklevel=3)
        return good, bad

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Label of every item (0 normal, 1 anomalous), in item order."""
        return [s.label for s in self.samples]

    @property
    def paths(self) -> list[str]:
        """File path of every item, in item order."""
        return [s.path for s in self.samples]

    @property
    def labelled(self) -> bool:
        """False for a flat folder: its images carry no class, so their ``label`` (1, as a
        class other than a normal one) says nothing; outputs leave it empty."""
        return not self.flat

    def rgb8(self, index: int) -> np.ndarray:
        """Item ``index`` decoded, sized and stain-normalised: uint8 ``[size, size, 3]``."""
        rgb = fit_size(read_rgb(self.samples[index].path), self.size, self.resize)
        return self.stain(rgb) if self.stain is not None else rgb

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        item: dict[str, Any] = {"image": image_to_tensor(self.rgb8(index)), "label": s.label,
                                "path": s.path, "cls": s.cls}
        if self.mask_root is not None:
            item["mask"] = self._mask(s)
        return item

    def _mask(self, s: _Sample) -> torch.Tensor:
        if s.mask is None:
            fill = 1.0 if s.label == 1 else 0.0
            return torch.full((self.size, self.size), fill, dtype=torch.float32)
        m = read_mask(s.mask).astype(np.uint8) * 255
        m = fit_size(m, self.size, self.resize, resample=Image.Resampling.NEAREST)
        return torch.from_numpy((m > 127).astype(np.float32))


def _check_sample(s: _Sample) -> tuple[str | None, bytes | None]:
    """Decode an image (and its mask) fully: ``(why it is unusable, None)``, or ``(None, a
    digest of its decoded pixels)``."""
    try:
        rgb = read_rgb(s.path)
        h, w = rgb.shape[:2]
        if s.mask is not None:
            mh, mw = read_mask(s.mask).shape
            if (mh, mw) != (h, w):
                return f"mask {s.mask} is {mw}x{mh}, image is {w}x{h}", None
    except DataError as e:
        return str(e).removeprefix(f"{_UNREADABLE}{s.path}: "), None
    digest = hashlib.blake2b(f"{h}x{w}".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return None, digest.digest()


def _check_names(paths: Sequence[str], root: Path) -> None:
    """Refuse file names that are not valid UTF-8 (bytes from another system's encoding, kept
    by Python as surrogates): no ``scores.csv``, cache or report can write them.

    Raises:
        DataError: naming them (bytes shown as ``\\xNN``) and how to rename them.
    """
    bad = []
    for p in paths:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(os.fsencode(p).decode("utf-8", "backslashreplace"))
    if bad:
        what = "1 file name is" if len(bad) == 1 else f"{len(bad)} file names are"
        raise DataError(f"{what} not valid UTF-8 under {root}: "
                        f"{_listing(bad)}; rename them (e.g. convmv -f latin1 -t utf-8 -r "
                        "--notest DIR)")


def _copies(digests: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, str]]:
    """``(copy, first)`` for every image whose decoded pixels equal an earlier image's."""
    first: dict[bytes, str] = {}
    out: list[tuple[str, str]] = []
    for path, d in digests:
        if d is None:
            continue
        if d in first:
            out.append((path, first[d]))
        else:
            first[d] = path
    return out


def _copies_message(copies: Sequence[tuple[str, str]], root: Path) -> str:
    """The warning about pixel-identical images: each counts as one more patch."""
    n = len(copies)
    what = "1 image is a pixel-identical copy" if n == 1 else \
        f"{n} images are pixel-identical copies"
    return (f"{what} of another image in {root} ({_listing([f'{c} = {f}' for c, f in copies])})"
            ": every copy counts as one more patch in training, scores and metrics; remove "
            "the copies unless that is meant (blank tiles can be identical by chance)")


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------- subsets


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A seeded random choice of ``n`` items (indices kept in dataset order).

    The same ``(len(dataset), n, seed)`` always gives the same indices (numpy PCG64; independent
    of the Python hash seed).

    Raises:
        DataError: ``n`` is not in ``1..len(dataset)``.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if not 0 < n <= total:
        raise DataError(f"cannot take a subset of {n} items from a dataset of {total}")
    return Subset(dataset, subset_indices(total, n, seed))


def subset_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """The sorted indices of :func:`subset`'s seeded choice of ``n`` of ``total`` items."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n]).tolist()


def split(dataset: Dataset, parts: Sequence[float] | Sequence[int],
          seed: int = 0) -> list[Subset]:
    """Split a dataset into disjoint seeded random parts (indices in dataset order in each part).

    Args:
        dataset: any sized dataset.
        parts: fractions (floats summing to at most 1; leftover items are dropped; when they
            sum to 1 the rounding remainder goes to the parts with the largest fractional sizes)
            or counts (ints summing to at most ``len(dataset)``).
        seed: random seed.
    Returns:
        One :class:`~torch.utils.data.Subset` per part.
    """
    total = len(dataset)  # type: ignore[arg-type]
    sizes = _part_sizes(total, parts)
    perm = np.random.default_rng(seed).permutation(total)
    out, start = [], 0
    for n in sizes:
        out.append(Subset(dataset, np.sort(perm[start:start + n]).tolist()))
        start += n
    return out


def _part_sizes(total: int, parts: Sequence[float] | Sequence[int]) -> list[int]:
    if len(parts) == 0 or any(isinstance(p, bool) or p < 0 for p in parts):
        raise DataError(f"split parts must be non-negative numbers, got {list(parts)}")
    if all(isinstance(p, (int, np.integer)) for p in parts):
        if sum(parts) > total:
            raise DataError(f"split counts {list(parts)} exceed the dataset size {total}")
        return [int(p) for p in parts]
    s = float(sum(parts))
    if s > 1.0 + 1e-9:
        raise DataError(f"split fractions {list(parts)} sum to {s:.4g} > 1")
    exact = np.asarray(parts, dtype=np.float64) * total
    sizes = np.floor(exact + 1e-9).astype(np.int64)
    if abs(s - 1.0) <= 1e-9:  # hand out the rounding remainder by largest fractional part
        order = np.argsort(-(exact - sizes), kind="stable")
        sizes[order[: max(0, total - int(sizes.sum()))]] += 1
    return sizes.tolist()
