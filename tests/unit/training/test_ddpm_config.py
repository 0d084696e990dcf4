"""The DDPM config sections of the network and the schedule (``model.*``, ``schedule.*``): they
name the key of an impossible value, and the family builds exactly what they describe."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gen_ad.config import from_dict
from gen_ad.errors import ConfigError
from gen_ad.models.unet import build_unet
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily, ScheduleConfig, scheduler_from_config


@pytest.mark.parametrize("model, key, reason", [
    ({"name": "huge"}, "model.name", "unknown UNet 'huge' (choose from tiny, small, autoddpm, "
                                     "anoddpm)"),
    ({"name": "tiny", "attention_levels": [True]}, "model.attention_levels",
     "needs one entry per level (2), got 1"),
    ({"name": "tiny", "norm_num_groups": 5}, "model.norm_num_groups",
     "5 must divide every width in [32, 64]"),
    ({"name": "tiny", "block_out_channels": [0, 8]}, "model.block_out_channels",
     "must be positive widths, got [0, 8]"),
    ({"name": "tiny", "layers_per_block": -1}, "model.layers_per_block", "must be >= 1"),
    ({"name": "tiny", "dropout": 1.5}, "model.dropout", "must be in [0, 1)"),
])
def test_unet_section_errors_name_the_key(model: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(DDPMConfig, {"model": model})
    assert str(e.value) == f"config key '{key}': {reason}"


def test_size_the_levels_cannot_halve_names_data_size() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(DDPMConfig, {"data": {"size": 30}, "model": {"name": "autoddpm"}})
    assert str(e.value) == ("config key 'data.size': image size 30 is not divisible by 2^2 "
                            "(the UNet 'autoddpm' has 3 levels)")


def test_schedule_section() -> None:
    s = scheduler_from_config(ScheduleConfig(), "ddpm")
    d = scheduler_from_config(ScheduleConfig(), "ddim")
    assert isinstance(s, DDPMScheduler) and isinstance(d, DDIMScheduler)
    assert torch.allclose(d.alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ConfigError, match=r"'schedule\.beta_start'"):
        from_dict(DDPMConfig, {"schedule": {"beta_start": 0.5, "beta_end": 0.1}})


def test_family_builds_the_unet_of_its_config_section() -> None:
    model = {"name": "tiny", "block_out_channels": [16, 32], "attention_levels": [False, True],
             "dropout": 0.1}
    fam = DDPMFamily(from_dict(DDPMConfig, {"data": {"size": 16}, "model": model,
                                            "train": {"cpu": True}}))
    torch.manual_seed(0)
    built = fam.build_models()["unet"]
    torch.manual_seed(0)
    ref = build_unet(sample_size=16, **model)
    assert built.config == ref.config
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(),
                                                 ref.state_dict().values()))
