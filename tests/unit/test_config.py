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
    read_yaml,
    save_config,
    to_dict,
)
from gen_ad.errors import ConfigError
from gen_ad.training.registry import families, family_schema


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


# ----------------------------------------------------------------------------- review fixes


def test_text_overrides_keep_their_raw_text() -> None:
    """YAML 1.1 would read ``no`` as False and ``2024`` as an int; text fields keep the text."""
    cfg = load_config(Root, None, ["train.mixed_precision=no", "out=2024", "data.train=123",
                                   "data.val=007", "note='null'", "model.kind=on",
                                   "model.width=3", "tags=[a, b]", "train.cpu=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.out == "2024" and cfg.data.train == "123"
    assert cfg.data.val == "007" and cfg.note == "null" and cfg.model.kind == "on"
    assert cfg.model.width == 3 and cfg.tags == ["a", "b"] and cfg.train.cpu is True
    for unset in ("note=null", "note=~", "data.val=NULL"):
        cfg = load_config(Root, None, [unset])
        assert cfg.note is None and cfg.data.val is None
    with pytest.raises(ConfigError, match=r"'out': expected a string, got None"):
        load_config(Root, None, ["out=null"])


def test_yaml_file_no_for_a_literal_and_numbers_for_text(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  mixed_precision: no\n")
    assert load_config(Root, y).train.mixed_precision == "no"
    y.write_text("out: 2024\n")
    with pytest.raises(ConfigError, match=r"'out': expected a string, got 2024 .*quote it"):
        load_config(Root, y)


@pytest.mark.parametrize("override, key", [
    ("out=", "out"), ("out=  ", "out"), ("data.train=", "data.train"),
    ("data.cache=", "data.cache"), ("data.val=", "data.val"), ("note=''", "note"),
])
def test_empty_text_is_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key.replace('.', '[.]')}': must not be empty"):
        load_config(Root, None, [override])


@dataclass
class WithBlankDefault:
    tag: str = ""


def test_empty_text_is_kept_where_it_is_the_default() -> None:
    assert from_dict(WithBlankDefault, {"tag": ""}).tag == ""
    with pytest.raises(ConfigError, match=r"'out': must not be empty"):
        from_dict(Root, {"out": ""})


@dataclass
class WithList:
    items: list[Model] = field(default_factory=list)
    names: list[str] = field(default_factory=lambda: ["normal", "other"])
    maybe: list[str] | None = None


def test_overrides_index_into_lists() -> None:
    data = {"items": [{"width": 1}, {"width": 2}]}
    out = apply_overrides(data, ["items.1.width=5", "items[0].kind=no", "names.1=x"],
                          schema=WithList)
    assert data == {"items": [{"width": 1}, {"width": 2}]}  # input untouched
    cfg = from_dict(WithList, out)
    assert [m.width for m in cfg.items] == [1, 5] and cfg.items[0].kind == "no"
    assert cfg.names == ["normal", "x"]  # the schema's default list, one element replaced


@pytest.mark.parametrize("override, pattern", [
    ("items.2.width=1", r"'items\[2\]': index out of range; 'items' has 2 element"),
    ("items[7]=1", r"'items\[7\]': index out of range"),
    ("items.x.width=1", r"'items': is a list; address an element by its index"),
    ("maybe.0=a", r"'maybe': has no list to index here"),
    ("items[a].width=1", r"a list index is written \[0\]"),
])
def test_list_index_errors_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides({"items": [{"width": 1}, {"width": 2}]}, [override], schema=WithList)


def test_benchmark_method_kwargs_override() -> None:
    from gen_ad.app.benchmark import load_benchmark_config

    cfg = load_benchmark_config(CONFIGS / "benchmark" / "demo.yaml",
                                ["methods.1.kwargs.steps=5", "methods[0].name=first",
                                 "methods.3.kwargs.lpips_random_init=true"])
    assert cfg.methods[1].kwargs == {"steps": 5}
    assert cfg.methods[3].kwargs == {"lpips_random_init": True}  # a key the file does not have
    assert cfg.methods[0].name == "first"


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    y = tmp_path / "dup.yaml"
    y.write_text("model:\n  width: 3\n  width: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'width' at line 3 "
                                          r"\(first at line 2\)"):
        load_config(Root, y)
    y.write_text("out: a\nmodel: {width: 3}\nout: b\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'out' at line 3"):
        read_yaml(y)
    y.write_text("base: &b {width: 3, lr: 0.1}\nmodel:\n  <<: *b\n  width: 4\n")
    assert read_yaml(y)["model"] == {"width": 4, "lr": 0.1}  # a merge key may be overridden


@pytest.mark.parametrize("override", ["model.lr=inf", "model.lr=nan", "model.lr=-inf",
                                      "model.lr=.inf", "train.max_minutes=inf"])
def test_non_finite_floats_are_rejected(override: str) -> None:
    key = override.split("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"'{key}': must be a finite number"):
        load_config(Root, None, [override])


@pytest.mark.parametrize("family", families())
def test_every_family_default_config_validates(family: str) -> None:
    """The schema's own defaults pass its validation (wgan: batch 40 splits into 5 critics)."""
    cfg = from_dict(family_schema(family), {})
    assert cfg.train.batch_size > 0
