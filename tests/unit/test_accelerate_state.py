"""Tests do not inherit accelerate's process-wide state from earlier tests (conftest fixture).

On a GPU machine a CUDA or bf16 training test left a state behind, and a later test's plain
``Accelerator(cpu=True)`` in the same process raised 'already been initialized'. The first test
leaves a bf16 state; the second (same file, so the same process without xdist) needs a plain one.
"""

from __future__ import annotations

from accelerate import Accelerator


def test_first_leaves_a_bf16_state_behind() -> None:
    assert Accelerator(cpu=True, mixed_precision="bf16").state.mixed_precision == "bf16"


def test_second_builds_a_plain_accelerator() -> None:
    acc = Accelerator(cpu=True)
    assert acc.state.mixed_precision == "no" and acc.device.type == "cpu"
