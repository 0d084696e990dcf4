"""Map morphology (erosion/dilation) and display helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import grey_dilation, grey_erosion

from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.maps import (
    dilate,
    erode,
    jet,
    normalize,
    overlay,
    save_map_png,
    to_uint8_images,
)


def test_erode_hand_made_and_equals_scipy() -> None:
    m = torch.zeros(2, 6, 6)
    m[0, 2, 2] = 1.0  # isolated pixel: removed
    m[0, 1:5, 1:5] += 0.5  # 4x4 block: only its 2x2 core survives
    out = erode(m, 3)
    expected = torch.zeros(6, 6)
    expected[2:4, 2:4] = 0.5
    assert torch.equal(out[0], expected)
    m[1] = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    for k in (3, 5):
        ref = np.stack([grey_erosion(a, size=(k, k)) for a in m.numpy()])
        assert np.allclose(erode(m, k).numpy(), ref)


def test_dilate_bool_mask() -> None:
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0, 2, 2] = True
    mask[1, 0, 4] = True
    out = dilate(mask, k=3)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert out[0].sum() == 9 and out[0, 1:4, 1:4].all()
    assert out[1].sum() == 4  # corner: 2x2 inside the image
    f = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(1))
    ref = np.stack([grey_dilation(a, size=(3, 3)) for a in f.numpy()])
    assert np.allclose(dilate(f, 3).numpy(), ref)
    with pytest.raises(ConfigError, match="odd"):
        dilate(mask, k=2)
    with pytest.raises(DataError):
        erode(torch.zeros(5, 5))


def test_normalize_and_jet() -> None:
    n = normalize(np.array([[2.0, 4.0], [6.0, 6.0]]))
    assert np.allclose(n, [[0.0, 0.5], [1.0, 1.0]])
    assert np.all(normalize(np.ones((2, 2))) == 0)
    assert np.allclose(normalize(np.array([0.0, 10.0]), 0.0, 5.0), [0.0, 1.0])
    c = jet(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0, 2] > 100 and c[0, 0] == 0  # low = blue
    assert c[2, 0] > 100 and c[2, 2] == 0  # high = red
    assert c[1, 1] == 255  # middle = green-ish


# map values whose jet colours are exact: 0.125 -> blue, 0.375 -> cyan, 0.625 -> yellow
# (channel c of jet(v) is clip(1.5 - |4 v - (3, 2, 1)[c]|, 0, 1), hand-evaluated)
_JET_EXACT = {0.125: (0, 0, 255), 0.375: (0, 255, 255), 0.625: (255, 255, 0)}


def test_overlay_blends_alpha_of_the_colour_map() -> None:
    """``overlay`` = round((1 - alpha) * image + alpha * jet(map)); with alpha 0.2 and colours
    of 0/255 no value falls on a .5 rounding tie."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    values = list(_JET_EXACT)
    m = np.array([[values[(i + j) % 3] for j in range(6)] for i in range(4)])
    m[3, 5] = np.nan
    colour = np.array([[_JET_EXACT.get(v, (0, 0, 0)) for v in row] for row in m], float)
    ref = np.round(0.8 * img.astype(float) + 0.2 * colour).astype(np.uint8)
    ref[3, 5] = img[3, 5]  # NaN keeps the image
    out = overlay(img, m, alpha=0.2)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(overlay(img, m, alpha=1.0)[0, 0], _JET_EXACT[m[0, 0]])


def test_save_map_png_writes_the_blend(tmp_path) -> None:
    """The PNG holds the image (``[-1,1]`` -> ``round((x + 1) * 127.5)``) blended with the map
    scaled by vmin/vmax."""
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (5, 7, 3))
    x = torch.from_numpy(u8 / 127.5 - 1.0).float().permute(2, 0, 1)  # [3,H,W] in [-1,1]
    raw = np.array([[(1, 3, 5)[(i * 7 + j) % 3] for j in range(7)] for i in range(5)], float)
    save_map_png(tmp_path / "o.png", torch.from_numpy(raw), image=x, alpha=0.2, vmin=0.0,
                 vmax=8.0)  # 1, 3, 5 of 8 -> 0.125, 0.375, 0.625
    colour = np.array([[_JET_EXACT[v / 8.0] for v in row] for row in raw], float)
    with Image.open(tmp_path / "o.png") as im:
        got = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(got, np.round(0.8 * u8 + 0.2 * colour).astype(np.uint8))
    save_map_png(tmp_path / "plain.png", torch.from_numpy(raw), vmin=0.0, vmax=8.0)
    with Image.open(tmp_path / "plain.png") as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), colour.astype(np.uint8))


def test_overlay_and_png(tmp_path) -> None:
    x = torch.zeros(1, 3, 8, 8)
    img = to_uint8_images(x)
    assert img.shape == (1, 8, 8, 3) and img.dtype == np.uint8 and img.max() == 128
    m = np.zeros((8, 8))
    m[0, 0] = np.nan
    o = overlay(img[0], m, alpha=0.5)
    assert o.shape == (8, 8, 3) and o.dtype == np.uint8
    assert (o[0, 0] == img[0, 0, 0]).all()  # NaN keeps the image
    assert not (o[1, 1] == img[0, 1, 1]).all()
    with pytest.raises(DataError):
        overlay(img[0].astype(np.float32), m)
    save_map_png(tmp_path / "m.png", torch.rand(8, 8), image=x[0])
    save_map_png(tmp_path / "plain.png", torch.rand(8, 8))
    for name in ("m.png", "plain.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (8, 8) and im.mode == "RGB"
