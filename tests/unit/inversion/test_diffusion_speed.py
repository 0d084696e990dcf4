"""Diffusion speed settings: channels-last, bf16 autocast and torch.compile give the plain fp32
eager UNet's results within stated tolerances, and resolve to off on CPU by default."""

from __future__ import annotations

import copy

import pytest
import torch

from gen_ad.config import from_dict
from gen_ad.inversion.diffusion import AnoDDPMScorer, Speed, SpeedConfig, prepare_unet
from gen_ad.models.schedule import build_scheduler
from gen_ad.models.unet import build_unet
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily


def _unet(attention: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=16, block_out_channels=[16, 32],
                      attention_levels=[False, attention]).eval()


def _x(b: int = 3) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _scores(speed: Speed, unet: torch.nn.Module) -> torch.Tensor:
    sched = build_scheduler("ddpm")
    sc = AnoDDPMScorer(copy.deepcopy(unet), sched, t=12, noise="gaussian", speed=speed)
    return sc.score(_x()).scores


def test_auto_is_off_on_cpu_and_on_for_cuda() -> None:
    auto = SpeedConfig()
    assert auto.resolve(torch.device("cpu")) == Speed()
    assert auto.resolve(torch.device("cuda")) == Speed(True, True, True)
    forced = SpeedConfig(bf16=True, channels_last=False, compile=None)
    assert forced.resolve(torch.device("cpu")) == Speed(bf16=True)
    cfg = from_dict(DDPMConfig, {"speed": {"channels_last": True, "compile": False}})
    assert cfg.speed.channels_last is True and cfg.speed.bf16 is None


def test_channels_last_scores_equal_eager() -> None:
    unet = _unet(attention=True)
    plain = _scores(Speed(), unet)
    fast = _scores(Speed(channels_last=True), unet)
    # the same maths in another memory layout: conv summation order may differ (fp32 rounding)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)
    prepared = prepare_unet(copy.deepcopy(unet), Speed(channels_last=True))
    w = next(p for p in prepared.parameters() if p.ndim == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_bf16_scores_within_tolerance() -> None:
    unet = _unet()
    plain = _scores(Speed(), unet)
    bf16 = _scores(Speed(bf16=True), unet)
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: per-step UNet outputs differ by ~1e-2 relative; over 13
    # ancestral steps the mean residual score moves by a few percent at most
    torch.testing.assert_close(bf16, plain, rtol=5e-2, atol=1e-3)


def test_ddpm_models_follow_the_speed_config() -> None:
    cfg = from_dict(DDPMConfig, {"data": {"size": 16}, "model": {"name": "tiny"},
                                 "speed": {"channels_last": True}})
    unet = DDPMFamily(cfg).build_models()["unet"]
    w = next(p for p in unet.parameters() if p.ndim == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)
    # automatic settings: plain layout for a CPU run (channels-last only where CUDA trains)
    plain = DDPMFamily(from_dict(DDPMConfig, {"data": {"size": 16}, "model": {"name": "tiny"},
                                              "train": {"cpu": True}}))
    w0 = next(p for p in plain.build_models()["unet"].parameters() if p.ndim == 4)
    assert w0.is_contiguous() and not w0.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # inductor compiles C++ kernels on CPU: minutes on a shared 2-core machine
def test_compiled_unet_equals_eager() -> None:
    unet = _unet()
    x, t = _x(2), torch.tensor([5, 400])
    with torch.no_grad():
        eager = unet(x, t).sample
        compiled = prepare_unet(copy.deepcopy(unet), Speed(compile=True))(x, t).sample
    # fused kernels reorder float32 sums: agreement to float32 rounding of the activations
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
