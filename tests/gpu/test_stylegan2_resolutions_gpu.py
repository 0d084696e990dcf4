"""StyleGAN2 + ADA trains at every resolution, with R1 through the augmentation, on the device.

On CUDA this is what crashed before ADA had its own grid-sample op (PyTorch has no CUDA second
derivative of ``grid_sample``): every step here runs R1 (``r1_interval=1``) with every ADA
transform on (``augment.p=1``), at every supported resolution, with the float16 top layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gen_ad.config import load_config
from gen_ad.training.loop import run_training
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.utils.io import load_safetensors, read_jsonl

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stylegan2" / "demo.yaml"
DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", [64, 96, 128, 256, 512])
def test_r1_through_ada_at_every_resolution(res: int, device: str, tmp_path: Path) -> None:
    over = [f"out={tmp_path / 'run'}", "data.synthetic=4", f"data.size={res}",
            "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.sample_every=0",
            "train.ckpt_every=0", "train.fid_every=0", "model.channel_base=64",
            "model.channel_max=4", "model.z_dim=4", "model.w_dim=4", "loss.r1_interval=1",
            "loss.pl_interval=1", "augment.p=1.0", "augment.ada=false",
            f"train.cpu={'true' if device == 'cpu' else 'false'}"]
    if res == 96:
        over.append("model.init_res=3")
    run = run_training(StyleGAN2Family(load_config(StyleGAN2Config, CONFIG, over)))
    rows = [r for r in read_jsonl(run / "stats.jsonl") if "step" in r]
    assert [r["step"] for r in rows] == [1, 2]
    r1 = [v for r in rows for k, v in r.items() if "r1" in k]
    assert r1 and all(math.isfinite(v) and v > 0 for v in r1), rows
    g = load_safetensors(run / "model" / "G.safetensors")
    assert all(t.isfinite().all() for t in g.values())
