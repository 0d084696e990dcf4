"""``GEN_AD_DETERMINISTIC`` reaches every command through the CLI: a bad value is one line and
exit 2, ``1`` turns deterministic mode on for the command and off after it."""

from __future__ import annotations

import argparse

import pytest
import torch

from gen_ad import cli


@pytest.fixture(autouse=True)
def _restore_torch_flags() -> object:
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def _seen_by_a_command(monkeypatch: pytest.MonkeyPatch, value: str | None) -> list[bool]:
    if value is None:
        monkeypatch.delenv("GEN_AD_DETERMINISTIC", raising=False)
    else:
        monkeypatch.setenv("GEN_AD_DETERMINISTIC", value)
    seen: list[bool] = []

    def command(args: argparse.Namespace) -> int:
        seen.append(torch.are_deterministic_algorithms_enabled())
        return 0

    monkeypatch.setattr(cli, "_cmd_configs", command)
    rc = cli.main(["configs", "list"])
    seen.append(rc == 0)
    return seen


def test_the_variable_turns_the_mode_on_for_the_command_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert _seen_by_a_command(monkeypatch, "1") == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()  # off again after the command
    assert _seen_by_a_command(monkeypatch, None) == [False, True]
    assert _seen_by_a_command(monkeypatch, "off") == [False, True]


def test_a_value_neither_on_nor_off_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GEN_AD_DETERMINISTIC", "maybe")
    assert cli.main(["configs", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gen-ad: error:")
    assert "GEN_AD_DETERMINISTIC" in err[0]
