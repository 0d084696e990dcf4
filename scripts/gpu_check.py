"""gpu-check: the one command to run on a CUDA machine after installing gen_ad.

    make gpu-check                       # with the project's venv
    make gpu-check PY=python3            # a machine with torch preinstalled (no venv, no registry)
    python3 scripts/gpu_check.py [--patches DIR] [--reference DIR] [--tests all|gpu]
                                 [--budget-s S] [--dry-run | --cpu-smoke]

Each step is time-boxed (its own limit, and never past the total ``--budget-s``), in phases:

0. the benches whose figures are the GPU rows of the performance table, alone on the GPU
   (``bench/knn.py``: exact KNN 1M x 768; ``bench/diffusion.py``: AnoDDPM vs a plain fp32 loop,
   DDPM training images/s);
1. with ``--reference DIR`` (a stylegan2-ada-pytorch checkout): StyleGAN2 training gen_ad vs
   the reference, alone (its CUDA ops are built beside phase 0);
2. a patch folder: ``--patches DIR`` (class subfolders such as ``normal/``), else synthetic
   tissue written by ``gen-ad synth``;
3. the test suite (``--tests all``: everything but ``slow``/``network``, GPU tests included;
   ``gpu``: only ``gpu``-marked tests) beside a one-minute training (``train.max_minutes``) of
   every family with its GPU config (``configs/<family>/pcam64.yaml``: DDPM in bf16, StyleGAN2
   with its float16 top layers), all at once: these share the machine, so their speeds are not
   figures;
4. the remaining ``bench/*.py`` on CUDA, one after another, beside the CPU-only benches (fault
   injection, data-loading memory), which need a few cores and no GPU.

The default total budget (``--budget-s``) is 8 minutes, plus the time boxes of the optional
reference comparison (``--reference``: its build and comparison; ``--reference-compile``).

Every step writes one JSON line (status, wall time, command, settings, phase and lane, the load
average when it ended, the machine's hardware, and the step's own result: test counts, training
statistics, the bench's JSON line) to ``bench/results/<gpu-name>.jsonl`` (rewritten atomically
after each step; ``--results`` to change). The script needs no installed package: it runs
``gen_ad`` from this checkout (through ``PYTHONPATH``) with the interpreter that runs it.
``--cpu-smoke`` runs the same steps on the CPU with tiny settings (tests its logic); ``--dry-run``
prints the plan and runs nothing.
Exit status: 0 when every step passed, 1 when one failed or timed out, 2 for a usage error.
"""

from __future__ import annotations

