"""Tissue mask: Otsu on saturation, dark-ink exclusion, small objects and holes."""

from __future__ import annotations

import numpy as np

from gen_ad.data.tissue import otsu_threshold, remove_small_objects, saturation, tissue_mask


def _scene(size: int = 200) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 242, np.float64) + rng.normal(0, 2, (size, size, 3))
    blob = (yy - 100) ** 2 + (xx - 90) ** 2 < 60 ** 2
    small_hole = (yy - 80) ** 2 + (xx - 70) ** 2 < 2 ** 2
    big_hole = (yy - 110) ** 2 + (xx - 100) ** 2 < 15 ** 2
    speck = (yy - 20) ** 2 + (xx - 180) ** 2 < 1
    pen = (np.abs(xx - 185) < 3) & (yy > 60)
    tissue = blob & ~small_hole & ~big_hole
    pink = np.array([200, 110, 170]) + rng.normal(0, 12, (size, size, 3))
    img[tissue | speck] = pink[tissue | speck]
    img[pen] = 15
    hole_core = (yy - 110) ** 2 + (xx - 100) ** 2 < 12 ** 2
    parts = {"blob": blob, "small_hole": small_hole, "big_hole": big_hole, "speck": speck,
             "pen": pen, "hole_core": hole_core}
    return np.clip(img, 0, 255).astype(np.uint8), parts


def test_otsu_separates_two_modes() -> None:
    v = np.concatenate([np.full(100, 20.0), np.full(300, 120.0)])
    t = otsu_threshold(v)
    assert 20 < t <= 120
    assert otsu_threshold(np.full(10, 7.0)) == 0.0


def test_saturation_values() -> None:
    px = np.array([[[255, 0, 0], [100, 100, 100], [0, 0, 0], [200, 100, 100]]], np.uint8)
    np.testing.assert_allclose(saturation(px)[0], [255, 0, 0, 127.5])


def test_remove_small_objects() -> None:
    m = np.zeros((10, 10), bool)
    m[0:2, 0:2] = True
    m[5:9, 5:9] = True
    out = remove_small_objects(m, 5)
    assert not out[0:2, 0:2].any() and out[5:9, 5:9].all()


def test_mask_on_synthetic_slide() -> None:
    img, p = _scene()
    mask = tissue_mask(img)
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    want = p["blob"] & ~p["big_hole"]
    iou = (mask & want).sum() / (mask | want).sum()
    assert iou > 0.95
    assert mask[p["small_hole"]].all()  # small hole filled
    assert not mask[p["hole_core"]].any()  # lumen-sized hole kept as background
    assert not mask[p["pen"]].any() and not mask[p["speck"]].any()


def test_blank_slide_is_empty() -> None:
    rng = np.random.default_rng(1)
    blank = np.clip(240 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(blank).any()
