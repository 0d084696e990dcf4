"""``gen-ad benchmark`` calibrates a KNN whose bank shares images with ``data.val`` without
letting an image be its own neighbour: the bank's leave-one-out scores when ``data.val`` is the
bank, the non-shared images only on a partial overlap (counted and warned about)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gen_ad.app.benchmark import BenchmarkConfig, benchmark_methods, prepare_methods
from gen_ad.app.evaluate import knn_scorer, normal_dataset, score_dataset
from gen_ad.config import from_dict
from gen_ad.data.synthetic import write_folder
from gen_ad.scoring.thresholds import calibrate

K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_cal")
    write_folder(root / "val", 14, 32, 1, 0.0)
    write_folder(root / "test", 12, 32, 2, 0.5)
    write_folder(root / "other", 6, 32, 3, 0.0)
    mixed = root / "mixed" / "normal"  # the bank: 5 of the val files (links) + 6 others
    mixed.mkdir(parents=True)
    for p in sorted((root / "val" / "normal").glob("*.png"))[:5]:
        os.symlink(p, mixed / f"v{p.name}")
    for p in sorted((root / "other" / "normal").glob("*.png")):
        os.symlink(p, mixed / f"o{p.name}")
    return root


def _run(data: Path, bank: Path, out: Path) -> dict[str, Any]:
    cfg = from_dict(BenchmarkConfig, {
        "out": str(out), "n_boot": 20, "device": "cpu", "examples": 0, "fid": {"enabled": False},
        "shortcut": {"colour_baseline": False, "stain_shift": False},
        "data": {"test": str(data / "test"), "val": str(data / "val"), "size": 32,
                 "classes": ["normal", "anomalous"]},
        "methods": [{"name": "knn", "knn": {"extractor": "colour-stats", "k": K,
                                            "bank": str(bank)}}]})
    return benchmark_methods(cfg, prepare_methods(cfg, "cpu"), "cpu", progress=False)


def _fitted(bank: Path) -> Any:
    sc = knn_scorer("colour-stats", k=K).scorer
    sc.fit(b["image"] for b in _loader(normal_dataset(bank, 32)))
    return sc


def _loader(ds: Any) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=32)


def test_bank_is_the_threshold_set_uses_leave_one_out_scores(data: Path, tmp_path: Path) -> None:
    """knn.bank = data.val: the threshold is the bank's leave-one-out one (as calibrate_scorer
    gives), not the one of val images re-scored against a bank that holds them."""
    res = _run(data, data / "val", tmp_path / "out")
    m = res["methods"][0]
    sc = _fitted(data / "val")
    loo = calibrate(sc.fit_scores(), method="iqr")
    self_match = calibrate(score_dataset(sc, normal_dataset(data / "val", 32)).scores)
    assert self_match.value < loo.value  # re-scored, each image is its own neighbour
    assert m["threshold"]["value"] == pytest.approx(loo.value, rel=1e-6)
    assert m["metrics"]["overlap_fit_val"] == 14
    assert m["metrics"]["threshold_scores"] == "fit_leave_one_out"
    assert m["n_val"] == 14 and not res["warnings"]


def test_partial_overlap_leaves_the_shared_images_out(data: Path, tmp_path: Path) -> None:
    """A bank holding 5 of the 14 val files: the threshold comes from the 9 others, and the
    count is recorded and warned about."""
    res = _run(data, data / "mixed", tmp_path / "out")
    m = res["methods"][0]
    sc = _fitted(data / "mixed")
    val = score_dataset(sc, normal_dataset(data / "val", 32))
    shared = {p.name for p in (data / "val" / "normal").glob("*.png")
              if (data / "mixed" / "normal" / f"v{p.name}").exists()}
    kept = np.array([s for p, s in zip(val.paths, val.scores) if Path(p).name not in shared])
    assert len(kept) == 9
    assert m["threshold"]["value"] == pytest.approx(calibrate(kept).value, rel=1e-6)
    assert m["metrics"]["overlap_fit_val"] == 5 and m["n_val"] == 9
    assert m["metrics"]["threshold_scores"] == "val_without_fit"
    assert any("5 threshold (data.val) images are also in its bank" in w and "(9 used)" in w
               for w in res["warnings"])


def test_apart_bank_scores_the_threshold_set(data: Path, tmp_path: Path) -> None:
    res = _run(data, data / "other", tmp_path / "out")
    m = res["methods"][0]
    sc = _fitted(data / "other")
    val = score_dataset(sc, normal_dataset(data / "val", 32))
    assert m["threshold"]["value"] == pytest.approx(calibrate(val.scores).value, rel=1e-6)
    assert m["metrics"]["overlap_fit_val"] == 0 and m["metrics"]["threshold_scores"] == "val"
