"""The label-free pixel operating point in ``gen-ad benchmark`` and ``gen-ad score``: a map
threshold set on the normal validation images' maps (numpy's 1 - fpr quantile), Dice and pixel
rates at it on the test set, in metrics.json, results.json, report.html and the summary lines;
n/a with a reason where no normal maps were scored; older records still read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen_ad.app.benchmark import BenchmarkConfig, PreparedMethod, benchmark_methods
from gen_ad.app.evaluate import LoadedScorer, scoring_dataset
from gen_ad.config import from_dict
from gen_ad.data.folders import PatchFolder
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

NAME = "blur-recon"


class BlurScorer(AnomalyScorer):
    """Reconstruction = 5x5 box blur; map = squared residual; score = mean of the map."""

    name = "blur"

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        for _ in normal_batches:
            pass
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        recon = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        maps = ((x - recon) ** 2).mean(dim=1)
        return ScoreBatch(scores=maps.mean(dim=(1, 2)), maps=maps, recon=recon)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gen_ad.data.synthetic import write_folder

    root = tmp_path_factory.mktemp("pixel_op")
    write_folder(root / "val", 12, 32, 1, 0.0)
    write_folder(root / "test", 16, 32, 2, 0.5)
    masks = root / "test_masks" / "anomalous"
    masks.mkdir(parents=True)
    for p in (root / "test" / "masks").glob("*.png"):
        os.link(p, masks / p.name)
    return {"val": root / "val", "test": root / "test", "masks": root / "test_masks"}


def _maps(ds: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Blur maps (float32, as stored), masks and labels of a whole dataset, scored directly."""
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        maps = BlurScorer().score(torch.stack([it["image"] for it in items])).maps
    masks = np.stack([it["mask"].numpy() > 0.5 for it in items]) if "mask" in items[0] else None
    return maps.numpy().astype(np.float32), masks, np.array([it["label"] for it in items])


def _direct_dice(maps: np.ndarray, masks: np.ndarray, t: float) -> float:
    p = maps.astype(np.float64) > t
    return 2.0 * float((p & masks).sum()) / float(p.sum() + masks.sum())


def _check_operating_point(metrics: dict[str, Any], split: dict[str, Path], fpr: float,
                           test_masks: Path) -> None:
    """The threshold is numpy's 1 - fpr quantile of every pixel of the 12 normal validation
    maps (scored here directly: rel 1e-6, the engine scored them in other batches) and Dice at
    it equals numpy on the test maps and masks (abs 1e-9)."""
    rec = metrics["pixel_threshold"]
    val_maps, _, _ = _maps(PatchFolder(root=str(split["val"]), size=32, classes=["normal"]))
    assert rec["status"] == "ok" and rec["rule"] == "fpr" and rec["fpr"] == fpr
    assert rec["n_images"] == 12 and rec["n_pixels"] == 12 * 32 * 32
    want = float(np.quantile(val_maps.astype(np.float64), 1.0 - fpr))
    assert rec["value"] == pytest.approx(want, rel=1e-6)
    maps, masks, labels = _maps(scoring_dataset(split["test"], 32, masks=test_masks))
    assert masks is not None and masks.any()
    at = metrics["pixel"]["at_pixel_threshold"]
    assert at["threshold"] == rec["value"]
    assert at["dice"] == pytest.approx(_direct_dice(maps, masks, rec["value"]), abs=1e-9)
    p = maps.astype(np.float64) > rec["value"]
    assert at["recall"] == pytest.approx((p & masks).sum() / masks.sum(), abs=1e-9)
    assert at["fpr_normal_images"] == pytest.approx(p[labels == 0].mean(), abs=1e-9)
    assert at["n_anomalous_images"] == int(masks.any(axis=(1, 2)).sum())
    assert metrics["pixel"]["best_dice"] >= at["dice"]  # best Dice is the upper bound


