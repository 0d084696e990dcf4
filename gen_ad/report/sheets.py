"""Contact sheets: a grid of patches, optional mask outlines and per-tile labels (PIL + numpy).

Generic enough for dataset previews, training sample grids and reconstruction grids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gen_ad.errors import DataError
from gen_ad.utils.io import atomic_path

OUTLINE_RGB: tuple[int, int, int] = (0, 255, 0)


def mask_outline(masks: np.ndarray) -> np.ndarray:
    """Inner boundary of binary masks: mask pixels with a 4-neighbour outside the mask.

    Args:
        masks: bool ``[N,H,W]`` (or ``[H,W]``).
    Returns:
        bool array of the same shape. Pixels on the image border count as boundary.
    """
    m = np.asarray(masks, dtype=bool)
    padded = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], constant_values=False)
    inner = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]
             & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
    return m & ~inner


def _check_inputs(images: np.ndarray, masks: np.ndarray | None, labels: Sequence[str] | None
                  ) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
        raise DataError(f"contact sheet: images must be non-empty uint8 [N,H,W,3], got "
                        f"{images.dtype} {list(images.shape)}")
    if masks is not None and np.asarray(masks).shape != images.shape[:3]:
        raise DataError(f"contact sheet: masks must be [N,H,W] = {list(images.shape[:3])}, got "
                        f"{list(np.asarray(masks).shape)}")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"contact sheet: {len(labels)} labels for {len(images)} images")
    return images


def _draw_labels(sheet: np.ndarray, labels: Sequence[str], origins: list[tuple[int, int]]
                 ) -> np.ndarray:
    """Write each label on a dark box at the top-left corner of its tile."""
    img = Image.fromarray(sheet)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for text, (y, x) in zip(labels, origins):
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((x + 2, y + 1), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x + 2, y + 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def contact_sheet(images: np.ndarray, masks: np.ndarray | None = None, ncol: int = 8,
                  labels: Sequence[str] | None = None, *, scale: int = 1, pad: int = 2,
                  background: tuple[int, int, int] = (255, 255, 255),
                  outline: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """Tile patches into one image, outlining masks and labelling tiles.

    Args:
        images: uint8 ``[N,H,W,3]``.
        masks: optional bool ``[N,H,W]``; each mask's boundary is drawn in ``outline`` colour
            (after nearest-neighbour upscaling, so outlines stay one screen pixel wide).
        ncol: tiles per row (rows = ceil(N / ncol)).
        labels: optional text per tile (empty strings are skipped).
        scale: integer upscaling of each tile (nearest neighbour).
        pad: pixels between tiles and around the sheet.
        background: RGB of the padding and of empty cells.
        outline: RGB of mask outlines.
    Returns:
        uint8 ``[rows*(H*scale+pad)+pad, ncol*(W*scale+pad)+pad, 3]``.
    """
    images = _check_inputs(images, masks, labels)
    if ncol < 1 or scale < 1 or pad < 0:
        raise DataError(f"contact sheet: need ncol >= 1, scale >= 1, pad >= 0 "
                        f"(got {ncol}, {scale}, {pad})")
    n, h, w, _ = images.shape
    tiles = images.repeat(scale, 1).repeat(scale, 2) if scale > 1 else images.copy()
    if masks is not None:
        big = np.asarray(masks, dtype=bool)
        big = big.repeat(scale, 1).repeat(scale, 2) if scale > 1 else big
        tiles[mask_outline(big)] = outline
    th, tw = h * scale, w * scale
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    sheet = np.empty((nrow * (th + pad) + pad, ncol * (tw + pad) + pad, 3), dtype=np.uint8)
    sheet[:] = np.asarray(background, dtype=np.uint8)
    origins = [(pad + (i // ncol) * (th + pad), pad + (i % ncol) * (tw + pad)) for i in range(n)]
    for tile, (y, x) in zip(tiles, origins):  # one copy per tile; n is small for a sheet
        sheet[y:y + th, x:x + tw] = tile
    if labels is not None:
        sheet = _draw_labels(sheet, labels, origins)
    return sheet


def save_contact_sheet(path: str | os.PathLike[str], images: np.ndarray,
                       masks: np.ndarray | None = None, ncol: int = 8,
                       labels: Sequence[str] | None = None, **kwargs: object) -> Path:
    """Render :func:`contact_sheet` and write it atomically as PNG. Returns the path."""
    sheet = contact_sheet(images, masks, ncol, labels, **kwargs)  # type: ignore[arg-type]
    out = Path(path)
    with atomic_path(out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return out
