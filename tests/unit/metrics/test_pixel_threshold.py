"""The label-free pixel threshold: numpy's quantile of the normal pixels (streamed, exact) and the
test segmentation at it (a direct numpy computation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen_ad.errors import ConfigError
from gen_ad.metrics.localisation import pixel_metrics
from gen_ad.metrics.pixel_threshold import (
    NormalPixels,
    at_pixel_threshold,
    fpr_label,
    keep_count,
)
from gen_ad.scoring.store import MapStore


def _streamed(maps: np.ndarray, fpr: float, batch: int) -> dict:
    px = NormalPixels(fpr, source="unit")
    px.begin(len(maps))
    for i in range(0, len(maps), batch):
        px.add(torch.from_numpy(maps[i:i + batch]))
    return px.result()


@pytest.mark.parametrize("fpr", [0.01, 0.02, 0.05, 0.3, 1e-4])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_is_numpy_quantile_of_all_normal_pixels(fpr: float, ties: bool) -> None:
    """Bitwise numpy.quantile(all normal pixels as float64, 1 - fpr) (tolerance 0), fed in
    batches of 3 images while only the largest values are kept."""
    rng = np.random.default_rng(int(fpr * 1e4) + ties)
    maps = rng.gamma(2.0, 1.0, (11, 9, 7)).astype(np.float32)
    if ties:  # few distinct values: many exact ties around the quantile
        maps = np.round(maps, 1).astype(np.float32)
    rec = _streamed(maps, fpr, 3)
    want = float(np.quantile(maps.astype(np.float64), 1.0 - fpr))
    assert rec["status"] == "ok" and rec["value"] == want
    assert rec["n_pixels"] == maps.size and rec["n_images"] == 11
    assert rec["rule"] == "fpr" and rec["fpr"] == fpr and rec["source"] == "unit"
    # about a fraction fpr of the normal pixels lies above it (interpolated: at most one more)
    above = int((maps.astype(np.float64) > rec["value"]).sum())
    assert above <= int(np.ceil(fpr * (maps.size - 1))) + 1


def test_only_the_top_fraction_is_kept() -> None:
    """Memory: the kept buffer is the top fpr of the pixels (+3), not every normal pixel."""
    maps = np.random.default_rng(0).random((40, 16, 16), dtype=np.float32)
    px = NormalPixels(0.01)
    px.begin(40)
    for i in range(0, 40, 4):
        px.add(maps[i:i + 4])
        assert px._top.size <= keep_count(maps.size, 0.01) <= 0.01 * maps.size + 3
    assert px.result()["value"] == float(np.quantile(maps.astype(np.float64), 0.99))


def test_not_available_with_a_reason() -> None:
    assert NormalPixels(0.01).result() == {"status": "n/a", "rule": "fpr", "fpr": 0.01,
                                           "reason": "no normal images were scored"}
    px = NormalPixels(0.05)
    px.begin(2)
    px.add(None)
    assert px.result()["reason"] == "the method gave no anomaly maps for the normal images"
    px = NormalPixels(0.05)
    px.begin(1)
    px.add(np.array([[[0.0, np.nan]]], np.float32))
    assert px.result()["reason"] == "1 normal map values are NaN or infinite"
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
            NormalPixels(bad)
    assert fpr_label(0.01) == "1%" and fpr_label(0.05) == "5%" and fpr_label(0.025) == "2.5%"


def _direct(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, t: float) -> dict:
    p, g = maps.astype(np.float64) > t, masks
    tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
    per = [2.0 * (p[i] & g[i]).sum() / (p[i].sum() + g[i].sum()) for i in range(len(g))
           if g[i].any()]
    return {"dice": 2.0 * tp / (2 * tp + fp + fn), "precision": tp / (tp + fp),
            "recall": tp / (tp + fn), "fpr": fp / (~g).sum(),
            "fpr_normal_images": p[labels == 0].mean(), "dice_mean_anomalous_images":
            float(np.mean(per)), "n_anomalous_images": len(per)}


def test_test_metrics_equal_a_direct_numpy_computation(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Dice (pooled; mean per anomalous image), precision, recall and FPRs at the threshold
    equal numpy on the whole arrays (abs 1e-12), also read from a store spilled to a file in
    chunks of 3 images, and the pooled Dice equals pixel_metrics' fixed-threshold Dice."""
    import gen_ad.metrics.localisation as loc

    rng = np.random.default_rng(3)
    n, h, w = 10, 12, 12
    masks = np.zeros((n, h, w), bool)
    for i in range(0, n, 2):  # even images anomalous, a square each
        r, c = rng.integers(0, 8, 2)
        masks[i, r:r + 4, c:c + 4] = True
    labels = np.array([1 - i % 2 for i in range(n)])
    maps = (rng.random((n, h, w)) + 0.8 * masks).astype(np.float32)
    normal = np.stack([rng.random((h, w)) for _ in range(8)]).astype(np.float32)
    t = _streamed(normal, 0.05, 2)["value"]

    got = at_pixel_threshold(maps, masks, labels, t)
    want = _direct(maps, masks, labels, t)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["tp"] + got["fp"] + got["fn"] + got["tn"] == maps.size
    assert got["dice"] == pytest.approx(pixel_metrics(maps, masks, map_threshold=t)["dice"],
                                        abs=1e-12)

    stores = [MapStore(n, np.float32, memory_bytes=0, spill_dir=tmp_path),
              MapStore(n, np.bool_, memory_bytes=0, spill_dir=tmp_path)]
    for store, arr in zip(stores, (maps, masks)):
        store.append(arr)
    assert stores[0].spilled
    monkeypatch.setattr(loc, "_STREAM_PIXELS", 3 * h * w)  # chunks of 3 images
    assert at_pixel_threshold(*stores, labels, t) == got


def test_comparison_is_in_float64() -> None:
    """A threshold between two adjacent float32 values: a map at the upper one is above it
    (a float32 comparison would round the threshold up and miss it)."""
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2.0))
    t = (float(a) + float(b)) / 2 + 1e-12  # rounds to b in float32
    maps = np.array([[[b, a]]], np.float32)
    got = at_pixel_threshold(maps, np.array([[[True, False]]]), np.array([1]), t)
    assert got["tp"] == 1 and got["fp"] == 0 and got["dice"] == 1.0
