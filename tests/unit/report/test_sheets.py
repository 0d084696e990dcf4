"""Contact sheets: geometry, mask outlines, labels, errors and the PNG file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.errors import DataError
from gen_ad.report.sheets import OUTLINE_RGB, contact_sheet, mask_outline, save_contact_sheet


def _images(n: int = 5, h: int = 8, w: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(20, 200, size=(n, h, w, 3), dtype=np.uint8)  # never pure green


def test_mask_outline_of_square() -> None:
    m = np.zeros((1, 8, 8), dtype=bool)
    m[0, 2:6, 2:6] = True
    out = mask_outline(m)
    assert out.sum() == 12  # 4x4 square: 16 pixels, 4 interior
    assert not out[0, 3:5, 3:5].any() and out[0, 2, 2:6].all()
    full = mask_outline(np.ones((6, 6), dtype=bool))
    assert full.sum() == 20  # image border counts as boundary


def test_sheet_geometry_and_tile_placement() -> None:
    imgs = _images()
    sheet = contact_sheet(imgs, None, ncol=3, pad=2)
    assert sheet.shape == (2 * (8 + 2) + 2, 3 * (10 + 2) + 2, 3) and sheet.dtype == np.uint8
    assert np.array_equal(sheet[2:10, 2:12], imgs[0])
    assert np.array_equal(sheet[12:20, 14:24], imgs[4])
    assert (sheet[12:20, 26:36] == 255).all()  # empty sixth cell is background
    big = contact_sheet(imgs, None, ncol=5, pad=0, scale=2)
    assert big.shape == (16, 100, 3)
    assert np.array_equal(big[::2, ::2][:, :10], imgs[0])


def test_outlines_drawn_only_on_mask_boundary() -> None:
    imgs = _images(2)
    masks = np.zeros((2, 8, 10), dtype=bool)
    masks[1, 2:7, 3:8] = True
    sheet = contact_sheet(imgs, masks, ncol=2, pad=1)
    green = (sheet == np.array(OUTLINE_RGB, dtype=np.uint8)).all(-1)
    tile1 = green[1:9, 12:22]
    assert np.array_equal(tile1, mask_outline(masks[1]))
    assert not green[1:9, 1:11].any()  # no mask, no outline
    assert np.array_equal(sheet[1:9, 12:22][~tile1], imgs[1][~tile1])
    scaled = contact_sheet(imgs, masks, ncol=2, pad=0, scale=3)
    g3 = (scaled == np.array(OUTLINE_RGB, dtype=np.uint8)).all(-1)
    assert g3.sum() == mask_outline(masks[1].repeat(3, 0).repeat(3, 1)).sum()


def test_labels_are_drawn() -> None:
    imgs = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    plain = contact_sheet(imgs, None, ncol=2)
    labelled = contact_sheet(imgs, None, ncol=2, labels=["tumor", ""])
    assert not np.array_equal(plain[2:18, 2:34], labelled[2:18, 2:34])
    assert np.array_equal(plain[:, 36:], labelled[:, 36:])  # empty label: tile untouched


@pytest.mark.parametrize("bad", [
    {"images": np.zeros((2, 8, 8, 3), dtype=np.float32)},
    {"images": np.zeros((2, 8, 8), dtype=np.uint8)},
    {"images": np.zeros((2, 8, 8, 3), dtype=np.uint8), "masks": np.zeros((2, 4, 4), bool)},
    {"images": np.zeros((2, 8, 8, 3), dtype=np.uint8), "labels": ["a"]},
    {"images": np.zeros((2, 8, 8, 3), dtype=np.uint8), "ncol": 0},
])
def test_bad_inputs_raise_data_error(bad: dict) -> None:
    with pytest.raises(DataError, match="contact sheet"):
        contact_sheet(**bad)


def test_save_contact_sheet_png(tmp_path: Path) -> None:
    imgs = _images(3)
    masks = np.zeros((3, 8, 10), dtype=bool)
    masks[0, 1:4, 1:4] = True
    path = save_contact_sheet(tmp_path / "sub" / "sheet.png", imgs, masks, ncol=2)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert np.array_equal(np.asarray(Image.open(path)), contact_sheet(imgs, masks, ncol=2))