import argparse
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("wgan", "stylegan2", "ddpm")
# bench script -> (arguments on a GPU, limit in s); each prints one JSON line on stdout
BENCH_GPU: dict[str, tuple[list[str], int]] = {
    # the GPU rows of the performance table (issue 17), alone on the GPU
    "knn.py": (["--device", "cuda"], 120),  # 1M x 768, k = 200, 1000 and 100 queries
    "diffusion.py": (["--device", "cuda", "--only", "train", "--batch", "128",
                      "--train-steps", "20", "--repeat", "1", "--train-compile"], 300),
    # after the suite and the trainings
    "stylegan2.py": (["--smoke"], 90),
    "wgan.py": (["--device", "cuda", "--reps", "2"], 90),
    "fid.py": (["--device", "cuda", "--n", "256"], 60),
    "synthetic.py": (["--n", "512", "--repeats", "1"], 30),
    # CPU-only benches (nothing of theirs runs on CUDA), beside the last GPU benches
    "faults.py": (["--smoke"], 120),  # fault injection: its tiny runs pin the CPU
    "memory.py": (["--sizes", "1000", "4000"], 120),  # data-loading memory
}
ALONE = ("knn.py", "diffusion.py")
BUDGET_S = 480.0  # the whole check on one recent GPU (issue 13: at most 8 minutes)
CPU_ONLY = ("faults.py", "memory.py")
UNTUNED = (["--smoke"], 90)  # a bench/*.py not listed above runs in its smoke mode
BENCH_NOTES = {
    "stylegan2.py": "tiny settings on CUDA (full training step with R1 through ADA, projection): "
                    "its full GPU grid (E/F at 64-512, 1000-step projections) takes longer than "
                    "this check; run `python bench/stylegan2.py` alone for those figures",
    "faults.py": "CPU-only bench (fault injection into tiny CPU runs), smoke mode",
    "memory.py": "CPU-only bench (data-loading memory)",
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
    """The steps for a GPU run or (``--cpu-smoke``) a tiny CPU run, in five phases.

    0. the GPU-figure benches alone on the GPU (KNN, diffusion), beside the build of the
       reference's CUDA ops when ``--reference`` is given;
    1. ``bench/stylegan2.py --reference`` alone (with ``--reference``);
    2. the synthetic patch folder (without ``--patches``);
    3. the test suite beside a one-minute training of every family (one lane each): the lanes
       share the machine, so their speeds are not figures;
    4. the remaining benches, one after another, beside the CPU-only benches.
    """
    smoke, ref = args.cpu_smoke, args.reference
    steps = [_bench_step(s, 0, 0, smoke) for s in ALONE]
    if ref:
        steps.append(Step("reference-ops", [sys.executable, str(ROOT / "bench" / "stylegan2.py"),
                                            "--reference", ref, "--build-ops"],
                          60 if smoke else 240, "build", {"reference": ref}, 0, 1))
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
            "--anomaly-fraction", "0.25", "--seed", "0"), 60, "synth", {"n": n, "size": size},
            2, 0))
    # one thread per xdist worker: the workers already fill the cores (torch would start one
    # thread per core in each, and the lanes beside them would crawl)
    steps.append(Step("tests", _tests_cmd(args), 120 if smoke else 360, "tests",
                      {"selection": args.tests}, 3, 0, {"OMP_NUM_THREADS": "1"}))
    steps += [_train_step(fam, patches, work, args.train_minutes, smoke, lane)
              for lane, fam in enumerate(FAMILIES, start=1)]
    rest = sorted(p.name for p in (ROOT / "bench").glob("*.py")  # _*.py: shared helpers
                  if p.name not in (*ALONE, *CPU_ONLY) and not p.name.startswith("_"))
    steps += [_bench_step(s, 4, 0, smoke) for s in rest]
    steps += [_bench_step(s, 4, 1, smoke) for s in CPU_ONLY]
    return steps


def default_budget(steps: list[Step]) -> float:
    """8 minutes, plus the time boxes of the reference comparison when it is asked for (its
    phase 1 runs alone; its ops build beside phase 0 and is not added)."""
    return BUDGET_S + sum(s.limit_s for s in steps if s.phase == 1)


