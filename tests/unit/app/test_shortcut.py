"""The shortcut check: colour-only baseline beside every method, warnings, stain-shift drops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gen_ad.app.benchmark import BenchmarkConfig, PreparedMethod, benchmark_methods, summary_lines
from gen_ad.config import from_dict
from gen_ad.data.stain_shift import ShiftedDataset, hed_jitter, median_reference
from gen_ad.errors import ConfigError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch


class TextureScorer(AnomalyScorer):
    """Colour-blind: mean |Laplacian| of the luminance standardised per image."""

    name = "texture"

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        for _ in normal_batches:
            pass
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        lum = x.mean(dim=1, keepdim=True)
        lum = (lum - lum.mean(dim=(2, 3), keepdim=True)) / lum.std(dim=(2, 3), keepdim=True)
        lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
        return ScoreBatch(scores=F.conv2d(lum, lap).abs().mean(dim=(1, 2, 3)))


def _save(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def _stain_cast(rgb: np.ndarray) -> np.ndarray:
    """A brownish cast (a stain batch or scanner difference): +0.1 in the DAB channel."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb) + np.array([0.0, 0.0, 0.1])
    return np.clip(np.rint(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stain_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normal synthetic tissue in both classes; 'anomalous' differs only by a stain cast."""
    from gen_ad.data.synthetic import generate_range

    root = tmp_path_factory.mktemp("stain_only")
    imgs = generate_range(0, 96, size=32, seed=0).images
    _save(root / "bank" / "normal", imgs[:40])
    _save(root / "val" / "normal", imgs[40:56])
    _save(root / "test" / "normal", imgs[56:76])
    _save(root / "test" / "anomalous", np.stack([_stain_cast(i) for i in imgs[76:96]]))
    return root


def _cfg(root: Path, out: Path, **shortcut: object) -> BenchmarkConfig:
    return from_dict(BenchmarkConfig, {
        "out": str(out), "data": {"test": str(root / "test"), "val": str(root / "val"),
                                  "size": 32, "classes": ["normal", "anomalous"]},
        "methods": [{"knn": {"extractor": "resnet50", "random_init": True, "tiny": True,
                             "k": 4, "bank": str(root / "bank")}}],
        "n_boot": 20, "device": "cpu", "examples": 0, "fid": {"enabled": False},
        "shortcut": {"k": 10, "limit": None, **shortcut}})


def _texture(root: Path) -> PreparedMethod:
    return PreparedMethod("texture", "generative", "colour-blind texture score (test)", [],
                          TextureScorer(), 32, str(root / "val"), None, 16)


def test_colour_baseline_flags_a_stain_only_split(stain_only: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cfg = _cfg(stain_only, out, bank=str(stain_only / "bank"))
    results = benchmark_methods(cfg, [_texture(stain_only)], "cpu", progress=False)
    data = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in data["methods"]]
    assert names == ["texture", "colour-baseline"]
    colour = data["methods"][1]
    assert colour["kind"] == "colour baseline"
    assert str(stain_only / "bank") in colour["description"]
    sc = data["shortcut"]
    c_auc = sc["colour_baseline"]["auroc"]
    t_auc = sc["methods"]["texture"]["auroc"]
    print(f"stain-only split: colour-only AUROC {c_auc:.3f}, texture AUROC {t_auc:.3f}")
    assert c_auc >= 0.9 and c_auc == colour["metrics"]["auroc"]["value"]
    assert sc["methods"]["texture"]["colour_reaches"] is True
    assert sc["methods"]["texture"]["flagged"] is True and sc["colour_baseline"]["separates"]
    assert len(data["warnings"]) == 1 and "'texture'" in data["warnings"][0]
    html = (out / "report.html").read_text()
    assert "Shortcut check" in html and "reached by colour" in html
    assert "colour-only baseline (AUROC" in html
    assert summary_lines(results)[-1].startswith("WARNING shortcut:")
    # every method, the baseline included, is re-scored on the same 40 patches under both shifts
    for name in names:
        shift = sc["methods"][name]["stain_shift"]
        print(name, "stain shift:", shift)
        assert shift["n"] == 40 and shift["jitter"] == 0.05
        assert shift["drop_jitter"] == pytest.approx(shift["auroc"] - shift["auroc_jitter"])
        assert "drop_normalised" in shift and ("auroc_normalised" in shift
                                               or "normalised_error" in shift)
    # normalising to the normal set's reference removes most of the cast the baseline relies on
    assert sc["methods"]["colour-baseline"]["stain_shift"]["drop_normalised"] > 0.1


def test_stain_shift_leaves_a_colour_blind_scorer_unchanged(tmp_path: Path) -> None:
    """Structure-only split: smooth vs textured patches in random H&E-like colours."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]

    def patch(textured: bool) -> np.ndarray:
        base = rng.uniform([150, 60, 120], [230, 150, 210])
        shade = 0.75 + 0.25 * np.sin(xx / rng.uniform(6, 10) + rng.uniform(0, 6))[..., None]
        if textured:
            shade = shade * (1 - 0.35 * (((xx // 2) + (yy // 2)) % 2))[..., None]
        return np.clip(base * shade, 0, 255).astype(np.uint8)

    root = tmp_path / "data"
    _save(root / "bank" / "normal", np.stack([patch(False) for _ in range(24)]))
    _save(root / "val" / "normal", np.stack([patch(False) for _ in range(16)]))
    _save(root / "test" / "normal", np.stack([patch(False) for _ in range(12)]))
    _save(root / "test" / "anomalous", np.stack([patch(True) for _ in range(12)]))
    cfg = _cfg(root, tmp_path / "bench", normalise="reinhard", jitter=0.05)
    benchmark_methods(cfg, [_texture(root)], "cpu", progress=False)
    rec = json.loads((tmp_path / "bench/results.json").read_text())["shortcut"]["methods"]
    shift = rec["texture"]["stain_shift"]
    print("colour-blind scorer under stain shift:", shift)
    assert shift["auroc"] == 1.0 and shift["n"] == 24
    assert shift["drop_normalised"] == 0.0 and shift["drop_jitter"] == 0.0


def test_stain_shift_helpers_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(60, 230, (16, 16, 3), dtype=np.uint8)
    a = hed_jitter(img, 0.05, np.random.default_rng(1))
    assert np.array_equal(a, hed_jitter(img, 0.05, np.random.default_rng(1)))
    assert not np.array_equal(a, img) and np.array_equal(hed_jitter(img, 0.0, rng), img)
    with pytest.raises(ConfigError):
        hed_jitter(img, -1.0, rng)
    items = [{"image": torch.rand(3, 8, 8) * 2 - 1, "label": i % 2} for i in range(4)]
    ds = ShiftedDataset(items, lambda rgb, r: hed_jitter(rgb, 0.1, r), seed=3)  # type: ignore[arg-type]
    assert torch.equal(ds[2]["image"], ds[2]["image"]) and ds[2]["label"] == 0
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (-0.5, 0.0, 0.1, 0.9)])
    assert median_reference(imgs) in (1, 2)


def test_shortcut_config_errors_name_the_key() -> None:
    base = {"data": {"test": "t", "val": "v"}, "methods": [{"run": "r"}]}
    with pytest.raises(ConfigError, match="shortcut.jitter"):
        from_dict(BenchmarkConfig, {**base, "shortcut": {"jitter": 2.0}})
    with pytest.raises(ConfigError, match="shortcut"):
        from_dict(BenchmarkConfig, {**base, "shortcut": {"colour": True}})
