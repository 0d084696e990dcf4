"""DDPM end to end on the shared loop: demo config for a few steps, exact resume, load_run, both
scorers produce maps, and samples come out of the exported EMA UNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen_ad.config import load_config
from gen_ad.data.synthetic import generate
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.loop import run_training
from gen_ad.training.runs import load_run
from gen_ad.utils.io import load_safetensors

DEMO = Path(__file__).resolve().parents[2] / "configs" / "ddpm" / "demo.yaml"
TINY = ["data.synthetic=16", "data.size=32", "train.batch_size=4", "train.sample_every=0",
        "train.log_every=1", "train.fid_every=0", "train.ckpt_every=2", "optim.warmup_steps=1",
        "model.block_out_channels=[16, 32]", "model.attention_levels=[false, false]",
        "noise.kind=simplex", "sample.steps=2",
        # bitwise resume needs CPU semantics; CUDA twin with a tolerance: tests/gpu/
        "train.cpu=true"]


def _train(out: Path, *extra: str, resume: str | None = None) -> Path:
    cfg = load_config(DDPMConfig, DEMO, [*TINY, f"out={out}", "train.max_steps=4", *extra])
    return run_training(DDPMFamily(cfg), resume=resume)


def test_train_resume_load_and_score(tmp_path: Path) -> None:
    a = _train(tmp_path / "a")
    # stop after 2 steps via max_kimg (the cosine LR spans train.max_steps, so keep that fixed)
    b = _train(tmp_path / "b", "train.max_kimg=0.008")
    b = _train(tmp_path / "b", resume="latest")
    for name in ("unet", "unet_ema"):  # 4 steps == 2 + resume + 2, bitwise
        wa = load_safetensors(a / "model" / f"{name}.safetensors")
        wb = load_safetensors(b / "model" / f"{name}.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

    run = load_run(a)
    assert run.step == 4 and set(run.models) == {"unet"}
    # on a CUDA machine the family builds a channels-last UNet (for training, unless
    # train.cpu); a run loaded onto the CPU is plain (contiguous) whatever the machine has
    from gen_ad.training.ddpm import DDPMFamily

    built = DDPMFamily.build_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DDPMFamily, "build_models", lambda self: {
            k: m.to(memory_format=torch.channels_last) for k, m in built(self).items()})
        on_gpu_box = load_run(a)
    conv = on_gpu_box.models["unet"].conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    x = run.sample(3, seed=0, batch_size=2)
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()

    batch = generate(4, 32, seed=3, anomaly_fraction=0.5)
    imgs = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scorers = run.scorers(steps=3, lpips_random_init=True,
                          anoddpm={"t": 20}, autoddpm={"t_recon": 20, "t_inpaint": 4,
                                                       "steps_inpaint": 2, "resample": 2})
    assert set(scorers) == {"anoddpm", "autoddpm"}
    scorers["autoddpm"].fit([imgs[:2]])
    for name, sc in scorers.items():
        out = sc.score(imgs)
        assert out.scores.shape == (4,) and torch.isfinite(out.scores).all(), name
        assert out.maps.shape == (4, 32, 32) and (out.maps >= 0).all(), name
        assert out.recon.shape == imgs.shape, name


@pytest.mark.slow  # inductor compiles the tiny UNet's C++ kernels on CPU: minutes on 2 cores
def test_compile_train_equals_eager_and_exports_plain_keys(tmp_path: Path) -> None:
    """``speed.compile_train`` (the UNet compiled in place): the same 4 steps give the eager
    weights to float32 rounding (tolerance: fused kernels reorder float32 sums over 4 Adam
    steps), the exported state dicts keep the eager keys (no ``_orig_mod.``), and the run loads
    and samples like any other."""
    eager = _train(tmp_path / "eager")
    compiled = _train(tmp_path / "compiled", "speed.compile_train=true")
    for name in ("unet", "unet_ema"):
        wa = load_safetensors(eager / "model" / f"{name}.safetensors")
        wb = load_safetensors(compiled / "model" / f"{name}.safetensors")
        assert wa.keys() == wb.keys(), name
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    run = load_run(compiled)
    x = run.sample(2, seed=0)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
