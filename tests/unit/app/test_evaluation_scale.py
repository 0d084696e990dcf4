"""Large scored sets in bounded memory: maps stream into a store (spilled to a temporary file),
pixel metrics of a large set are streamed in chunks, the benchmark drops each method's maps."""

from __future__ import annotations

import inspect
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from gen_ad.app import evaluate as ev
from gen_ad.metrics import localisation as loc
from gen_ad.metrics.localisation import pixel_metrics
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

SIZE, BATCH = 32, 8


class _Tiles(Dataset):
    """``n`` seeded images with a square anomaly (and its mask) in every fourth."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, SIZE, SIZE, generator=g) * 0.4 - 0.2
        mask = torch.zeros(SIZE, SIZE)
        if i % 4 == 0:
            r, c = 2 + i % 5, 8 + i % 9
            img[:, c - r:c + r, c - r:c + r] += 0.8
            mask[c - r:c + r, c - r:c + r] = 1.0
        return {"image": img, "label": int(i % 4 == 0), "path": f"t/{i:05d}.png",
                "cls": "tumor" if i % 4 == 0 else "normal", "mask": mask}


class _NumpyMaps(AnomalyScorer):
    """Residual maps allocated by numpy (so tracemalloc sees every live map batch)."""

    name = "numpy-maps"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        recon = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
        maps = np.array((x - recon).abs().mean(1).numpy(), dtype=np.float32)  # numpy-owned
        m = torch.from_numpy(maps)
        return ScoreBatch(m.flatten(1).amax(1), m)


def _spill_kwargs(tmp_path: Path) -> dict[str, Any]:
    """Spill every map to a file where the engine can (older engines kept them in a list)."""
    params = inspect.signature(ev.score_dataset).parameters
    return {"memory_bytes": 0, "spill_dir": tmp_path} if "memory_bytes" in params else {}


def test_scoring_keeps_at_most_a_few_batches_of_maps_in_memory(tmp_path: Path) -> None:
    n = 1024
    ds, kw = _Tiles(n), _spill_kwargs(tmp_path)
    tracemalloc.start()
    try:
        scored = ev.score_dataset(_NumpyMaps(), ds, batch_size=BATCH, progress=False, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    batch_bytes = BATCH * SIZE * SIZE * 4
    assert peak < 10 * batch_bytes, f"peak {peak} B while scoring; one batch of maps is " \
                                   f"{batch_bytes} B, all {n} maps {n * SIZE * SIZE * 4} B"
    assert scored.maps is not None and scored.masks is not None
    assert scored.maps.spilled and scored.masks.spilled and len(scored.maps) == n
    # the spilled maps are the scorer's maps, and the metrics equal those of in-memory arrays
    direct = _NumpyMaps().score(torch.stack([ds[i]["image"] for i in range(n)]))
    np.testing.assert_array_equal(np.asarray(scored.maps), direct.maps.numpy())
    np.testing.assert_array_equal(scored.maps[37], direct.maps[37].numpy())
    masks = np.stack([ds[i]["mask"].numpy() > 0.5 for i in range(n)])
    np.testing.assert_array_equal(np.asarray(scored.masks), masks)
    assert ev.detection_metrics(scored, n_boot=20)["pixel"] == pixel_metrics(
        direct.maps, masks, n_boot=20)
    written = ev.write_examples(tmp_path / "out", scored, ds, n=2)
    assert len(written) == 4 and all(p.is_file() for p in written)
    scored.drop_maps()
    assert scored.maps is None and scored.masks is None


def _maps_and_masks(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 3):
        r, c = 1 + i % 7, 3 + i % (size - 16)
        masks[i, c:c + r, c:c + 2 * r] = True
    maps = rng.gamma(2.0, 0.1, masks.shape) + 0.3 * masks * rng.random(masks.shape)
    return maps.astype(np.float32), masks


def test_streamed_pixel_metrics_equal_the_exact_ones() -> None:
    """The streamed path (histogram point estimates, bin-edge bootstrap grid) agrees with the
    exact one: points within 1e-3 (and within the reported AUROC bound), CIs within 0.01."""
    maps, masks = _maps_and_masks(300, 32)
    exact = pixel_metrics(maps, masks, map_threshold=0.4, n_boot=300, seed=3, exact=True)
    streamed = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks),
                             map_threshold=0.4, n_boot=300, seed=3, exact=False)
    for key in ("auroc", "aupr", "aupro", "best_dice", "best_dice_threshold"):
        assert streamed[key] == pytest.approx(exact[key], abs=1e-3), key
    approx = streamed["approximation"]
    assert abs(streamed["auroc"] - exact["auroc"]) <= approx["auroc_max_error"] + 1e-12
    assert approx["relative_bin_width"] == 2.0 ** -12
    for key in ("n_pixels", "n_anomalous_pixels", "n_regions", "dice", "aupro_fpr_limit"):
        assert streamed[key] == exact[key], key
    for key in ("auroc", "aupr", "aupro"):
        assert streamed["ci"][key] == pytest.approx(exact["ci"][key], abs=0.01), key
    assert streamed["ci"]["n_valid"] == 300 and streamed["ci"]["thresholds"] <= 1024
    # the default picks the exact path for a small set: the results of earlier versions
    assert "approximation" not in pixel_metrics(maps, masks, n_boot=0)


def test_streamed_pixel_metrics_edge_cases() -> None:
    maps, masks = _maps_and_masks(30, 32)
    none = pixel_metrics(maps, np.zeros_like(masks), n_boot=10, exact=False)
    assert none["auroc"] is None and none["n_anomalous_pixels"] == 0
    perfect = pixel_metrics(masks.astype(np.float32), masks, n_boot=10, exact=False)
    assert perfect["auroc"] == 1.0 and perfect["aupro"] == pytest.approx(1.0)
    signed = pixel_metrics(maps - 0.2, masks, exact=False)  # negative values order correctly
    assert signed["auroc"] == pytest.approx(pixel_metrics(maps, masks)["auroc"], abs=1e-3)
    with pytest.raises(Exception, match="NaN or infinite"):
        pixel_metrics(np.where(masks, np.nan, maps), masks, exact=False)


def test_pixel_metrics_of_a_large_set_never_pool_its_pixels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A set above the exact limit is read in chunks: the traced peak stays below one float64
    copy of all its pixels (the pooled path holds several, a sort order and region weights)."""
    maps, masks = _maps_and_masks(400, 64, seed=1)
    monkeypatch.setattr(loc, "EXACT_PIXELS", 2**16, raising=False)
    monkeypatch.setattr(loc, "_STREAM_PIXELS", 2**14, raising=False)
    tm, tg = torch.from_numpy(maps), torch.from_numpy(masks)  # not traced by tracemalloc
    tracemalloc.start()
    try:
        out = pixel_metrics(tm, tg, n_boot=20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * maps.size, f"peak {peak} B for {maps.size} pixels"
    assert out["auroc"] == pytest.approx(pixel_metrics(maps, masks, exact=True)["auroc"],
                                         abs=1e-3)


def test_benchmark_drops_each_methods_maps_once_measured(tmp_path: Path) -> None:
    from gen_ad.app.benchmark import BenchmarkConfig, PreparedMethod, SplitCache, evaluate_method
    from gen_ad.config import from_dict
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "val", 12, 32, 1, 0.0)
    write_folder(tmp_path / "test", 16, 32, 2, 0.5)
    cfg = from_dict(BenchmarkConfig, {
        "out": str(tmp_path / "out"), "methods": [{"knn": {"extractor": "colour-stats",
                                                          "k": 2, "bank": "unused"}}],
        "data": {"test": str(tmp_path / "test"), "val": str(tmp_path / "val"),
                 "classes": ["normal", "anomalous"], "size": 32},
        "n_boot": 20, "device": "cpu", "examples": 2, "fid": {"enabled": False}})
    pm = PreparedMethod("maps", "generative", "numpy maps (test)", [], _NumpyMaps(), 32,
                        str(tmp_path / "val"), None, 8)
    o = evaluate_method(pm, SplitCache(cfg.data), cfg, "cpu")
    assert o.scored.maps is None and o.scored.masks is None  # freed, not held for every method
    assert o.has_maps and "pixel" in o.metrics and o.examples is not None


def test_evaluation_bench_smoke_prints_one_json_line(run_bench: Any) -> None:
    rec = run_bench("evaluation.py")
    assert rec["bench"] == "evaluation" and [r["n"] for r in rec["rows"]] == [64, 256]
    assert rec["ours"]["peak_increase_mib"] >= 0 and rec["ratio"] > 0
    for row in rec["rows"]:  # both variants measure the same pixels
        assert row["ours"]["pixel_auroc"] == pytest.approx(row["in_memory_exact"]["pixel_auroc"])
    assert "commit" in rec["hardware"]
