"""gpu-check: the one command to run on a CUDA machine after installing gen_ad.

    make gpu-check                       # with the project's venv
    make gpu-check PY=python3            # a machine with torch preinstalled (no venv, no registry)
    python3 scripts/gpu_check.py [--patches DIR] [--reference DIR] [--tests gpu|all]
                                 [--budget-s S] [--dry-run | --cpu-smoke]

Each step is time-boxed (its own limit, and never past the total ``--budget-s``), in phases:

0. the benches whose figures are the GPU rows of the performance table, alone on the GPU
   (``bench/knn.py``: exact KNN 1M x 768; ``bench/diffusion.py``: AnoDDPM vs the plain loops in
   two rounds, DDPM training images/s), beside two CPU lanes: the synthetic tissue written by
   ``gen-ad synth`` (one core; unless ``--patches DIR``, class subfolders such as ``normal/``)
   and, with ``--reference DIR`` (a stylegan2-ada-pytorch checkout), the build of its CUDA ops;
1. with ``--reference``: StyleGAN2 training gen_ad vs the reference, alone;
2. the ``gpu``-marked tests (``--tests gpu``, the default; ``--tests all``: the whole suite but
   ``slow``/``network``, which takes longer than the 8 minutes) beside a one-minute training
   (``train.max_minutes``) of every family with its GPU config (``configs/<family>/pcam64.yaml``:
   DDPM in bf16, StyleGAN2 with its float16 top layers), all at once: these share the machine,
   so their speeds are not figures;
3. the remaining ``bench/*.py`` on CUDA, one after another, beside the CPU-only benches (fault
   injection, data-loading memory, synthetic-tissue throughput), one lane each.

The default total budget (``--budget-s``) is 8 minutes, which the time boxes fit on their
critical path (:func:`critical_path_s`, plus :data:`STARTUP_S`), counted from the script's start;
plus the time boxes of the optional reference comparison (``--reference``; ``--reference-compile``)
and more when the boxes add up to more (``--tests all``, longer ``--train-minutes``).

Every step writes one JSON line (status, wall time, command, settings, phase and lane, the load
average when it ended, the machine's hardware, and the step's own result: test counts, training
statistics, the bench's JSON line) to ``bench/results/<gpu-name>.jsonl``, after the lines the file
already holds (it is rewritten atomically after each step: its earlier lines, then this run's;
``--results`` to change). Each step's stdout and stderr go to ``<work>/run-<time>/logs/`` as it
runs. SIGINT or SIGTERM kills the running steps' process groups and writes them as
``interrupted``. The script needs no installed package: it runs ``gen_ad`` from this checkout
(through ``PYTHONPATH``) with the interpreter that runs it. ``--cpu-smoke`` runs the same steps
on the CPU with tiny settings (tests its logic); ``--dry-run`` prints the plan and runs nothing.
Exit status: 0 when every step passed, 1 when one failed, timed out or was skipped, 2 for a usage
error, 128 + the signal's number when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

UTC = timezone.utc  # datetime.UTC is Python 3.11+; requires-python is 3.10

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("wgan", "stylegan2", "ddpm")
BUDGET_S = 480.0  # the whole check on one recent GPU (issue 13: at most 8 minutes)
STARTUP_S = 15.0  # the script's own start-up (importing torch, reading the hardware), in BUDGET_S
# bench script -> (arguments on a GPU, limit in s); each prints one JSON line on stdout. The boxes
# are sized so that the default plan fits BUDGET_S (tests: test_default_plan_fits_its_budget)
BENCH_GPU: dict[str, tuple[list[str], int]] = {
    # the GPU rows of the performance table (issue 17), alone on the GPU
    "knn.py": (["--device", "cuda"], 40),  # 1M x 768, k = 200, 1000 and 100 queries (12 s, H200)
    # two interleaved rounds, no compiled training: about 100-150 s on an H200 (three rounds and
    # --train-compile, 170-220 s, do not fit the 8 minutes; run them alone for that figure)
    "diffusion.py": (["--device", "cuda", "--only", "train", "--batch", "128",
                      "--train-steps", "20", "--repeat", "1", "--rounds", "2"], 160),
    # after the tests and the trainings
    "stylegan2.py": (["--smoke"], 45),
    "wgan.py": (["--device", "cuda", "--reps", "2"], 45),
    "fid.py": (["--device", "cuda", "--n", "256"], 55),
    # CPU-only benches (nothing of theirs runs on CUDA), beside the last GPU benches
    "faults.py": (["--smoke"], 120),  # fault injection: its tiny runs pin a few cores
    "memory.py": (["--sizes", "1000", "4000"], 90),  # data-loading memory (41 s on 2 cores)
    "synthetic.py": (["--n", "512", "--repeats", "1"], 45),  # one CPU thread (18 s on 2 cores)
    # the evaluation engine's memory against the number of scored images (CPU; its full sizes
    # take minutes and 3 GB: run `python bench/evaluation.py` alone for that figure)
    "evaluation.py": (["--smoke"], 60),
}
ALONE = ("knn.py", "diffusion.py")
CPU_ONLY = ("faults.py", "memory.py", "synthetic.py", "evaluation.py")
UNTUNED = (["--smoke"], 90)  # a bench/*.py not listed above runs in its smoke mode
SYNTH_S = 120  # gen-ad synth of 2048 64-px patches on one core (56 s on a shared 2-core CPU)
TESTS_S = {"gpu": 120, "all": 360}  # the gpu-marked tests (55) or the suite, beside the trainings
TRAIN_STARTUP_S = 60  # a training's imports, data and first CUDA kernels, on top of its minutes
REFERENCE_OPS_S = 180  # the reference's CUDA ops build (34 s on the H200), beside phase 0
BENCH_NOTES = {
    "stylegan2.py": "tiny settings on CUDA (full training step with R1 through ADA, projection): "
                    "its full GPU grid (E/F at 64-512, 1000-step projections) takes longer than "
                    "this check; run `python bench/stylegan2.py` alone for those figures",
    "diffusion.py": "two rounds, no compiled training (8-minute budget): run `python "
                    "bench/diffusion.py --device cuda --only train --train-compile` alone for "
                    "three rounds and the speed.compile_train figure",
    "faults.py": "CPU-only bench (fault injection into tiny CPU runs), smoke mode",
    "memory.py": "CPU-only bench (data-loading memory)",
    "synthetic.py": "CPU-only bench (one thread)",
    "evaluation.py": "CPU-only bench (evaluation memory), smoke mode: run `python "
                     "bench/evaluation.py` alone for the 32,000-image figure",
}


@dataclass
class Step:
    """One time-boxed command and how to read its result.

    Phases run one after another; within a phase each lane runs its steps in order, and the lanes
    run at the same time (``phase``/``lane``)."""

    name: str
    cmd: list[str]
    limit_s: int
    kind: str  # tests | synth | train | bench | build
    settings: dict[str, Any] = field(default_factory=dict)
    phase: int = 0
    lane: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of the check's own environment


def _gen_ad(*args: str) -> list[str]:
    return [sys.executable, "-m", "gen_ad.cli", *args]


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps for a GPU run or (``--cpu-smoke``) a tiny CPU run, in four phases.

    0. the GPU-figure benches alone on the GPU (KNN, diffusion; lane 0), beside the build of the
       reference's CUDA ops (lane 1, with ``--reference``) and the synthetic patch folder
       (lane 2, without ``--patches``), both on the CPU;
    1. ``bench/stylegan2.py --reference`` alone (with ``--reference``);
    2. the tests beside a one-minute training of every family (one lane each): the lanes share
       the machine, so their speeds are not figures;
    3. the remaining benches, one after another, beside the CPU-only benches (a lane each).
    """
    smoke, ref = args.cpu_smoke, args.reference
    steps = [_bench_step(s, 0, 0, smoke) for s in ALONE]
    if ref:
        steps.append(Step("reference-ops", [sys.executable, str(ROOT / "bench" / "stylegan2.py"),
                                            "--reference", ref, "--build-ops"],
                          60 if smoke else REFERENCE_OPS_S, "build", {"reference": ref}, 0, 1))
        extra = ["--smoke", "--cpu"] if smoke else ["--steps", str(args.reference_steps)]
        extra += ["--compile"] if args.reference_compile else []
        # three interleaved rounds per side since the harness interleaves (was one: 200 s)
        limit = (120 if smoke else 300) + (240 if args.reference_compile else 0)
        steps.append(Step("bench/stylegan2.py --reference", [
            sys.executable, str(ROOT / "bench" / "stylegan2.py"), "--reference", ref, *extra],
            limit, "bench", {"reference": ref, "compile": args.reference_compile}, 1, 0))
    patches = Path(args.patches) if args.patches else work / "synth"
    if not args.patches:
        n, size = (24, 32) if smoke else (2048, 64)
        steps.append(Step("synth", _gen_ad(
            "synth", "--out", str(patches), "--n", str(n), "--size", str(size),
            "--anomaly-fraction", "0.25", "--seed", "0"), 60 if smoke else SYNTH_S, "synth",
            {"n": n, "size": size}, 0, 2))
    # one thread per xdist worker: the workers already fill the cores (torch would start one
    # thread per core in each, and the lanes beside them would crawl)
    steps.append(Step("tests", _tests_cmd(args), 120 if smoke else TESTS_S[args.tests], "tests",
                      {"selection": args.tests}, 2, 0, {"OMP_NUM_THREADS": "1"}))
    steps += [_train_step(fam, patches, work, args.train_minutes, smoke, lane)
              for lane, fam in enumerate(FAMILIES, start=1)]
    rest = sorted(p.name for p in (ROOT / "bench").glob("*.py")  # _*.py: shared helpers
                  if p.name not in (*ALONE, *CPU_ONLY) and not p.name.startswith("_"))
    steps += [_bench_step(s, 3, 0, smoke) for s in rest]
    steps += [_bench_step(s, 3, lane, smoke) for lane, s in enumerate(CPU_ONLY, start=1)]
    return steps


