"""scripts/gpu_check.py (``make gpu-check``) on the CPU: its plan, time boxes, results file."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
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
    dry = json.loads(capsys.readouterr().out)
    assert dry["budget_s"] == 480  # issue 13: at most 8 minutes on one recent GPU
    steps = dry["steps"]
    names = [s["name"] for s in steps]
    benches = sorted(p.name for p in (ROOT / "bench").glob("*.py")
                     if not p.name.startswith("_"))  # _common.py: the benches' shared helpers
    # every bench script runs (one not yet tuned for the check in its smoke mode), each family
    # trains, the suite runs; no reference comparison without --reference
    assert sorted(n for n in names if n.startswith("bench/")) == [f"bench/{b}" for b in benches]
    assert {"tests", "synth", "train/wgan", "train/stylegan2", "train/ddpm"} <= set(names)
    assert "reference-ops" not in names and len(names) == len(benches) + 5
    by = {s["name"]: s for s in steps}
    # phases: the GPU-figure benches alone first, the synthetic folder before the trainings,
    # the suite beside the trainings (one lane each), the other benches last
    assert by["bench/knn.py"]["phase"] == by["bench/diffusion.py"]["phase"] == 0
    assert by["synth"]["phase"] < by["train/ddpm"]["phase"] == by["tests"]["phase"]
    lanes = {by[n]["lane"] for n in ("tests", "train/wgan", "train/stylegan2", "train/ddpm")}
    assert len(lanes) == 4
    assert by["bench/wgan.py"]["phase"] > by["tests"]["phase"]
    # the CPU-only benches run beside the last GPU benches, not beside the suite
    for cpu_bench in ("bench/faults.py", "bench/memory.py"):
        assert by[cpu_bench]["phase"] == by["bench/wgan.py"]["phase"]
        assert by[cpu_bench]["lane"] != by["bench/wgan.py"]["lane"]
    assert "not slow and not network" in by["tests"]["cmd"] and "tests" in by["tests"]["cmd"]
    for s in steps:
        if s["name"].startswith("train/"):
            assert (ROOT / s["settings"]["config"]).is_file()
            assert "train.max_minutes=1.0" in s["cmd"] and s["limit_s"] > 60
            synth = by["synth"]["cmd"][by["synth"]["cmd"].index("--out") + 1]
            assert Path(synth).parent.parent == tmp_path  # <work>/run-<time>/synth
            assert f"data.train={synth}" in s["cmd"]
    # --tests gpu: only the files holding gpu-marked tests
    gc.main(["--dry-run", "--tests", "gpu", "--only", "tests"])
    (tests,) = json.loads(capsys.readouterr().out)["steps"]
    assert "tests/gpu/test_families_gpu.py" in tests["cmd"] and "gpu" in tests["cmd"]
    assert "tests/unit/training/test_grid_sample.py" in tests["cmd"]
    # --patches replaces the synthetic folder
    gc.main(["--dry-run", "--patches", str(tmp_path / "mine"), "--only", "synth,train/ddpm"])
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [s["name"] for s in steps] == ["train/ddpm"]
    assert f"data.train={tmp_path / 'mine'}" in steps[0]["cmd"]
    # --reference: its ops build beside phase 0, the comparison alone right after
    gc.main(["--dry-run", "--reference", str(tmp_path / "ref"), "--only", "reference,bench/st"])
    steps = {s["name"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert steps["reference-ops"]["phase"] == 0 and steps["reference-ops"]["lane"] == 1
    ref = steps["bench/stylegan2.py --reference"]
    assert ref["phase"] == 1 and "--steps" in ref["cmd"] and "--compile" not in ref["cmd"]
    gc.main(["--dry-run", "--reference", str(tmp_path / "ref")])
    assert json.loads(capsys.readouterr().out)["budget_s"] == 480 + ref["limit_s"]
    gc.main(["--dry-run", "--reference", str(tmp_path / "ref"), "--reference-compile",
             "--only", "bench/stylegan2.py --reference"])
    (compiled,) = json.loads(capsys.readouterr().out)["steps"]
    assert "--compile" in compiled["cmd"] and compiled["limit_s"] == ref["limit_s"] + 240


def test_lanes_of_a_phase_run_at_the_same_time(tmp_path: Path) -> None:
    gc = _module()
    py = sys.executable
    sleep = [py, "-c", "import time; time.sleep(1.5); print('{\"x\": 1}')"]
    steps = [gc.Step("bench/a", sleep, 30, "bench", phase=0, lane=0),
             gc.Step("bench/b", sleep, 30, "bench", phase=0, lane=1),
             gc.Step("bench/c", sleep, 30, "bench", phase=0, lane=2),
             gc.Step("bench/d", [py, "-c", "print(1)"], 30, "bench", phase=1, lane=0)]
    args = gc.parse_args(["--cpu-smoke", "--results", str(tmp_path / "r.jsonl")])
    t0 = time.perf_counter()
    assert gc.run_all(args, steps, tmp_path / "work") == 0
    assert time.perf_counter() - t0 < 4.4  # three 1.5 s lanes at once, not 4.5 s in a row
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["bench/a", "bench/b", "bench/c", "bench/d"]
    assert rows[0]["beside"] == ["bench/b", "bench/c"] and rows[3]["beside"] == []
    assert all(r["result"] == {"x": 1} for r in rows[:3])
    assert all("load_avg_1min_at_end" in r for r in rows)


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
                  "--only", "tests,synth,train/wgan"])
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert rc == 0, [r.get("stderr_tail") for r in rows]
    by = {r["step"]: r for r in rows}
    assert list(by) == ["synth", "tests", "train/wgan"]
    assert by["tests"]["result"] == {"passed": 1}
    (run,) = (tmp_path / "w").glob("run-*")
    assert (run / "synth" / "normal").is_dir() and (run / "logs" / "train_wgan.log").is_file()
    train = by["train/wgan"]["result"]
    assert train["steps"] == 2 and train["img_per_s_median"] > 0
