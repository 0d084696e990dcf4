"""The training loop's periodic FID reads its real set as training reads it (stain included)."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.metrics import fid
from gen_ad.metrics import inception as inc
from gen_ad.training.monitor import make_fid_monitor

needs_torchstain = pytest.mark.skipif(importlib.util.find_spec("torchstain") is None,
                                      reason="torchstain is not installed (pip install torchstain)")


def _meanstd() -> inc.FeatureExtractor:
    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return torch.cat([xf.mean((2, 3)), xf.std((2, 3))], 1)

    return inc.custom_extractor("meanstd", fn, identity="v1", device="cpu")


def _cfg(data: Path, ref: Path | None, fid_n: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        data=types.SimpleNamespace(train=str(data), val=None, size=32, resize="resize",
                                   normal_classes=["normal"],
                                   stain_norm="none" if ref is None else "reinhard",
                                   stain_ref=None if ref is None else str(ref)),
        train=types.SimpleNamespace(fid_every=10, fid_n=fid_n, fid_weights=None, seed=0))


def _sampler(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1


@needs_torchstain
def test_monitor_normalises_real_images_like_training(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.data import PatchFolder
    from gen_ad.data.folders import read_rgb
    from gen_ad.data.stain import StainNormalizer
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "data", n=6, size=48, seed=0, anomaly_fraction=0.0)
    ref = tmp_path / "ref.png"
    Image.fromarray(read_rgb(sorted((tmp_path / "data" / "normal").iterdir())[0])).save(ref)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **kw: _meanstd())
    mon = make_fid_monitor(_cfg(tmp_path / "data", ref, 6), tmp_path, torch.device("cpu"))
    assert mon is not None and mon.transform is not None
    settings = json.loads(mon.transform.identity.removeprefix("stain:"))
    assert settings["method"] == "reinhard" and len(settings["sha256"]) == 64
    out = mon.compute(10, _sampler)
    assert out is not None and out["n_real"] == 6
    train = PatchFolder(root=tmp_path / "data", size=32, classes=["normal"],
                        stain=StainNormalizer(method="reinhard", reference=ref))
    images = torch.from_numpy(np.stack([train.rgb8(i) for i in range(len(train))]))
    want = _meanstd()(images.permute(0, 3, 1, 2).contiguous())
    assert mon._ref is not None
    torch.testing.assert_close(mon._ref.features, want, rtol=0, atol=0)

    plain = make_fid_monitor(_cfg(tmp_path / "data", None, 6), tmp_path, torch.device("cpu"))
    assert plain is not None and plain.transform is None
    assert plain.compute(10, _sampler)["fd_meanstd"] != out["fd_meanstd"]  # type: ignore[index]
