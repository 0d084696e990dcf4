"""Detection metrics: equality with scikit-learn, bootstrap CIs, per-class, pixel metrics, Dice."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from gen_ad.errors import DataError
from gen_ad.metrics.detection import (
    auroc,
    average_precision,
    bootstrap_metrics,
    dice,
    evaluate_scores,
    per_class_auroc,
    pixel_metrics,
    threshold_metrics,
)
from gen_ad.scoring.thresholds import Threshold


@pytest.mark.parametrize("seed", range(8))
def test_auroc_aupr_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    scores = np.round(rng.normal(size=n) + rng.integers(0, 2, n), 1)  # many ties
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


def test_all_tied_and_perfect_and_tensor_input() -> None:
    y = np.array([0, 1, 0, 1, 1])
    assert auroc(np.zeros(5), y) == pytest.approx(0.5)
    assert average_precision(np.zeros(5), y) == pytest.approx(0.6)  # one tie group: P = 3/5
    s = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7])
    assert auroc(s, torch.tensor(y)) == 1.0
    assert average_precision(s, y) == 1.0
    assert auroc(-s, y) == 0.0


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(DataError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(DataError, match="differ in length"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(DataError, match="0 \\(normal\\) or 1"):
        auroc([0.1, 0.2], [0, 2])


def test_bootstrap_seeded_stratified_and_contains_estimate() -> None:
    rng = np.random.default_rng(0)
    s = np.r_[rng.normal(size=300), rng.normal(1.0, size=100)]
    y = np.r_[np.zeros(300), np.ones(100)]
    a = bootstrap_metrics(s, y, n_boot=300, seed=3)
    b = bootstrap_metrics(s, y, n_boot=300, seed=3)
    c = bootstrap_metrics(s, y, n_boot=300, seed=4)
    assert a == b and a["auroc"].low != c["auroc"].low
    for m in a.values():
        assert m.low < m.value < m.high and m.n_valid == m.n_boot == 300
    assert a["auroc"].value == pytest.approx(roc_auc_score(y, s))


def test_stratified_resamples_keep_the_class_sizes() -> None:
    """Each stratified resample draws 3 of the 3 positives and 9 of the 9 negatives (with
    replacement); a pooled resample of 12 items does not keep those counts."""
    from gen_ad.metrics.curves import resample_counts

    y = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    counts = resample_counts(np.random.default_rng(0), y, 50, True)
    assert counts.shape == (50, 12) and (counts >= 0).all()
    assert (counts[:, y].sum(1) == 3).all() and (counts[:, ~y].sum(1) == 9).all()
    assert len({tuple(r) for r in counts}) > 1  # they are resamples, not copies of the data
    pooled = resample_counts(np.random.default_rng(0), y, 50, False)
    assert (pooled.sum(1) == 12).all() and not (pooled[:, y].sum(1) == 3).all()
    # through the bootstrap: with 1 positive in 4, a pooled resample lacks it ~32 % of the
    # time (test below); stratified, every resample keeps it and counts as valid
    s, lab = np.array([0.9, 0.1, 0.2, 0.3]), np.array([1, 0, 0, 0])
    m = bootstrap_metrics(s, lab, n_boot=400, seed=0)["auroc"]
    assert m.n_valid == m.n_boot == 400 and m.low == m.high == 1.0


def test_unstratified_bootstrap_drops_single_class_resamples() -> None:
    s, y = np.array([0.9, 0.1, 0.2, 0.3]), np.array([1, 0, 0, 0])
    m = bootstrap_metrics(s, y, n_boot=400, seed=0, stratified=False)["auroc"]
    # P(no positive drawn) = (3/4)^4 ≈ 0.32, so about a third of the resamples are dropped
    assert 200 < m.n_valid < 330 and m.n_boot == 400
    assert m.low == m.high == 1.0


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=3000), rng.integers(0, 2, 3000)
    t = time.perf_counter()
    bootstrap_metrics(s, y, n_boot=2000, seed=0)
    assert time.perf_counter() - t < 5.0  # ~0.5 s measured on a shared 2-core machine


def test_ci_coverage_near_nominal() -> None:
    """200 simulated datasets (50 + 50 from N(0,1) / N(d,1)); true AUROC = Phi(d / sqrt 2).
    Uses 500 resamples per CI instead of 2000 to keep the test short."""
    d, n = 1.0, 50
    true = norm.cdf(d / np.sqrt(2.0))
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(n), np.ones(n)]
    hits = 0
    for i in range(200):
        s = np.r_[rng.normal(size=n), rng.normal(d, size=n)]
        m = bootstrap_metrics(s, y, n_boot=500, seed=i)["auroc"]
        hits += m.low <= true <= m.high
    assert 0.9 <= hits / 200 <= 0.99


def test_per_class_is_each_class_vs_all_normals() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=60)
    y = np.r_[np.zeros(30), np.ones(30)].astype(int)
    cls = ["normal"] * 30 + ["tumor"] * 10 + ["necrosis"] * 20
    out = per_class_auroc(s, y, cls, n_boot=50)
    assert list(out) == ["necrosis", "tumor"]
    keep = np.r_[np.ones(30, bool), np.ones(10, bool), np.zeros(20, bool)]
    assert out["tumor"]["n"] == 10
    assert out["tumor"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[keep], s[keep]))
    half = per_class_auroc(s, y, cls, n_boot=200, ci=0.5)["tumor"]["auroc"]  # ci reaches it
    wide = per_class_auroc(s, y, cls, n_boot=200, ci=0.95)["tumor"]["auroc"]
    assert wide["low"] < half["low"] <= half["high"] < wide["high"]


def test_threshold_metrics_hand_made() -> None:
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1])
    m = threshold_metrics(s, y, Threshold(value=0.5))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    none_called = threshold_metrics(s, y, 5.0)
    assert none_called["precision"] is None and none_called["specificity"] == 1.0
    with pytest.raises(DataError, match="differ in length"):
        threshold_metrics(s, y[:1], 0.5)


def test_dice_hand_made() -> None:
    a = np.zeros((1, 4, 4), bool)
    b = np.zeros((1, 4, 4), bool)
    a[0, :2, :2] = True  # 4 pixels
    b[0, 1:3, 1:3] = True  # 4 pixels, overlap 1
    assert dice(a, b) == pytest.approx(2 * 1 / 8)
    assert dice(a, a) == 1.0 and dice(a & False, b & False) == 1.0
    with pytest.raises(DataError):
        dice(a, b[0])


def test_pixel_metrics_equal_sklearn_and_best_dice() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 2:5, 2:5] = True
    masks[2, 0:2, :] = True
    maps = np.round(rng.random((3, 8, 8)) + 0.8 * masks, 2)
    out = pixel_metrics(torch.tensor(maps), torch.tensor(masks), map_threshold=0.9)
    assert out["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["aupr"] == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    brute = max(dice(maps >= t, masks) for t in np.unique(maps))
    assert out["best_dice"] == pytest.approx(brute)
    assert dice(maps >= out["best_dice_threshold"], masks) == pytest.approx(brute)
    assert out["dice"] == pytest.approx(dice(maps > 0.9, masks))
    perfect = pixel_metrics(masks.astype(float), masks)
    assert perfect["auroc"] == 1.0 and perfect["best_dice"] == 1.0


def test_evaluate_scores_is_json_ready() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    s = rng.normal(size=40) + y
    maps = rng.random((40, 4, 4))
    masks = np.zeros((40, 4, 4), bool)
    masks[20:, :2, :2] = True
    out = evaluate_scores(s, y, classes=["n"] * 20 + ["a"] * 10 + ["b"] * 10, threshold=0.5,
                          maps=maps, masks=masks, n_boot=100)
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["n"] == 40 and back["n_anomalous"] == 20
    assert set(back["per_class"]) == {"a", "b"}
    assert back["auroc"]["low"] <= back["auroc"]["value"] <= back["auroc"]["high"]
    assert back["pixel"]["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert back["at_threshold"]["threshold"] == 0.5
    with pytest.raises(DataError, match="both maps and masks"):
        evaluate_scores(s, y, maps=maps, n_boot=0)


def test_threshold_metrics_refuses_nan_scores_and_non_binary_labels() -> None:
    """Called directly (not through evaluate_scores), a NaN score counted as not flagged and a
    label of 2 or 0.5 as anomalous."""
    from gen_ad.metrics.detection import threshold_metrics

    with pytest.raises(DataError, match="NaN or infinite"):
        threshold_metrics([0.1, float("nan")], [0, 1], 0.5)
    with pytest.raises(DataError, match="0 \\(normal\\) or 1"):
        threshold_metrics([0.1, 0.9], [0, 2], 0.5)
    assert threshold_metrics([0.1, 0.9], [0, 0], 0.5)["specificity"] == 0.5  # one class is fine
