"""`gen-ad benchmark` end to end on the chosen device: every method scored, device recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gen_ad.cli import main

DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_benchmark_runs_end_to_end(device: str, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    # the demo trains every family (its configs pin the CPU) and runs the benchmark once
    assert main(["demo", "--out", str(demo), "--fast"]) == 0
    out = tmp_path / f"bench-{device}"
    assert main(["benchmark", "--config", str(demo / "benchmark.yaml"), f"out={out}",
                 f"device={device}"]) == 0
    res = json.loads((out / "results.json").read_text())
    first = json.loads((demo / "benchmark" / "results.json").read_text())
    assert {m["name"] for m in res["methods"]} == {m["name"] for m in first["methods"]}
    assert res["environment"]["device"] == device
    assert ("gpu" in res["environment"]) == (device == "cuda")
    for m in res["methods"]:
        assert 0.0 <= m["metrics"]["auroc"]["value"] <= 1.0 and m["ms_per_patch"] > 0, m["name"]
    assert (out / "report.html").is_file()