def _cfg(split: dict[str, Path], out: Path, **extra: Any) -> BenchmarkConfig:
    return from_dict(BenchmarkConfig, {
        "out": str(out), "data": {"test": str(split["test"]), "val": str(split["val"]),
                                  "masks": str(split["masks"]), "size": 32},
        "methods": [{"knn": {"extractor": "colour-stats", "k": 3, "bank": str(split["val"])}}],
        "n_boot": 20, "device": "cpu", "examples": 0, "fid": {"enabled": False},
        "shortcut": {"colour_baseline": False, "stain_shift": False}, **extra})


def _blur(split: dict[str, Path]) -> PreparedMethod:
    return PreparedMethod(NAME, "generative", "box-blur reconstruction (test)", [], BlurScorer(),
                          32, str(split["val"]), None, 8)


def test_benchmark_reports_dice_at_the_label_free_pixel_threshold(
        split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen_ad.app.benchmark import summary_lines
    from gen_ad.utils.identity import settings_digest

    out = tmp_path / "bench"
    results = benchmark_methods(_cfg(split, out), [_blur(split)], "cpu", progress=False,
                                reuse=True)
    data = json.loads((out / "results.json").read_text())
    m = data["methods"][0]["metrics"]
    _check_operating_point(m, split, 0.01, split["masks"])
    saved = json.loads((out / "methods" / NAME / "metrics.json").read_text())
    assert saved["pixel_threshold"] == m["pixel_threshold"]
    assert saved["pixel"]["at_pixel_threshold"] == m["pixel"]["at_pixel_threshold"]
    assert data["config"]["pixel_fpr"] == 0.01
    html = (out / "report.html").read_text()
    dice = m["pixel"]["at_pixel_threshold"]["dice"]
    assert "Dice @ 1% pixel FPR (label-free) / best Dice (uses the labels: upper bound)" in html
    assert f"{dice:.3f}<br><span class='note'>precision" in html
    assert f"best {m['pixel']['best_dice']:.3f}" in html
    assert f"pixel: {m['pixel_threshold']['value']:.4g} (1% pixel FPR: the 0.99 quantile of " \
           "12,288 map pixels of 12 normal val images)" in html
    line = summary_lines(results)[0]
    assert f"Dice @ 1% pixel FPR (label-free) {dice:.3f} at map > " in line
    assert f"(best Dice {m['pixel']['best_dice']:.3f}: an upper bound, uses the labels)" in line

    # a record without the new fields (as an older gen_ad wrote), same settings: reused, n/a
    record = out / "methods" / NAME / "method.json"
    rec = json.loads(record.read_text())
    del rec["metrics"]["pixel_threshold"], rec["metrics"]["pixel"]["at_pixel_threshold"]
    record.write_text(json.dumps(rec))
    capsys.readouterr()
    again = benchmark_methods(_cfg(split, out), [_blur(split)], "cpu", progress=False,
                              reuse=True)
    assert "reused" in capsys.readouterr().err
    assert "pixel_threshold" not in again["methods"][0]["metrics"]
    assert "n/a (not recorded: computed by an older gen_ad)" in (out / "report.html").read_text()
    assert "Dice @ pixel FPR: n/a (not recorded)" in summary_lines(again)[0]

    # settings without the pixel FPR (an older gen_ad's): computed again, naming it
    rec["settings"].pop("pixel_threshold")
    rec["settings"], rec["settings_sha256"] = settings_digest(rec["settings"])
    record.write_text(json.dumps(rec))
    third = benchmark_methods(_cfg(split, out), [_blur(split)], "cpu", progress=False,
                              reuse=True)
    assert "computing again (it was computed with other settings (pixel_threshold))" in \
        capsys.readouterr().err
    assert third["methods"][0]["metrics"]["pixel_threshold"] == m["pixel_threshold"]

    # another pixel FPR is another setting: computed again at 5 %
    fourth = benchmark_methods(_cfg(split, out, pixel_fpr=0.05), [_blur(split)], "cpu",
                               progress=False, reuse=True)
    assert "other settings (pixel_threshold)" in capsys.readouterr().err
    _check_operating_point(fourth["methods"][0]["metrics"], split, 0.05, split["masks"])
    assert "Dice @ 5% pixel FPR (label-free)" in (out / "report.html").read_text()


def test_pixel_fpr_is_validated() -> None:
    from gen_ad.errors import ConfigError

    base = {"data": {"test": "t", "val": "v"}, "methods": [{"knn": {"bank": "b"}}]}
    assert from_dict(BenchmarkConfig, base).pixel_fpr == 0.01
    assert from_dict(BenchmarkConfig, {**base, "pixel_fpr": 0.05}).pixel_fpr == 0.05
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match=r"pixel_fpr.*must be in \(0, 1\)"):
            from_dict(BenchmarkConfig, {**base, "pixel_fpr": bad})


