"""Built-in configs (the repository's configs/, shipped inside the package): names, the
``--config`` fallback from a folder without them, and the messages when neither is there."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from gen_ad.config import (
    builtin_config,
    builtin_config_dir,
    builtin_config_name,
    builtin_configs,
    load_config,
    resolve_config_file,
)
from gen_ad.errors import ConfigError
from gen_ad.training.registry import family_schema

ROOT = Path(__file__).resolve().parents[2]


def test_every_repository_config_is_a_builtin() -> None:
    names = {p.relative_to(ROOT / "configs").with_suffix("").as_posix()
             for p in (ROOT / "configs").glob("*/*.yaml")}
    assert set(builtin_configs()) == names
    assert {"ddpm/demo", "wgan/demo", "wgan/demo_encoder", "stylegan2/demo",
            "benchmark/demo"} <= names
    assert builtin_config("ddpm/demo").read_bytes() == (
        builtin_config_dir() / "ddpm" / "demo.yaml").read_bytes()


@pytest.mark.parametrize(("text", "name"), [
    ("ddpm/demo", "ddpm/demo"), ("ddpm/demo.yaml", "ddpm/demo"),
    ("configs/ddpm/demo.yaml", "ddpm/demo"), ("./configs/wgan/demo_encoder.yaml",
                                              "wgan/demo_encoder"),
    ("configs\\ddpm\\demo.yaml", "ddpm/demo"),
    ("/abs/configs/ddpm/demo.yaml", None), ("../configs/ddpm/demo.yaml", None),
    ("demo.yaml", None), ("a/b/c/d.yaml", None),
])
def test_builtin_name_of_a_path(text: str, name: str | None) -> None:
    assert builtin_config_name(text) == name


def test_readme_path_from_another_folder_uses_the_builtin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"using the built-in config ddpm/demo .*gen-ad configs "
                      r"copy ddpm/demo"):
        cfg = load_config(family_schema("ddpm"), "configs/ddpm/demo.yaml", ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.out == "checkpoints/ddpm-demo"


def test_a_builtin_name_is_used_without_a_warning(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config ddpm/demo`` asks for the built-in config: nothing to warn about (a missing
    ``.yaml`` path, which may be a typo of the user's own file, is warned about)."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_config_file("ddpm/demo") == builtin_config("ddpm/demo")


def test_a_local_file_wins_over_the_builtin(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "configs" / "ddpm" / "demo.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("out: mine\n", encoding="utf-8")
    assert resolve_config_file("configs/ddpm/demo.yaml") == Path("configs/ddpm/demo.yaml")
    assert load_config(family_schema("ddpm"), "configs/ddpm/demo.yaml").out == "mine"


def test_missing_config_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config file not found: configs/ddpm/dmeo.yaml "
                       r"\(nor a built-in config; did you mean ddpm/demo"):
        resolve_config_file("configs/ddpm/dmeo.yaml")
    with pytest.raises(ConfigError, match=r"nor a built-in config: `gen-ad configs list`"):
        resolve_config_file("zzz/qqq")
    absolute = tmp_path / "configs" / "ddpm" / "demo.yaml"  # absolute: that file or nothing
    with pytest.raises(ConfigError, match=rf"^config file not found: {absolute}$"):
        resolve_config_file(absolute)
    with pytest.raises(ConfigError, match=r"no built-in config 'ddpm/dmeo'; did you mean "
                       r"ddpm/demo"):
        builtin_config("ddpm/dmeo")
