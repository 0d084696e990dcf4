"""Deterministic mode: the flags it sets, the errors it gives, the switches that turn it on, and a
training run under it that repeats bitwise and records it.

``torch.use_deterministic_algorithms`` and the cuDNN flags are process-wide: the autouse fixture
puts them (and the two environment variables) back after every test, so no other test runs in
deterministic mode.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gen_ad.config import TrainConfig, apply_overrides, from_dict, load_config, to_dict
from gen_ad.errors import ConfigError, GenAdError
from gen_ad.training.loop import (
    check_deterministic_conflicts,
    deterministic_switch,
    run_training,
)
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.training.wgan import WGANConfig, WGANFamily
from gen_ad.utils import determinism as det
from gen_ad.utils.provenance import describe, environment

_DEMO = Path(__file__).resolve().parents[3] / "configs" / "wgan" / "demo.yaml"
_PUT_NONDETERMINISTIC = "put_ does not have a deterministic implementation, but you set " \
    "'torch.use_deterministic_algorithms(True)'."


@pytest.fixture(autouse=True)
def _restore_determinism() -> Iterator[None]:
    """Snapshot the process-wide flags and variables, give the test a clean start (mode off,
    both variables unset), and put everything back after it."""
    flags = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = {k: os.environ.get(k) for k in (det.CUBLAS_VAR, det.ENV_VAR)}
    for k in env:
        os.environ.pop(k, None)
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2:]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _put() -> None:
    """``Tensor.put_`` without accumulation: non-deterministic by torch's account on CPU too."""
    torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------- the flags


def test_enable_sets_the_torch_flags_and_the_cublas_workspace() -> None:
    torch.backends.cudnn.benchmark = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: CUDA not started, variable unset
        det.enable_deterministic()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ[det.CUBLAS_VAR] == ":4096:8"
    state = det.deterministic_state()
    assert state["enabled"] and not state["warn_only"] and state["cudnn_deterministic"]
    assert not state["cudnn_benchmark"] and state["cublas_workspace_config"] == ":4096:8"
    assert state["matmul_precision"] == torch.get_float32_matmul_precision()
    assert state["cudnn_conv_tf32"] in (True, False, None)


def test_a_deterministic_cublas_value_is_kept_and_another_one_warns() -> None:
    os.environ[det.CUBLAS_VAR] = ":16:8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.enable_deterministic()
    assert os.environ[det.CUBLAS_VAR] == ":16:8"
    os.environ[det.CUBLAS_VAR] = ":0:0"
    with pytest.warns(UserWarning, match=r"CUBLAS_WORKSPACE_CONFIG=':0:0' is not one of"):
        det.enable_deterministic()
    assert os.environ[det.CUBLAS_VAR] == ":0:0"  # the user's value is theirs to change


def test_setting_cublas_after_cuda_started_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="CUDA was initialised before CUBLAS_WORKSPACE_CONFIG"):
        det.enable_deterministic()
    assert os.environ[det.CUBLAS_VAR] == ":4096:8"


def test_deterministic_mode_restores_the_previous_flags() -> None:
    torch.backends.cudnn.benchmark = True
    with det.deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    det.enable_deterministic()
    with det.deterministic_mode(False):  # off: leaves what another switch turned on
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- the errors


def test_a_nondeterministic_op_is_a_gen_ad_error_naming_it_and_the_switch() -> None:
    _put()  # fine with the mode off
    with pytest.raises(det.NondeterministicOpError) as info:
        with det.deterministic_mode(True, "train.deterministic=true"):
            _put()
    msg = str(info.value)
    assert isinstance(info.value, GenAdError) and isinstance(info.value.__cause__, RuntimeError)
    assert "put_" in msg and "train.deterministic=true" in msg and "turn deterministic" in msg
    assert not torch.are_deterministic_algorithms_enabled()  # restored on the way out


def test_translate_names_the_gen_ad_use_the_cublas_setting_and_passes_other_errors() -> None:
    ada = det.translate(RuntimeError(_PUT_NONDETERMINISTIC.replace(
        "put_", "grid_sampler_2d_backward_cuda")), "GEN_AD_DETERMINISTIC=1")
    assert ada is not None and "grid_sampler_2d_backward_cuda" in str(ada)
    assert "ADA" in str(ada) and "augment.transforms" in str(ada)
    assert "GEN_AD_DETERMINISTIC=1" in str(ada)
    cublas = det.translate(RuntimeError(
        "Deterministic behavior was enabled with either `torch.use_deterministic_algorithms(True)`"
        " or `at::Context::setDeterministicAlgorithms(true)`, but this operation is not "
        "deterministic because it uses CuBLAS and you have CUDA >= 10.2."))
    assert cublas is not None and "CUBLAS_WORKSPACE_CONFIG" in str(cublas)
    assert "train.deterministic=true or GEN_AD_DETERMINISTIC=1" in str(cublas)  # either switch
    other = RuntimeError("shapes do not match")
    assert det.translate(other) is None
    with pytest.raises(RuntimeError) as info, det.nondeterministic_errors():
        raise other
    assert info.value is other


# ----------------------------------------------------------------------------- the switches


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), (" ON ", True),
                                           ("yes", True), ("0", False), ("", False),
                                           ("off", False), ("False", False)])
def test_environment_variable_values(value: str, on: bool) -> None:
    assert det.requested_by_environment({det.ENV_VAR: value}) is on


def test_environment_variable_other_values_are_a_config_error() -> None:
    assert det.requested_by_environment({}) is False
    with pytest.raises(ConfigError, match="GEN_AD_DETERMINISTIC='maybe'"):
        det.requested_by_environment({det.ENV_VAR: "maybe"})


