"""Config schemas: YAML, overrides, and every kind of config error (named key, before any work)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gen_ad.config import (
    DataConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from gen_ad.errors import ConfigError
from gen_ad.training.registry import family_schema


@dataclass
class Model:
    width: int = 8
    lr: float = 1e-3
    kind: str = "a"

    def validate(self, prefix: str) -> None:
        if self.width <= 0:
            raise ConfigError(f"config key '{prefix}.width': must be positive")


@dataclass
class Root:
    out: str = "checkpoints/x"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: Model = field(default_factory=Model)
    tags: list[str] = field(default_factory=list)
    note: str | None = None


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  width: 16\ntrain:\n  batch_size: 8\n")
    cfg = load_config(Root, y, ["model.lr=3e-4", "train.max_steps=7", "tags=[a, b]",
                                "data.train=/x/y", "train.mixed_precision=bf16", "note=null"])
    assert cfg.model.width == 16 and cfg.train.batch_size == 8
    assert cfg.model.lr == pytest.approx(3e-4) and isinstance(cfg.model.lr, float)
    assert cfg.train.max_steps == 7 and cfg.tags == ["a", "b"] and cfg.data.train == "/x/y"
    assert cfg.train.mixed_precision == "bf16" and cfg.note is None
    assert cfg.data.size == 64  # untouched default


def test_int_widens_to_float() -> None:
    assert from_dict(Root, {"model": {"lr": 1}}).model.lr == 1.0


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Root, None, ["model.width=5", "tags=[q]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(Root, tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override, pattern", [
    ("model.widht=3", r"unknown config key 'model\.widht'; did you mean 'model\.width'"),
    ("trian.batch_size=3", r"unknown config key 'trian'; did you mean 'train'"),
    ("model.width=abc", r"'model\.width': expected an integer, got 'abc'"),
    ("model.width=2.5", r"'model\.width': expected an integer"),
    ("model.lr=fast", r"'model\.lr': expected a number"),
    ("train.cpu=3", r"'train\.cpu': expected true/false"),
    ("train.mixed_precision=fp8", r"'train\.mixed_precision': must be one of"),
    ("tags=notalist", r"'tags': expected a list"),
    ("model=3", r"'model': expected a section"),
    ("model.width=0", r"'model\.width': must be positive"),
    ("train.batch_size=-1", r"'train\.batch_size': must be positive"),
    ("train.grad_accum=3", r"'train\.grad_accum': must divide batch_size"),
    ("data.size=4", r"'data\.size': must be >= 8"),
    ("data.stain_norm=macenko", r"'data\.stain_ref': is required"),
    ("train.ema_decay=1.5", r"'train\.ema_decay'"),
])
def test_config_errors_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(Root, None, [override])


def test_bad_override_syntax_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("model.width")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("model..width=3")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Root, bad)
    bad.write_text("model: {width: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Root, bad)


def test_overrides_do_not_mutate_input() -> None:
    data = {"model": {"width": 3}}
    out = apply_overrides(data, ["model.width=4", "new.key=1"])
    assert data == {"model": {"width": 3}} and out["model"]["width"] == 4 and out["new"]["key"] == 1


def test_unknown_family() -> None:
    with pytest.raises(ConfigError, match="unknown model family 'wgna'; did you mean 'wgan'"):
        family_schema("wgna")


@dataclass
class WithSectionDefaults:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=4, max_steps=6))


def test_partial_section_keeps_schema_section_defaults() -> None:
    cfg = load_config(WithSectionDefaults, None, ["train.max_steps=3"])
    assert cfg.train.batch_size == 4 and cfg.train.max_steps == 3


@dataclass
class WithOptionalSection:
    model: Model | None = None


def test_optional_section_reports_the_inner_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.widht'"):
        from_dict(WithOptionalSection, {"model": {"widht": 3}})
    assert from_dict(WithOptionalSection, {"model": None}).model is None
    assert from_dict(WithOptionalSection, {"model": {"width": 3}}).model.width == 3


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path: Path) -> None:
    """Each YAML under configs/ parses and validates against its schema (typos fail here)."""
    if path.parent.name == "benchmark":
        from gen_ad.app.benchmark import load_benchmark_config

        cfg = load_benchmark_config(path)
        assert cfg.methods
    else:
        cfg = load_config(family_schema(path.parent.name), path)
        assert cfg.out.startswith("checkpoints/")
        assert cfg.train.max_steps > 0