def critical_path_s(steps: list[Step]) -> int:
    """The plan's longest possible run: over its phases (one after another), the slowest lane
    (the lanes run at once), each lane the sum of its steps' time boxes."""
    lanes: dict[tuple[int, int], int] = {}
    for s in steps:
        lanes[s.phase, s.lane] = lanes.get((s.phase, s.lane), 0) + s.limit_s
    phases: dict[int, int] = {}
    for (phase, _), total in lanes.items():
        phases[phase] = max(phases.get(phase, 0), total)
    return sum(phases.values())


def default_budget(steps: list[Step]) -> float:
    """8 minutes, plus the time boxes of the reference comparison when it is asked for (its
    phase 1 runs alone; its ops build beside phase 0 and is not added); more when the plan's
    boxes add up to more (``--tests all``, longer trainings): its critical path and start-up."""
    return max(BUDGET_S + sum(s.limit_s for s in steps if s.phase == 1),
               critical_path_s(steps) + STARTUP_S)


def _tests_cmd(args: argparse.Namespace) -> list[str]:
    # -v (and PYTHONUNBUFFERED): each test's outcome is in the step's .out file as it ends, also
    # when the step is cut at its limit
    base = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    if args.cpu_smoke:  # the GPU tests' CPU twins would take minutes here: one quick test
        return [*base, "tests/gpu/test_knn_gpu.py::test_gpu_search_returns_the_cpu_neighbours"
                       "[l2-torch-cpu]"]
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    xdist = ["-n", str(workers)] if importlib.util.find_spec("xdist") is not None else []
    if args.tests == "gpu":
        return [*base, *xdist, "-m", "gpu", *gpu_test_files()]
    return [*base, *xdist, "-m", "not slow and not network", "tests"]