def test_leave_one_out_calibration_has_no_pixel_threshold() -> None:
    """A scorer whose threshold comes from held-out fit scores scores no normal maps: n/a."""
    from gen_ad.app.evaluate import calibrate_scorer
    from gen_ad.metrics.pixel_threshold import NormalPixels

    class HeldOut(BlurScorer):
        def fit_scores(self) -> np.ndarray:
            return np.array([0.1, 0.2, 0.3])

    pixels = NormalPixels(0.01)
    images = [{"image": torch.zeros(3, 8, 8), "label": 0, "path": "x", "cls": "normal"}] * 2
    calibrate_scorer(HeldOut(), images, pixels=pixels)  # type: ignore[arg-type]
    rec = pixels.result()
    assert rec["status"] == "n/a" and "leave-one-out" in rec["reason"]


def test_score_command_prints_and_records_the_operating_point(
        split: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``gen-ad score`` (its scorer a blur, the run faked): with --normal the threshold is set,
    saved with the run and printed beside the best Dice; without --normal the saved one is
    reused at the same FPR; at another FPR it is n/a with the reason."""
    import gen_ad.app.score as app_score
    from gen_ad.cli import main

    run = tmp_path / "run"
    run.mkdir()
    fake = SimpleNamespace(step=1, cfg=SimpleNamespace(data=SimpleNamespace(val=None)))

    def scorers(*args: Any, **kwargs: Any) -> dict[str, LoadedScorer]:
        return {"blur": LoadedScorer(BlurScorer(), 32, "blur", run=fake)}  # type: ignore[arg-type]

    monkeypatch.setattr(app_score, "run_scorers", scorers)
    args = ["score", str(run), "--data", str(split["test"]), "--examples", "0", "--n-boot", "20"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "s1"), "--normal", str(split["val"])]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "s1" / "blur" / "metrics.json").read_text())
    _check_operating_point(m, split, 0.01, split["test"] / "masks")
    dice = m["pixel"]["at_pixel_threshold"]["dice"]
    assert f"Dice @ 1% pixel FPR (label-free) {dice:.3f} at map > " in printed
    saved = json.loads((run / "thresholds" / "blur.json").read_text())
    assert saved["context"]["pixel_threshold"] == m["pixel_threshold"]

    assert main([*args, "--out", str(tmp_path / "s2")]) == 0  # the saved threshold, reused
    m2 = json.loads((tmp_path / "s2" / "blur" / "metrics.json").read_text())
    assert m2["pixel_threshold"]["value"] == m["pixel_threshold"]["value"]
    assert m2["pixel_threshold"]["saved_with"] == str(run / "thresholds" / "blur.json")
    assert m2["pixel"]["at_pixel_threshold"] == m["pixel"]["at_pixel_threshold"]

    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "s3"), "--pixel-fpr", "0.05"]) == 0
    m3 = json.loads((tmp_path / "s3" / "blur" / "metrics.json").read_text())
    assert m3["pixel_threshold"]["status"] == "n/a"
    assert "at_pixel_threshold" not in m3["pixel"]
    assert m3["pixel_threshold"]["reason"].endswith("pass --normal DIR")
    assert "Dice @ 5% pixel FPR (label-free): n/a (no normal images were scored" in \
        capsys.readouterr().out
    assert m3["auroc"] == m2["auroc"] and m3["at_threshold"] == m2["at_threshold"]  # unchanged

    with pytest.raises(SystemExit):  # argparse usage error
        main([*args, "--out", str(tmp_path / "s4"), "--pixel-fpr", "0"])
