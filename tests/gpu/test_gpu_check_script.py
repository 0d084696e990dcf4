"""scripts/gpu_check.py (``make gpu-check``) on the CPU: its plan, time boxes, results file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


def test_plan_covers_every_family_and_every_bench(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    gc = _module()
    assert gc.main(["--dry-run", "--work", str(tmp_path)]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    names = [s["name"] for s in steps]
    benches = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    # every bench script runs (one not yet tuned for the check in its smoke mode)
    assert names == ["gpu-tests", "synth", "train/wgan", "train/stylegan2", "train/ddpm",
                     *[f"bench/{b}" for b in benches]]
    tests = steps[0]["cmd"]
    assert "tests/gpu/test_families_gpu.py" in tests and "tests/gpu/test_knn_gpu.py" in tests
    assert "tests/unit/training/test_grid_sample.py" in tests
    for s in steps:
        if s["name"].startswith("train/"):
            assert (ROOT / s["settings"]["config"]).is_file()
            assert "train.max_minutes=1.0" in s["cmd"] and s["limit_s"] > 60
            synth = steps[1]["cmd"][steps[1]["cmd"].index("--out") + 1]
            assert Path(synth).parent.parent == tmp_path  # <work>/run-<time>/synth
            assert f"data.train={synth}" in s["cmd"]
    # --patches replaces the synthetic folder
    gc.main(["--dry-run", "--patches", str(tmp_path / "mine"), "--only", "synth,train/ddpm"])
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [s["name"] for s in steps] == ["train/ddpm"]
    assert f"data.train={tmp_path / 'mine'}" in steps[0]["cmd"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_cuda_it_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _module().main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU" in err and "--cpu-smoke" in err


def test_steps_are_time_boxed_and_written_with_hardware(tmp_path: Path) -> None:
    gc = _module()
    py = sys.executable
    steps = [gc.Step("bench/ok", [py, "-c", "print('noise'); print('{\"x\": 1}')"], 30, "bench"),
             gc.Step("bench/slow", [py, "-c", "import time; time.sleep(60)"], 2, "bench"),
             gc.Step("bench/fails", [py, "-c", "import sys; sys.exit('boom')"], 30, "bench"),
             gc.Step("bench/late", [py, "-c", "print(1)"], 30, "bench")]
    args = gc.parse_args(["--cpu-smoke", "--results", str(tmp_path / "r.jsonl"),
                          "--budget-s", "14"])
    assert gc.run_all(args, steps, tmp_path / "work") == 1
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    by = {r["step"]: r for r in rows}
    assert by["bench/ok"]["status"] == "ok" and by["bench/ok"]["result"] == {"x": 1}
    assert by["bench/slow"]["status"] == "timeout" and by["bench/slow"]["wall_s"] < 10
    assert by["bench/fails"]["status"] == "failed" and "boom" in by["bench/fails"]["stderr_tail"]
    # the 14 s budget is spent by then (the slow step took 2 of its own limit), or nearly
    assert by["bench/late"]["status"] in ("ok", "skipped")
    for r in rows:
        assert r["hardware"]["cpu"] and r["hardware"]["torch"] == torch.__version__
        assert r["command"] and r["mode"] == "cpu-smoke"


@pytest.mark.slow  # three real subprocesses (pytest, gen-ad synth, gen-ad train) on the CPU
def test_cpu_smoke_runs_the_real_commands(tmp_path: Path) -> None:
    gc = _module()
    res = tmp_path / "r.jsonl"
    rc = gc.main(["--cpu-smoke", "--work", str(tmp_path / "w"), "--results", str(res),
                  "--only", "gpu-tests,synth,train/wgan"])
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert rc == 0, [r.get("stderr_tail") for r in rows]
    by = {r["step"]: r for r in rows}
    assert list(by) == ["gpu-tests", "synth", "train/wgan"]
    assert by["gpu-tests"]["result"] == {"passed": 1}
    (run,) = (tmp_path / "w").glob("run-*")
    assert (run / "synth" / "normal").is_dir() and (run / "logs" / "train_wgan.log").is_file()
    train = by["train/wgan"]["result"]
    assert train["steps"] == 2 and train["img_per_s_median"] > 0
