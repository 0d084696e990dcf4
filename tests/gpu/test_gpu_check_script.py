"""scripts/gpu_check.py (``make gpu-check``) on the CPU: its plan, time boxes, results file."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
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
    # the CPU-only benches run beside the last GPU benches (a lane each), not beside the tests
    cpu_benches = ("bench/faults.py", "bench/memory.py", "bench/synthetic.py",
                   "bench/evaluation.py")
    for cpu_bench in cpu_benches:
        assert by[cpu_bench]["phase"] == by["bench/wgan.py"]["phase"]
        assert by[cpu_bench]["lane"] != by["bench/wgan.py"]["lane"]
    assert len({by[b]["lane"] for b in cpu_benches}) == 4
    # the synthetic folder (one CPU core) is written beside the GPU-figure benches
    assert by["synth"]["phase"] == 0 and by["synth"]["lane"] != by["bench/knn.py"]["lane"]
    # the default test selection: the gpu-marked tests (issue 13), not the whole suite
    assert by["tests"]["settings"] == {"selection": "gpu"}
    assert "gpu" in by["tests"]["cmd"] and "not slow and not network" not in by["tests"]["cmd"]
    assert "tests/gpu/test_families_gpu.py" in by["tests"]["cmd"]
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
    # --tests all: the suite, with a longer box and a budget past the 8 minutes to fit it
    gc.main(["--dry-run", "--tests", "all"])
    dry = json.loads(capsys.readouterr().out)
    (tests,) = [s for s in dry["steps"] if s["name"] == "tests"]
    assert "not slow and not network" in tests["cmd"] and "tests" in tests["cmd"]
    assert tests["limit_s"] > by["tests"]["limit_s"]
    assert dry["budget_s"] > 480 and dry["budget_s"] >= dry["critical_path_s"] + dry["startup_s"]
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


def _plan(gc, tmp_path: Path, *argv: str) -> list:  # noqa: ANN001
    return gc.plan(gc.parse_args(["--work", str(tmp_path), *argv]), tmp_path / "run")


def test_critical_path_adds_phases_of_their_slowest_lane() -> None:
    gc = _module()
    steps = [gc.Step("a", [], 10, "bench", phase=0, lane=0),
             gc.Step("b", [], 15, "bench", phase=0, lane=0),
             gc.Step("c", [], 20, "bench", phase=0, lane=1),
             gc.Step("d", [], 7, "bench", phase=2, lane=3)]
    assert gc.critical_path_s(steps) == 25 + 7


def test_default_plan_fits_its_budget(tmp_path: Path) -> None:
    """Issue 13: at most 8 minutes on one recent GPU. Phases run one after another and the lanes
    of a phase at once, so the plan's longest run is the sum over its phases of its slowest
    lane's time boxes; with the script's start-up it must fit the budget, or the last steps are
    cut or skipped on every run (a new bench/*.py must be given a box that keeps this)."""
    gc = _module()
    steps = _plan(gc, tmp_path)
    assert gc.default_budget(steps) == gc.BUDGET_S == 480
    assert gc.critical_path_s(steps) + gc.STARTUP_S <= gc.BUDGET_S
    assert gc.STARTUP_S >= 10  # importing torch, CUDA initialisation, nvidia-smi
    names = {s.name for s in steps}
    assert {"tests", "synth", "bench/knn.py", "bench/diffusion.py", "bench/fid.py"} <= names
    # the reference comparison (alone, phase 1) extends the budget by its own box
    for extra in ([], ["--reference-compile"]):
        steps = _plan(gc, tmp_path, "--reference", str(tmp_path / "ref"), *extra)
        ref = sum(s.limit_s for s in steps if s.phase == 1)
        assert ref > 0 and gc.default_budget(steps) == gc.BUDGET_S + ref
        assert gc.critical_path_s(steps) + gc.STARTUP_S <= gc.default_budget(steps)


def test_budget_counts_from_the_start_not_after_reading_the_hardware(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc = _module()

    def slow_hardware() -> dict:
        time.sleep(3)  # CUDA initialisation and nvidia-smi on a GPU machine
        return {"cpu": "stub"}

    monkeypatch.setattr(gc, "hardware", slow_hardware)
    py = sys.executable
    args = gc.parse_args(["--cpu-smoke", "--results", str(tmp_path / "r.jsonl"),
                          "--budget-s", "14"])
    steps = [gc.Step("bench/a", [py, "-c", "print(1)"], 30, "bench")]
    assert gc.run_all(args, steps, tmp_path / "work") == 0
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["limit_s"] <= 11  # 14 s less the 3 s spent before it, not the whole 14


def test_results_file_keeps_its_earlier_lines(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed bench/results/<gpu>.jsonl is history the README cites by line number: a
    run appends its lines after the file's own, rewriting it atomically after each step."""
    gc = _module()
    monkeypatch.setattr(gc, "hardware", lambda: {"cpu": "stub"})
    res = tmp_path / "r.jsonl"
    earlier = '{"step": "old-1", "status": "ok"}\n{"step": "old-2", "note": "no newline"}'
    res.write_text(earlier)
    py = sys.executable
    steps = [gc.Step("bench/a", [py, "-c", "print(1)"], 30, "bench"),
             gc.Step("bench/b", [py, "-c", "print(2)"], 30, "bench")]
    args = gc.parse_args(["--cpu-smoke", "--results", str(res)])
    assert gc.run_all(args, steps, tmp_path / "work") == 0
    text = res.read_text()
    assert text.startswith(earlier + "\n")
    rows = [json.loads(x) for x in text.splitlines()]
    assert [r["step"] for r in rows] == ["old-1", "old-2", "bench/a", "bench/b"]
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary name, then renamed
    # a second run appends again
    assert gc.run_all(args, steps[:1], tmp_path / "work2") == 0
    assert [json.loads(x)["step"] for x in res.read_text().splitlines()] == [
        "old-1", "old-2", "bench/a", "bench/b", "bench/a"]


def test_a_steps_output_is_on_disk_while_it_runs(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest -v's outcomes must survive a step cut at its limit: stdout goes to the step's
    .out file as it is written, not to a pipe read at the end."""
    gc = _module()
    monkeypatch.setattr(gc, "hardware", lambda: {"cpu": "stub"})
    py = sys.executable
    cut = gc.Step("bench/cut", [py, "-c", "import time; print('first'); time.sleep(60)"], 4,
                  "bench")
    args = gc.parse_args(["--cpu-smoke", "--results", str(tmp_path / "r.jsonl")])
    rc: list[int] = []
    th = threading.Thread(target=lambda: rc.append(gc.run_all(args, [cut], tmp_path / "w")))
    th.start()  # not the main thread: no signal handlers, which only the main thread may set
    out, seen = tmp_path / "w" / "logs" / "bench_cut.out", False
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not seen:
        seen = out.is_file() and "first" in out.read_text()
        time.sleep(0.05)
    th.join(30)
    assert seen, "the step's stdout was not on disk while it ran"
    assert rc == [1]
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["status"] == "timeout" and "first" in row["stdout_tail"]


_PARENT = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)
gc.hardware = lambda: {"cpu": "stub"}
py = sys.executable
sleeper = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
           "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(f'{os.getpid()} "
           "{c.pid}'); time.sleep(60)")
steps = [gc.Step("bench/sleep", [py, "-c", sleeper, sys.argv[2]], 120, "bench"),
         gc.Step("bench/after", [py, "-c", "print(1)"], 30, "bench")]
args = gc.parse_args(["--cpu-smoke", "--results", sys.argv[3]])
sys.exit(gc.run_all(args, steps, Path(sys.argv[4])))
"""


def _alive(pid: int) -> bool:
    try:  # a zombie waiting for init to reap it has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_kills_the_steps_and_writes_them_interrupted(tmp_path: Path,
                                                              sig: signal.Signals) -> None:
    """Ctrl-C or a kill of the check: its steps (own sessions, so not reached by the terminal's
    signal) and what they started are killed, the step in flight gets an ``interrupted`` line,
    the steps after it do not run, and the check exits non-zero at once."""
    pids, res = tmp_path / "pids", tmp_path / "r.jsonl"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(SCRIPT), str(pids), str(res),
                               str(tmp_path / "w")], start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pids.is_file() and pids.read_text()):
            assert parent.poll() is None, "gpu_check ended before its step started"
            time.sleep(0.05)
        children = [int(p) for p in pids.read_text().split()]
        parent.send_signal(sig)
        try:
            rc = parent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gpu_check still runs 20 s after {sig.name}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.05)
        assert not [p for p in children if _alive(p)], "the step or its child survived"
        rows = [json.loads(x) for x in res.read_text().splitlines()] if res.is_file() else []
        assert [(r["step"], r["status"]) for r in rows] == [("bench/sleep", "interrupted")]
        assert rows[0]["signal"] == sig.name and rows[0]["wall_s"] < 60
        assert rc == 128 + sig  # not killed by the signal's default action: handled, then exit
    finally:
        for pid in (parent.pid, *children):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_lanes_of_a_phase_run_at_the_same_time(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gc = _module()
    # on a GPU machine hardware() initialises CUDA and runs nvidia-smi: time only the lanes
    monkeypatch.setattr(gc, "hardware", lambda: {"cpu": "stub"})
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
