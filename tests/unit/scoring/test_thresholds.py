"""Label-free thresholds on known arrays, save/load round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.thresholds import Threshold, calibrate, fpr_threshold, iqr_threshold


def test_iqr_threshold_known_array() -> None:
    # 1..9: Q1 = 3, Q3 = 7 (linear percentiles), IQR = 4 -> 7 + 6 = 13
    assert iqr_threshold(np.arange(1, 10)) == pytest.approx(13.0)
    assert iqr_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(3.25 + 1.5 * 1.5)


def test_fpr_threshold_leaves_fraction_above() -> None:
    s = np.arange(101, dtype=float)  # 0..100
    assert fpr_threshold(s, 0.05) == pytest.approx(95.0)
    rng = np.random.default_rng(0)
    r = rng.normal(size=10_000)
    t = fpr_threshold(r, 0.1)
    assert (r > t).mean() == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ConfigError, match="fpr"):
        fpr_threshold(s, 1.5)


def test_calibrate_and_round_trip(tmp_path) -> None:
    s = np.arange(1, 10)
    t = calibrate(s)
    assert (t.value, t.method, t.n) == (13.0, "iqr", 9)
    f = calibrate(np.arange(101), method="fpr", fpr=0.05)
    assert f.value == pytest.approx(95.0) and f.params == {"fpr": 0.05}
    f.save(tmp_path / "thr.json")
    assert json.loads((tmp_path / "thr.json").read_text())["method"] == "fpr"
    assert Threshold.load(tmp_path / "thr.json") == f
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    assert f.apply(np.array([94.0, 96.0])).tolist() == [False, True]


def test_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="empty"):
        iqr_threshold([])
    with pytest.raises(DataError, match="NaN"):
        calibrate([1.0, float("nan")])
    with pytest.raises(ConfigError, match="unknown threshold method"):
        calibrate([1.0, 2.0], method="otsu")
    with pytest.raises(DataError, match="not found"):
        Threshold.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        Threshold.load(tmp_path / "bad.json")
    (tmp_path / "novalue.json").write_text('{"method": "iqr"}')
    with pytest.raises(DataError, match="'value'"):
        Threshold.load(tmp_path / "novalue.json")
