"""UNet presets and diffusers noise schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gen_ad.errors import ConfigError
from gen_ad.models.unet import (
    ScheduleConfig,
    UNetConfig,
    build_scheduler,
    build_unet,
    scheduler_from_config,
    unet_kwargs,
    unet_names,
)


def test_tiny_unet_predicts_noise_shaped_output() -> None:
    torch.manual_seed(0)
    m = build_unet("tiny", sample_size=32)
    x = torch.randn(2, 3, 32, 32)
    out = m(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_autoddpm_config_matches_the_paper() -> None:
    kw = unet_kwargs(UNetConfig(name="autoddpm"), 64)
    assert kw["block_out_channels"] == (128, 256, 256)
    assert kw["layers_per_block"] == 1
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert kw["up_block_types"] == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    m = build_unet("autoddpm", sample_size=64)
    heads = [mod.heads for mod in m.modules() if mod.__class__.__name__ == "Attention"]
    assert heads and all(h == 1 for h in heads)  # single-head attention everywhere (incl. mid)
    assert m.config.sample_size == 64


def test_overrides_and_rebuild_from_config() -> None:
    cfg = UNetConfig(name="tiny", block_out_channels=[16, 32], attention_levels=[False, False])
    a = build_unet(sample_size=16, **{k: v for k, v in vars(cfg).items()})
    b = build_unet(sample_size=16, **{k: v for k, v in vars(cfg).items()})
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert a.config.block_out_channels == (16, 32)
    assert set(unet_names()) >= {"tiny", "autoddpm", "anoddpm"}


@pytest.mark.parametrize("kw, msg", [
    (dict(name="huge"), "unknown UNet"),
    (dict(name="tiny", attention_levels=[True]), "attention_levels"),
    (dict(name="tiny", norm_num_groups=5), "norm_num_groups"),
])
def test_bad_unet_config_is_a_clear_error(kw: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        build_unet(sample_size=32, **kw)


def test_size_must_fit_the_levels() -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        unet_kwargs(UNetConfig(name="autoddpm"), 30)


def test_schedules_are_linear_t1000() -> None:
    s = build_scheduler("ddpm")
    assert isinstance(s, DDPMScheduler) and s.config.num_train_timesteps == 1000
    assert torch.isclose(s.betas[0], torch.tensor(1e-4)) and torch.isclose(s.betas[-1],
                                                                           torch.tensor(0.02))
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000))
    d = scheduler_from_config(ScheduleConfig(), "ddim")
    assert isinstance(d, DDIMScheduler) and torch.allclose(d.alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ConfigError, match="scheduler kind"):
        build_scheduler("euler")  # type: ignore[arg-type]
