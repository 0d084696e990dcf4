"""f-AnoGAN end to end: gan stage, encoder stage (frozen G/D, exact resume without the gan run),
load_run + scorer."""

from __future__ import annotations

from pathlib import Path

import torch

from gen_ad.config import load_config
from gen_ad.training.loop import run_training
from gen_ad.training.runs import load_run
from gen_ad.training.wgan import WGANConfig, WGANFamily
from gen_ad.utils.io import load_safetensors

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "wgan"
# train.cpu: bitwise resume needs CPU semantics (CUDA kernels may sum in any order); the CUDA twin
# with a stated tolerance is tests/gpu/test_families_gpu.py
COMMON = ["data.synthetic=24", "train.sample_every=0", "train.log_every=1", "train.fid_every=0",
          "train.cpu=true"]


def _train(config: str, *overrides: str, resume: str | None = None) -> Path:
    cfg = load_config(WGANConfig, CONFIGS / config, [*COMMON, *overrides])
    return run_training(WGANFamily(cfg), resume=resume)


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "model" / f"{name}.safetensors")


def test_two_stages_resume_and_score(tmp_path: Path) -> None:
    gan_args = ["train.batch_size=10", "train.ckpt_every=1"]
    gan = _train("demo.yaml", f"out={tmp_path / 'gan'}", "train.max_steps=2", *gan_args)
    g1 = _train("demo.yaml", f"out={tmp_path / 'g1'}", "train.max_steps=1", *gan_args)
    g1 = _train("demo.yaml", f"out={tmp_path / 'g1'}", "train.max_steps=2", *gan_args,
                resume="latest")
    for name in ("G", "D"):  # exact resume of the gan stage: 2 steps == 1 + resume + 1
        w0, w1 = _weights(gan, name), _weights(g1, name)
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name

    enc_args = [f"gan_run={gan}", "train.batch_size=6", "train.ckpt_every=2"]
    a = _train("demo_encoder.yaml", f"out={tmp_path / 'a'}", "train.max_steps=4", *enc_args)
    b = _train("demo_encoder.yaml", f"out={tmp_path / 'b'}", "train.max_steps=2", *enc_args)
    moved = gan.rename(tmp_path / "gan-moved")  # resuming restores G/D from b's checkpoint
    b = _train("demo_encoder.yaml", f"out={tmp_path / 'b'}", "train.max_steps=4", *enc_args,
               resume="latest")
    gan = moved.rename(gan)
    # exact resume of the encoder stage: 4 steps == 2 + resume + 2, bitwise, without gan_run
    ea, eb = _weights(a, "E"), _weights(b, "E")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # G and D are the gan run's, bitwise, and saved with the encoder run (self-contained)
    for name in ("G", "D"):
        g0, g1 = _weights(gan, name), _weights(a, name)
        assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)

    run = load_run(a)
    x = run.sample(3, seed=0)
    assert x.shape == (3, 3, 32, 32)
    out = run.scorers()["fanogan"].score(x)
    assert out.scores.shape == (3,) and out.maps.shape == (3, 32, 32)
    torch.testing.assert_close(out.terms["residual"] + out.terms["feature"], out.scores)
    assert list(load_run(gan).scorers(steps=2)) == ["anogan"]