def test_deterministic_from_environment_is_the_commands_switch() -> None:
    with det.deterministic_from_environment():
        assert not torch.are_deterministic_algorithms_enabled()
    os.environ[det.ENV_VAR] = "1"
    with pytest.raises(det.NondeterministicOpError, match="GEN_AD_DETERMINISTIC=1"):
        with det.deterministic_from_environment():
            assert torch.are_deterministic_algorithms_enabled()
            _put()
    assert not torch.are_deterministic_algorithms_enabled()
    os.environ[det.ENV_VAR] = "2"
    with pytest.raises(ConfigError, match="GEN_AD_DETERMINISTIC"):
        with det.deterministic_from_environment():
            pass


def test_the_config_key_and_the_variable_combine() -> None:
    off, on = from_dict(TrainConfig, {}), from_dict(TrainConfig, {"deterministic": True})
    assert deterministic_switch(off) is None
    assert deterministic_switch(on) == "train.deterministic=true"
    os.environ[det.ENV_VAR] = "1"
    assert deterministic_switch(off) == "GEN_AD_DETERMINISTIC=1"
    assert deterministic_switch(on) == "train.deterministic=true and GEN_AD_DETERMINISTIC=1"
    os.environ[det.ENV_VAR] = "0"  # the variable cannot switch off what the config asks
    assert deterministic_switch(on) == "train.deterministic=true"


# ----------------------------------------------------------------------------- the config key


def test_config_key_defaults_off_round_trips_and_validates(tmp_path: Path) -> None:
    assert from_dict(TrainConfig, {}).deterministic is False
    cfg = load_config(WGANConfig, _DEMO, ["train.deterministic=true"])
    assert cfg.train.deterministic is True
    assert from_dict(WGANConfig, to_dict(cfg)) == cfg
    assert apply_overrides({}, ["train.deterministic=yes"]) == {"train": {"deterministic": True}}
    with pytest.raises(ConfigError, match="'train.deterministic': expected true/false"):
        from_dict(WGANConfig, {"train": {"deterministic": "maybe"}})
    with pytest.raises(ConfigError, match="'train.deterministic': expected true/false"):
        from_dict(WGANConfig, {"train": {"deterministic": 1}})


def test_a_cuda_run_with_ada_geometric_augmentation_refuses_to_start() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name: nothing runs on it

    def family(**augment: object) -> StyleGAN2Family:
        return StyleGAN2Family(from_dict(StyleGAN2Config, {"augment": augment}))

    check_deterministic_conflicts(family(), cuda)  # mode off: nothing to refuse
    det.enable_deterministic()
    with pytest.raises(ConfigError, match=r"augment\.transforms xflip.*deterministic CUDA"):
        check_deterministic_conflicts(family(), cuda)
    check_deterministic_conflicts(family(), cpu)  # CPU kernels are deterministic
    check_deterministic_conflicts(family(transforms=["brightness", "hue"]), cuda)
    check_deterministic_conflicts(family(ada=False, p=0.0), cuda)
    with pytest.raises(ConfigError):
        check_deterministic_conflicts(family(ada=False, p=0.2), cuda)
    check_deterministic_conflicts(WGANFamily(from_dict(WGANConfig, {})), cuda)


# ----------------------------------------------------------------------------- a training run


def _train(out: Path, *extra: str) -> dict[str, torch.Tensor]:
    over = [f"out={out}", "data.synthetic=20", "data.size=16", "model.base_dim=4",
            "model.latent_dim=8", "train.batch_size=10", "train.max_steps=2",
            "train.ckpt_every=2", "train.sample_every=0", "train.log_every=1", *extra]
    run_training(WGANFamily(load_config(WGANConfig, _DEMO, over)))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted((out / "model").glob("*.safetensors")):
        weights.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return weights


def _recorded(run: Path) -> tuple[bool, dict, dict]:
    """(``train.deterministic`` in config.yaml, the last environment.jsonl line, model.json's
    environment)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    lines = (run / "environment.jsonl").read_text(encoding="utf-8").splitlines()
    model = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))
    return cfg["train"]["deterministic"], json.loads(lines[-1]), model["environment"]


def test_a_deterministic_run_repeats_bitwise_and_records_the_mode(tmp_path: Path) -> None:
    first = _train(tmp_path / "a", "train.deterministic=true")
    assert not torch.are_deterministic_algorithms_enabled()  # the run's mode ended with it
    os.environ[det.ENV_VAR] = "1"  # the same mode through the variable, the key left off
    second = _train(tmp_path / "b")
    assert second.keys() == first.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    os.environ[det.ENV_VAR] = "0"  # and on CPU the mode changes no number (this family)
    off = _train(tmp_path / "c")
    assert all(torch.equal(first[k], off[k]) for k in first)
    assert not _recorded(tmp_path / "c")[1]["deterministic"]["enabled"]
    for run, key in ((tmp_path / "a", True), (tmp_path / "b", False)):
        saved, env_line, exported = _recorded(run)
        assert saved is key
        for env in (env_line, exported):
            state = env["deterministic"]
            assert state["enabled"] and state["cudnn_deterministic"], run
            assert state["cublas_workspace_config"] == ":4096:8"


def test_provenance_records_the_mode() -> None:
    env = environment("cpu")
    assert env["deterministic"] == det.deterministic_state()
    assert not env["deterministic"]["enabled"] and "deterministic" not in describe(env)
    with det.deterministic_mode(True):
        env = environment("cpu")
    assert env["deterministic"]["enabled"] and describe(env).endswith(" · deterministic mode")
