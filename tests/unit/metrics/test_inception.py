"""Inception-v3 feature extractors: conversion, weights resolution, loading errors, labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gen_ad.errors import CheckpointError, ConfigError, DataError
from gen_ad.metrics import inception as inc
from gen_ad.utils.io import torch_save


def test_to_uint8_is_exact_and_round_trips() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert inc.to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(inc.to_uint8(u.float() / 127.5 - 1), u)


def test_hub_cache_file_is_used(tmp_path: Path) -> None:
    """A weights file in $TORCH_HOME/hub/checkpoints (a temporary TORCH_HOME) is found offline."""
    weights = tmp_path / "w.pth"
    torch_save(weights, inc.random_inception_state_dict(seed=0))
    dest = inc.inception_cache_path()
    assert not dest.exists() and inc.is_offline()
    dest.parent.mkdir(parents=True)
    shutil.copyfile(weights, dest)
    assert inc.resolve_inception_weights() == dest
    ext = inc.load_inception(device="cpu", layer="64")
    assert ext.label == "fid_64" and ext.identity.startswith("sha256:")
    feats = ext(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 64) and feats.dtype == torch.float32


def test_bad_weights_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "w.pth"
    torch_save(bad, {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="does not match"):
        inc.load_inception(bad, device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        inc.load_inception(tmp_path / "junk.pth", device="cpu")


def test_random_init_inception_is_not_called_fid() -> None:
    ext = inc.load_inception(random_init=True, device="cpu")
    assert ext.label == "fd_inception-v3-random" and ext.kid_label == "kd_inception-v3-random"
    with pytest.raises(ConfigError, match="layer"):
        inc.load_inception(random_init=True, device="cpu", layer="1000")


def test_custom_extractor_checks_its_name_and_output() -> None:
    ext = inc.custom_extractor("flat", lambda x: x.float().flatten(1), device="cpu")
    assert ext.label == "fd_flat" and ext.kid_label == "kd_flat"
    assert ext(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).shape == (2, 48)
    bad = inc.custom_extractor("bad", lambda x: x.float(), device="cpu")
    with pytest.raises(DataError, match=r"\[B,D\]"):
        bad(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="lowercase"):
        inc.custom_extractor("Bad Name", lambda x: x)


def test_installed_safetensors_is_found_before_the_hub_cache(tmp_path: Path) -> None:
    """`gen-ad weights install` output (safetensors) wins over torch-fidelity's cache name."""
    from gen_ad.errors import WeightsNotFoundError
    from gen_ad.utils.io import save_safetensors
    from gen_ad.weights.registry import installed_path

    with pytest.raises(WeightsNotFoundError, match="gen-ad weights install --only fid-inception"):
        inc.resolve_inception_weights()
    torch_save(inc.inception_cache_path(), inc.random_inception_state_dict(seed=0))
    installed = installed_path("fid-inception")
    save_safetensors(installed, inc.random_inception_state_dict(seed=1))
    assert inc.resolve_inception_weights() == installed
    ext = inc.load_inception(device="cpu", layer="64")
    assert ext.label == "fid_64" and ext.is_inception