def _tests_cmd(args: argparse.Namespace) -> list[str]:
    # -v: each test's outcome is in the log as it ends, also when the step is cut at its limit
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
             if "mark.gpu" in p.read_text(errors="replace"))
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
    limit = 120 if smoke else int(minutes * 60 + 90)
    return Step(f"train/{fam}", _gen_ad("train", fam, "--config", str(config), *over), limit,
                "train", {"config": str(config.relative_to(ROOT)), "overrides": over}, 3, lane)


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
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_step(step: Step, limit: int, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one step in its own process group; kill the whole group at its limit."""
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**env, **step.env},
                                stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = "timeout"
        except BaseException:  # Ctrl-C or a kill of this script: take the step's group along
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    rec = {"status": status, "returncode": proc.returncode, "wall_s": round(
        time.perf_counter() - t0, 1), "limit_s": limit, "log": str(log)}
    log.with_suffix(".out").write_text(out or "")
    if status != "ok":
        rec["stderr_tail"] = log.read_text(errors="replace")[-1500:]
        rec["stdout_tail"] = (out or "")[-3000:]
    rec["result"] = read_result(step, out or "")
    return rec


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
    rows = [json.loads(ln) for ln in stats.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    rates = sorted(r["img_per_s"] for r in rows if "img_per_s" in r)
    last = rows[-1]
    return {"steps": last["step"], "kimg": last.get("kimg"),
            "img_per_s_median": rates[len(rates) // 2] if rates else None,
            "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


def write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    """Rewrite the results file atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    os.replace(tmp, path)


def results_path(args: argparse.Namespace, hw: dict[str, Any]) -> Path:
    if args.results:
        return Path(args.results)
    name = hw.get("gpu") or ("cpu-smoke" if args.cpu_smoke else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return ROOT / "bench" / "results" / f"{slug}.jsonl"


def child_env() -> dict[str, str]:
    """This checkout first on PYTHONPATH (no install needed), offline hub, no tokenizer noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("ACCELERATE_DISABLE_RICH", "1")
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", default=None, help="patch folder (default: synthetic tissue)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total time limit (default 480 s, plus the reference comparison's "
                    "time box with --reference)")
    ap.add_argument("--tests", choices=("all", "gpu"), default="all",
                    help="the whole suite (GPU tests included) or only the gpu-marked tests")
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
    ap.add_argument("--results", default=None, help="JSONL file (default bench/results/<gpu>)")
    ap.add_argument("--only", default=None, help="comma-separated step-name prefixes to run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON, run nothing")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny settings on the CPU")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
    if args.dry_run:
        print(json.dumps({"budget_s": args.budget_s, "steps": [asdict(s) for s in steps]}))
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (use --cpu-smoke to test the script "
              "itself on the CPU)", file=sys.stderr)
        return 2
    return run_all(args, steps, work)


def run_all(args: argparse.Namespace, steps: list[Step], work: Path) -> int:
    if args.budget_s is None:
        args.budget_s = default_budget(steps)
    hw = hardware()
    out = results_path(args, hw)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started, t0, env = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter(), \
        child_env()
    done: dict[int, dict[str, Any]] = {}
    guard = threading.Lock()

    def lane(items: list[tuple[int, Step]], beside: list[str]) -> None:
        for i, step in items:
            rec = run_one(args, step, t0, env, work, beside)
            rec = {"check": "gpu-check", "started": started, "step": step.name,
                   "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "command": step.cmd,
                   "settings": step.settings, "phase": step.phase, "lane": step.lane,
                   "beside": beside, **rec, "hardware": hw}
            with guard:
                done[i] = rec
                write_lines(out, [done[k] for k in sorted(done)])
            print(f"gpu-check: {step.name}: {rec['status']} ({rec.get('wall_s', 0)} s)",
                  flush=True)

    for phase in sorted({s.phase for s in steps}):
        lanes: dict[int, list[tuple[int, Step]]] = {}
        for i, s in enumerate(steps):
            if s.phase == phase:
                lanes.setdefault(s.lane, []).append((i, s))
        threads = []
        for key, items in sorted(lanes.items()):
            beside = [s.name for k, other in lanes.items() if k != key for _, s in other]
            threads.append(threading.Thread(target=lane, args=(items, beside)))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    lines = [done[k] for k in sorted(done)]
    bad = [r["step"] for r in lines if r["status"] != "ok"]
    print(f"gpu-check: {len(lines) - len(bad)}/{len(lines)} steps ok; results: {out}"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def run_one(args: argparse.Namespace, step: Step, t0: float, env: dict[str, str], work: Path,
            beside: list[str]) -> dict[str, Any]:
    """One step within what is left of the total budget (``skipped`` when under 10 s)."""
    left = int(args.budget_s - (time.perf_counter() - t0))
    if left < 10:
        return {"status": "skipped", "reason": "total budget spent"}
    log = work / "logs" / (re.sub(r"[^A-Za-z0-9.-]+", "_", step.name) + ".log")
    rec = run_step(step, min(step.limit_s, left), env, log)
    rec["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    return rec


if __name__ == "__main__":
    sys.exit(main())
