"""Figures are written as non-empty PNGs of sensible size; bad input is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.errors import DataError
from gen_ad.report.figures import box_plot, image_grid, pr_figure, roc_figure, score_histogram


def _check_png(path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_curves_histogram_box(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(30)]
    res = {"knn": (rng.normal(size=80) + y, y), "fanogan": (torch.rand(80), torch.tensor(y))}
    _check_png(roc_figure(res, tmp_path / "roc.png"))
    _check_png(pr_figure(res, tmp_path / "pr.png"))
    _check_png(score_histogram(res["knn"][0], y, tmp_path / "h.png", threshold=1.0))
    _check_png(score_histogram(rng.normal(size=20), np.zeros(20), tmp_path / "h0.png"))
    _check_png(box_plot({"control": [1.0, 2.0, 3.0], "treated": [5.0, 6.0]}, tmp_path / "b.png"))
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(DataError):
        roc_figure({"x": (np.zeros(3), np.zeros(3))}, tmp_path / "bad.png")
    with pytest.raises(DataError):
        box_plot({"a": []}, tmp_path / "bad.png")


def test_image_grid_rows(tmp_path) -> None:
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    w3, h3 = _check_png(image_grid(x, tmp_path / "g3.png", recon=x.flip(-1),
                                   maps=torch.rand(4, 16, 16), col_titles=list("abcd")))
    w1, h1 = _check_png(image_grid(x, tmp_path / "g1.png"))
    assert h3 > 2 * h1 and abs(w3 - w1) < 0.3 * w1  # three rows vs one
    with pytest.raises(DataError):
        image_grid(x, tmp_path / "bad.png", maps=torch.rand(3, 16, 16))