def _bench_step(script: str, phase: int, lane: int, smoke: bool) -> Step:
    gpu_args, limit = BENCH_GPU.get(script, UNTUNED)
    extra = _smoke_bench_args(script, gpu_args) if smoke else gpu_args
    note = {"note": BENCH_NOTES.get(script, "not tuned for gpu-check: its smoke mode")
            } if (script in BENCH_NOTES or script not in BENCH_GPU) and not smoke else {}
    return Step(f"bench/{script}", [sys.executable, str(ROOT / "bench" / script), *extra],
                120 if smoke else limit, "bench", note, phase, lane)


def gpu_test_files() -> list[str]:
    """Test files that hold ``gpu``-marked tests (``--tests gpu``: collecting only these keeps
    the step independent of packages that other test modules import)."""
    files = (p for p in sorted((ROOT / "tests").rglob("test_*.py"))
             if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace"))
    return [str(p.relative_to(ROOT)) for p in files]


def _smoke_bench_args(script: str, gpu_args: list[str]) -> list[str]:
    """A bench's own ``--smoke`` mode, forced onto the CPU."""
    if script == "stylegan2.py":
        return ["--smoke", "--cpu"]
    if script in CPU_ONLY or script not in BENCH_GPU:
        return ["--smoke"]
    return ["--smoke", *(["--device", "cpu"] if "--device" in gpu_args else [])]


def _train_step(fam: str, patches: Path, work: Path, minutes: float, smoke: bool,
                lane: int) -> Step:
    config = ROOT / "configs" / fam / ("demo.yaml" if smoke else "pcam64.yaml")
    over = [f"data.train={patches}", "data.val=null", f"out={work / 'runs' / fam}",
            "train.fid_every=0", "train.sample_every=0", "train.log_every=10"]
    if smoke:
        over += ["data.size=32", "train.max_steps=2", "train.cpu=true", "train.log_every=1",
                 "train.ckpt_every=0"]
    else:
        over += [f"train.max_minutes={minutes}"]
    # the run's own startup (imports, data, first CUDA kernels) comes on top of its minutes
    limit = 120 if smoke else int(minutes * 60 + TRAIN_STARTUP_S)
    return Step(f"train/{fam}", _gen_ad("train", fam, "--config", str(config), *over), limit,
                "train", {"config": str(config.relative_to(ROOT)), "overrides": over}, 2, lane)


def hardware() -> dict[str, Any]:
    """The machine: GPU(s), driver, CUDA, torch, CPU, and the checkout's commit."""
    import torch

    from gen_ad.utils.hardware import cpu_name

    hw: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                          "cuda_runtime": torch.version.cuda, "cpu": cpu_name(),
                          "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                  gpu_memory_gib=round(props.total_memory / 2**30, 1),
                  gpu_capability=f"{props.major}.{props.minor}", driver=_smi("driver_version"))
    # a copy without .git (a checkout shipped to a GPU box) can name its commit in GPU_CHECK_COMMIT
    hw["commit"] = (_run_quiet(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
                    or os.environ.get("GPU_CHECK_COMMIT"))
    return hw


def _smi(key: str) -> str | None:
    out = _run_quiet(["nvidia-smi", f"--query-gpu={key}", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _run_quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace",
                              timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def read_result(step: Step, stdout: str) -> Any:
    """What a step produced: test counts, the bench's JSON line, the run's last statistics."""
    if step.kind == "tests":
        last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", last)
        return {word.rstrip("s") if word.startswith("error") else word: int(n)
                for n, word in found}
    if step.kind in ("bench", "build"):
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    if step.kind == "train":
        out = next(o.split("=", 1)[1] for o in step.settings["overrides"] if o.startswith("out="))
        return train_summary(Path(out) / "stats.jsonl")
    return None


def train_summary(stats: Path) -> dict[str, Any] | None:
    """Steps, images and the median logged images/s of a run (``stats.jsonl``)."""
    if not stats.is_file():
        return None
    rows = [json.loads(ln) for ln in stats.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    rates = sorted(r["img_per_s"] for r in rows if "img_per_s" in r)
    last = rows[-1]
    return {"steps": last["step"], "kimg": last.get("kimg"),
            "img_per_s_median": rates[len(rates) // 2] if rates else None,
            "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


def outcome(step: Step, status: str, returncode: int | None, t0: float, limit: int,
            log: Path) -> dict[str, Any]:
    """A finished (or cut) step's record, read from its log files (stderr ``.log``, stdout
    ``.out``); the result of a step that was cut may be partial or ``None``."""
    out = log.with_suffix(".out").read_text(encoding="utf-8", errors="replace") if log.with_suffix(
        ".out").is_file() else ""
    rec: dict[str, Any] = {"status": status, "returncode": returncode,
                           "wall_s": round(time.perf_counter() - t0, 1), "limit_s": limit,
                           "log": str(log)}
    if status != "ok":
        rec["stderr_tail"] = log.read_text(encoding="utf-8", errors="replace")[-1500:] \
            if log.is_file() else ""
        rec["stdout_tail"] = out[-3000:]
    try:
        rec["result"] = read_result(step, out)
    except (ValueError, KeyError, StopIteration):  # a cut line, a stats row without its keys
        rec["result"] = None
    rec["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    return rec


def write_lines(path: Path, lines: list[dict[str, Any]], before: str = "") -> None:
    """Rewrite the results file atomically (temporary name, then rename): the text it held
    before this run (``before``, kept as it was), then this run's lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    head = before if not before or before.endswith("\n") else before + "\n"
    tmp.write_text(head + "".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    os.replace(tmp, path)


def results_path(args: argparse.Namespace, hw: dict[str, Any]) -> Path:
    if args.results:
        return Path(args.results)
    name = hw.get("gpu") or ("cpu-smoke" if args.cpu_smoke else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return ROOT / "bench" / "results" / f"{slug}.jsonl"


def child_env() -> dict[str, str]:
    """This checkout first on PYTHONPATH (no install needed), offline hub, no tokenizer noise,
    unbuffered output (a step's log files grow as it runs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("ACCELERATE_DISABLE_RICH", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", default=None, help="patch folder (default: synthetic tissue)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total time limit from the script's start (default 480 s, plus the "
                    "reference comparison's time box with --reference; more with --tests all)")
    ap.add_argument("--tests", choices=("gpu", "all"), default="gpu",
                    help="the gpu-marked tests (default) or the whole suite, GPU tests included "
                    "(longer than the 8 minutes: its time box is 6 minutes)")
    ap.add_argument("--reference", default=None, metavar="DIR",
                    help="a stylegan2-ada-pytorch checkout: StyleGAN2 speed against it")
    ap.add_argument("--reference-steps", type=int, default=16,
                    help="timed training steps per setting of the reference comparison")
    ap.add_argument("--reference-compile", action="store_true",
                    help="also time gen_ad with speed.compile_train in the reference comparison "
                    "(adds the compilation, about 4 min, to its time box)")
    ap.add_argument("--train-minutes", type=float, default=1.0, help="per family")
    ap.add_argument("--work", default=None, help="scratch folder; each run writes a new "
                    "run-<UTC time>/ in it (default checkpoints/gpu-check)")
    ap.add_argument("--results", default=None, help="JSONL file, appended to (default "
                    "bench/results/<gpu>.jsonl)")
    ap.add_argument("--only", default=None, help="comma-separated step-name prefixes to run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON, run nothing")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny settings on the CPU")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()  # the budget counts from here
    args = parse_args(argv)
    base = Path(args.work) if args.work else ROOT / "checkpoints" / "gpu-check"
    # a fresh folder per run: training never meets an earlier run's folder (that needs --resume)
    work = base / datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    steps = plan(args, work)
    if args.budget_s is None:
        args.budget_s = default_budget(steps)
    if args.only:
        keep = tuple(p.strip() for p in args.only.split(","))
        steps = [s for s in steps if s.name.startswith(keep)]
    if critical_path_s(steps) + STARTUP_S > args.budget_s:
        print(f"gpu-check: the time boxes add up to {critical_path_s(steps)} s (+ {STARTUP_S:.0f}"
              f" s start-up) on the critical path, over --budget-s {args.budget_s:.0f}: the last "
              "steps may be cut or skipped", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({"budget_s": args.budget_s, "critical_path_s": critical_path_s(steps),
                          "startup_s": STARTUP_S, "steps": [asdict(s) for s in steps]}))
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (use --cpu-smoke to test the script "
              "itself on the CPU)", file=sys.stderr)
        return 2
    return run_all(args, steps, work, t0)


@dataclass
class Flight:
    """A step whose process is running: what an interrupt kills and records."""

    proc: subprocess.Popen[bytes]
    step: Step
    beside: list[str]
    t0: float
    limit: int
    log: Path


class Check:
    """One run's shared state: the results file, this run's lines, the steps in flight.

    Lane threads start and finish steps under ``lock``; SIGINT/SIGTERM (:meth:`interrupt`, in
    the main thread) kills every step in flight, writes it as ``interrupted`` and exits."""

    def __init__(self, args: argparse.Namespace, work: Path, hw: dict[str, Any],
                 t0: float) -> None:
        self.args, self.work, self.hw, self.t0 = args, work, hw, t0
        self.out = results_path(args, hw)
        self.before = self.out.read_text(encoding="utf-8", errors="replace") \
            if self.out.is_file() else ""
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.env = child_env()
        self.lock = threading.RLock()  # re-entrant: a second signal meets the first's handler
        self.done: dict[int, dict[str, Any]] = {}
        self.flights: dict[int, Flight] = {}
        self.stop = threading.Event()

    def lane(self, items: list[tuple[int, Step]], beside: list[str]) -> None:
        """Run a lane's steps in order, each within what is left of the budget."""
        for i, step in items:
            if self.stop.is_set():
                return
            left = int(self.args.budget_s - (time.perf_counter() - self.t0))
            if left < 10:
                self.record(i, step, beside, {"status": "skipped",
                                              "reason": "total budget spent"})
                continue
            rec = self.run_step(i, step, beside, min(step.limit_s, left))
            if rec is not None:
                self.record(i, step, beside, rec)

    def run_step(self, i: int, step: Step, beside: list[str], limit: int
                 ) -> dict[str, Any] | None:
        """Run one step in its own process group, its stdout and stderr straight to its log
        files; kill the whole group at its limit. ``None`` when interrupted (recorded then)."""
        log = self.work / "logs" / (re.sub(r"[^A-Za-z0-9.-]+", "_", step.name) + ".log")
        t0 = time.perf_counter()
        with log.open("wb") as err, log.with_suffix(".out").open("wb") as out:
            with self.lock:
                if self.stop.is_set():
                    return None
                try:
                    proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**self.env, **step.env},
                                            stdout=out, stderr=err, start_new_session=True)
                except OSError as e:  # a missing interpreter or script: the lane goes on
                    return {"status": "failed", "reason": f"could not start: {e}",
                            "limit_s": limit, "log": str(log)}
                self.flights[i] = Flight(proc, step, beside, t0, limit, log)
            try:
                proc.wait(timeout=limit)
                status = "ok" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                kill_group(proc)
                status = "timeout"
        with self.lock:
            del self.flights[i]
            if i in self.done:  # written as interrupted
                return None
        return outcome(step, status, proc.returncode, t0, limit, log)

    def record(self, i: int, step: Step, beside: list[str], rec: dict[str, Any]) -> None:
        """Add a step's line and rewrite the results file (its earlier lines, then this run's)."""
        line = {"check": "gpu-check", "started": self.started, "step": step.name,
                "mode": "cpu-smoke" if self.args.cpu_smoke else "gpu", "command": step.cmd,
                "settings": step.settings, "phase": step.phase, "lane": step.lane,
                "beside": beside, **rec, "hardware": self.hw}
        with self.lock:
            self.done[i] = line
            write_lines(self.out, self.lines(), self.before)
        print(f"gpu-check: {step.name}: {rec['status']} ({rec.get('wall_s', 0)} s)", flush=True)

    def lines(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self.done[k] for k in sorted(self.done)]

    def interrupt(self, signum: int, _frame: object) -> None:
        """Signal handler: kill the steps in flight, write them as ``interrupted``, exit."""
        name = signal.Signals(signum).name
        with self.lock:
            self.stop.set()
            flights = dict(self.flights)
            for f in flights.values():
                kill_group(f.proc)
            for i, f in flights.items():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    f.proc.wait(timeout=5)
                rec = outcome(f.step, "interrupted", f.proc.returncode, f.t0, f.limit, f.log)
                self.record(i, f.step, f.beside, {**rec, "signal": name})
        print(f"gpu-check: interrupted by {name}: {len(flights)} step(s) killed; results: "
              f"{self.out}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a step's process group (the step and everything it started), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_all(args: argparse.Namespace, steps: list[Step], work: Path,
            t0: float | None = None) -> int:
    """Run the plan phase by phase, the lanes of a phase at once, within ``--budget-s`` counted
    from ``t0`` (the script's start; default: now, before reading the hardware)."""
    t0 = time.perf_counter() if t0 is None else t0
    if args.budget_s is None:
        args.budget_s = default_budget(steps)
    check = Check(args, work, hardware(), t0)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    main_thread = threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, check.interrupt) for s in (signal.SIGINT, signal.SIGTERM)
              } if main_thread else {}
    try:
        for phase in sorted({s.phase for s in steps}):
            run_phase(check, [(i, s) for i, s in enumerate(steps) if s.phase == phase])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    lines = check.lines()
    bad = [r["step"] for r in lines if r["status"] != "ok"]
    print(f"gpu-check: {len(lines) - len(bad)}/{len(lines)} steps ok; results: {check.out}"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def run_phase(check: Check, items: list[tuple[int, Step]]) -> None:
    """One phase: a daemon thread per lane (an interrupt exits without waiting for them)."""
    lanes: dict[int, list[tuple[int, Step]]] = {}
    for i, s in items:
        lanes.setdefault(s.lane, []).append((i, s))
    threads = []
    for key, lane in sorted(lanes.items()):
        beside = [s.name for k, other in sorted(lanes.items()) if k != key for _, s in other]
        threads.append(threading.Thread(target=check.lane, args=(lane, beside), daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join()


if __name__ == "__main__":
    sys.exit(main())
