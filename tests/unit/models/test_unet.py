"""UNet presets: shapes, the AutoDDPM configuration, overrides, and clear errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import gen_ad.models.unet as unet_module
from gen_ad.models.unet import UNetSpecError, build_unet, unet_kwargs, unet_names


def test_tiny_unet_predicts_noise_shaped_output() -> None:
    torch.manual_seed(0)
    m = build_unet("tiny", sample_size=32)
    x = torch.randn(2, 3, 32, 32)
    out = m(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_autoddpm_config_matches_the_paper() -> None:
    kw = unet_kwargs("autoddpm", 64)
    assert kw["block_out_channels"] == (128, 256, 256)
    assert kw["layers_per_block"] == 1
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert kw["up_block_types"] == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    m = build_unet("autoddpm", sample_size=64)
    heads = [mod.heads for mod in m.modules() if mod.__class__.__name__ == "Attention"]
    assert heads and all(h == 1 for h in heads)  # single-head attention everywhere (incl. mid)
    assert m.config.sample_size == 64


def test_overrides_and_rebuild_from_config() -> None:
    over = {"name": "tiny", "block_out_channels": [16, 32], "attention_levels": [False, False]}
    a = build_unet(sample_size=16, **over)
    b = build_unet(sample_size=16, **over)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert a.config.block_out_channels == (16, 32)
    assert set(unet_names()) >= {"tiny", "autoddpm", "anoddpm"}


@pytest.mark.parametrize("kw, field, msg", [
    (dict(name="huge"), "name", "unknown UNet"),
    (dict(name="tiny", attention_levels=[True]), "attention_levels", "one entry per level"),
    (dict(name="tiny", norm_num_groups=5), "norm_num_groups", "must divide every width"),
    (dict(name="tiny", layers_per_block=-1), "layers_per_block", ">= 1"),
    (dict(name="tiny", dropout=1.0), "dropout", r"\[0, 1\)"),
])
def test_bad_unet_config_is_a_value_error_naming_the_argument(kw: dict, field: str,
                                                               msg: str) -> None:
    with pytest.raises(ValueError, match=msg) as e:
        build_unet(sample_size=32, **kw)
    assert isinstance(e.value, UNetSpecError) and e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_size_must_fit_the_levels() -> None:
    with pytest.raises(UNetSpecError, match="not divisible") as e:
        unet_kwargs("autoddpm", 30)
    assert e.value.field == "sample_size"


def test_network_module_knows_nothing_of_configs() -> None:
    """The model layer raises plain ``ValueError``s; config keys are the config layer's."""
    tree = ast.parse(Path(unet_module.__file__).read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"gen_ad.config", "gen_ad.errors"} & names
