"""scripts/feature_probe_study.py: each input probe removes what it says and keeps the rest; the
study runs end to end on a PCam-shaped folder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]


def _module():
    spec = importlib.util.spec_from_file_location("feature_probe_study",
                                                  ROOT / "scripts" / "feature_probe_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["feature_probe_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_shuffled_keeps_every_colour_and_destroys_the_layout() -> None:
    study, x = _module(), _images()
    y = study.probe(x, "shuffled", seed=4)
    assert y.shape == x.shape
    # the same pixels (RGB triplets), in another order, per image
    px, py = x.flatten(2).transpose(1, 2), y.flatten(2).transpose(1, 2)  # [B, HW, 3]
    for a, b in zip(px, py, strict=True):
        assert torch.equal(a[torch.argsort(a[:, 0])], b[torch.argsort(b[:, 0])])
    assert (y != x).float().mean() > 0.9
    assert torch.equal(study.probe(x, "shuffled", seed=4), y)  # seeded


def test_gray_and_standardised_remove_what_they_say() -> None:
    study, x = _module(), _images()
    g = study.probe(x, "gray")
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(g[:, 0], expected)
    s = study.probe(x * 0.3 + 0.2, "standardised")  # another colour cast, same structure
    torch.testing.assert_close(s, study.probe(x, "standardised"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.mean(dim=(2, 3)), torch.zeros(3, 3), rtol=0, atol=1e-2)
    assert torch.equal(study.probe(x, "rgb"), x)
    with pytest.raises(ValueError, match="unknown probe"):
        study.probe(x, "hsv")


def _pcam_like(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for split, cls, tint in (("train", "normal", 0), ("test", "normal", 0), ("test", "tumor", 80)):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 150, (96, 96, 3)).astype(np.uint8)
            arr[..., 2] += np.uint8(tint)  # tumour patches bluer: a colour-only difference
            Image.fromarray(arr).save(d / f"{i:03d}.png")


def test_study_runs_and_a_colour_difference_survives_shuffling(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pcam_like(tmp_path / "pcam", 8)
    out = tmp_path / "study.jsonl"
    _module().main(["--pcam", str(tmp_path / "pcam"), "--bank", "8", "--test", "8", "--k", "3",
                    "--extractors", "colour-stats", "--probes", "rgb", "shuffled", "standardised",
                    "--out", str(out)])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [r["probe"] for r in lines] == ["rgb", "shuffled", "standardised"]
    assert out.read_text().count("\n") == 3
    by = {r["probe"]: r for r in lines}
    # the classes differ by colour only: colour statistics see it with or without the layout
    assert by["rgb"]["auroc"] == by["shuffled"]["auroc"] == 1.0
    # per-channel standardisation removes a constant tint: chance level
    assert by["standardised"]["auroc"] < 0.8
    assert all(r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1] for r in lines)
