"""What a resume may change: family and model-defining keys refused, others listed."""

from __future__ import annotations

import pytest

from gen_ad.config import from_dict
from gen_ad.errors import CheckpointError
from gen_ad.training.resume_config import check_resume, config_changes, is_frozen, plain_config


def test_another_family_is_named_not_reported_as_damage() -> None:
    with pytest.raises(CheckpointError, match="written by the 'wgan' family, not 'ddpm'"):
        check_resume({"family": "wgan"}, "ddpm", {}, "run/state/step-2")
    assert check_resume({"family": "ddpm"}, "ddpm", {"a": 1}, "s") == []  # no record: older


def test_frozen_keys_and_plain_comparison() -> None:
    from gen_ad.training.ddpm import DDPMConfig

    cfg = plain_config(from_dict(DDPMConfig, {}))
    assert config_changes(cfg, plain_config(from_dict(DDPMConfig, {}))) == []  # tuples = lists
    other = plain_config(from_dict(DDPMConfig, {"noise": {"kind": "simplex"},
                                                "train": {"max_steps": 7}}))
    meta = {"family": "ddpm", "config": cfg}
    with pytest.raises(CheckpointError, match=r"noise\.kind: 'gaussian' -> 'simplex'"):
        check_resume(meta, "ddpm", other, "s")
    other["noise"]["kind"] = "gaussian"
    assert check_resume(meta, "ddpm", other, "s") == [
        f"train.max_steps: {cfg['train']['max_steps']!r} -> 7"]
    assert all(is_frozen(k) for k in ("model.channels", "schedule.beta_end", "stage", "gan_run",
                                      "data.size", "data.resize", "data.stain_norm"))
    assert not any(is_frozen(k) for k in ("train.max_steps", "optim.lr", "augment.p", "out"))


def test_load_run_does_not_compile_training_models() -> None:
    from gen_ad.training.ddpm import DDPMConfig
    from gen_ad.training.runs import _without_train_compile

    cfg = from_dict(DDPMConfig, {"speed": {"compile_train": True}})
    assert _without_train_compile(cfg).speed.compile_train is False
    assert cfg.speed.compile_train is True  # the run's recorded config is untouched
