"""gpu-check: the one command to run on a CUDA machine after installing gen_ad.

    make gpu-check                       # with the project's venv
    make gpu-check PY=python3            # a machine with torch preinstalled (no venv, no registry)
    python3 scripts/gpu_check.py [--patches DIR] [--budget-s 480] [--dry-run | --cpu-smoke]

In order, each step time-boxed (its own limit, and never past the total ``--budget-s``):

1. the GPU tests (``pytest -m gpu`` over the test files that hold ``gpu``-marked tests: tests/gpu
   and the others);
2. a patch folder: ``--patches DIR`` (class subfolders such as ``normal/``), else synthetic
   tissue written by ``gen-ad synth``;
3. a one-minute training (``train.max_minutes``) of every family with its GPU config
   (``configs/<family>/pcam64.yaml``: DDPM in bf16, StyleGAN2 with its float16 top layers);
4. every ``bench/*.py`` on CUDA.

Every step appends one JSON line (status, wall time, command, settings, the machine's hardware,
and the step's own result: test counts, training statistics, the bench's JSON line) to
``bench/results/<gpu-name>.jsonl`` (rewritten atomically after each step; ``--results`` to
change). The script needs no installed package: it runs ``gen_ad`` from this checkout (through
``PYTHONPATH``) with the interpreter that runs it. ``--cpu-smoke`` runs the same steps on the CPU
with tiny settings (tests its logic); ``--dry-run`` prints the plan and runs nothing.
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
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("wgan", "stylegan2", "ddpm")
# bench script -> (arguments on a GPU, limit in s); each prints one JSON line on stdout
BENCH_GPU: dict[str, tuple[list[str], int]] = {
    "synthetic.py": (["--n", "512", "--repeats", "1"], 30),
    "wgan.py": (["--device", "cuda", "--reps", "2"], 60),
    "diffusion.py": (["--device", "cuda"], 60),
    "fid.py": (["--device", "cuda", "--n", "256"], 60),
    "knn.py": (["--n", "200000", "--queries", "500", "--exact-queries", "100"], 90),
    "stylegan2.py": (["--smoke"], 90),
    "faults.py": (["--smoke"], 90),  # CPU fault injection (its tiny runs pin the CPU)
    "memory.py": (["--sizes", "1000", "4000"], 90),  # data-loading memory (CPU)
}
UNTUNED = (["--smoke"], 90)  # a bench/*.py not listed above runs in its smoke mode
BENCH_NOTES = {
    "stylegan2.py": "tiny settings on CUDA (full training step with R1 through ADA, projection): "
                    "its full GPU grid (E/F at 64-512, 1000-step projections) takes longer than "
                    "this check; run `python bench/stylegan2.py` alone for those figures",
}


@dataclass
class Step:
    """One time-boxed command and how to read its result."""

    name: str
    cmd: list[str]
    limit_s: int
    kind: str  # tests | synth | train | bench
    settings: dict[str, Any] = field(default_factory=dict)


def _gen_ad(*args: str) -> list[str]:
    return [sys.executable, "-m", "gen_ad.cli", *args]


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps, in order, for a GPU run or (``--cpu-smoke``) a tiny CPU run."""
    smoke = args.cpu_smoke
    # 4 xdist workers share the GPU (the benchmark test's demo trains on the CPU meanwhile)
    xdist = ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, "-m", "gpu",
             *gpu_test_files()]
    if smoke:  # the GPU tests' CPU twins would take minutes here: one quick twin proves the wiring
        tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/gpu/test_knn_gpu.py::test_gpu_search_returns_the_cpu_neighbours"
                 "[l2-torch-cpu]"]
    steps = [Step("gpu-tests", tests, 90 if smoke else 210, "tests")]
    patches = Path(args.patches) if args.patches else work / "synth"
    if not args.patches:
        n, size = (24, 32) if smoke else (2048, 64)
        steps.append(Step("synth", _gen_ad("synth", "--out", str(patches), "--n", str(n),
                                           "--size", str(size), "--anomaly-fraction", "0.25",
                                           "--seed", "0"), 60, "synth", {"n": n, "size": size}))
    for fam in FAMILIES:
        steps.append(_train_step(fam, patches, work, args.train_minutes, smoke))
    for path in sorted((ROOT / "bench").glob("*.py")):
        script = path.name
        gpu_args, limit = BENCH_GPU.get(script, UNTUNED)
        extra = _smoke_bench_args(script, gpu_args) if smoke else gpu_args
        note = {"note": BENCH_NOTES.get(script, "not tuned for gpu-check: its smoke mode")
                } if (script in BENCH_NOTES or script not in BENCH_GPU) and not smoke else {}
        steps.append(Step(f"bench/{script}", [sys.executable, str(ROOT / "bench" / script),
                                              *extra], 120 if smoke else limit, "bench", note))
    return steps


def gpu_test_files() -> list[str]:
    """Test files that hold ``gpu``-marked tests. Collecting only these keeps the step independent
    of packages that other test modules import and a machine without a registry may lack."""
    files = (p for p in sorted((ROOT / "tests").rglob("test_*.py"))
             if "mark.gpu" in p.read_text(errors="replace"))
    return [str(p.relative_to(ROOT)) for p in files]


def _smoke_bench_args(script: str, gpu_args: list[str]) -> list[str]:
    """A bench's own ``--smoke`` mode, forced onto the CPU."""
    if script == "stylegan2.py":
        return ["--smoke", "--cpu"]
    if script in ("faults.py", "memory.py") or script not in BENCH_GPU:
        return ["--smoke"]
    return ["--smoke", *(["--device", "cpu"] if "--device" in gpu_args else [])]


def _train_step(fam: str, patches: Path, work: Path, minutes: float, smoke: bool) -> Step:
    config = ROOT / "configs" / fam / ("demo.yaml" if smoke else "pcam64.yaml")
    over = [f"data.train={patches}", "data.val=null", f"out={work / 'runs' / fam}",
            "train.fid_every=0", "train.sample_every=0", "train.log_every=10"]
    if smoke:
        over += ["data.size=32", "train.max_steps=2", "train.cpu=true", "train.log_every=1",
                 "train.ckpt_every=0"]
    else:
        over += [f"train.max_minutes={minutes}"]
    # the run's own startup (imports, data, first CUDA kernels) comes on top of its minutes
    limit = 120 if smoke else int(minutes * 60 + 60)
    return Step(f"train/{fam}", _gen_ad("train", fam, "--config", str(config), *over), limit,
                "train", {"config": str(config.relative_to(ROOT)), "overrides": over})


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
    hw["commit"] = _run_quiet(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
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
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
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
    if status != "ok":
        rec["stderr_tail"] = log.read_text(errors="replace")[-1500:]
    rec["result"] = read_result(step, out or "")
    return rec


def read_result(step: Step, stdout: str) -> Any:
    """What a step produced: test counts, the bench's JSON line, the run's last statistics."""
    if step.kind == "tests":
        last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", last)
        return {word.rstrip("s") if word.startswith("error") else word: int(n)
                for n, word in found}
    if step.kind == "bench":
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
    ap.add_argument("--budget-s", type=float, default=480.0, help="total time limit (8 min)")
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
    hw = hardware()
    out = results_path(args, hw)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started, lines, t0, env = datetime.now(UTC).isoformat(timespec="seconds"), [], \
        time.perf_counter(), child_env()
    for step in steps:
        left = int(args.budget_s - (time.perf_counter() - t0))
        base = {"check": "gpu-check", "started": started, "step": step.name,
                "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "command": step.cmd,
                "settings": step.settings, "hardware": hw}
        if left < 10:
            rec = {**base, "status": "skipped", "reason": "total budget spent"}
        else:
            log = work / "logs" / (re.sub(r"[^A-Za-z0-9.-]+", "_", step.name) + ".log")
            rec = {**base, **run_step(step, min(step.limit_s, left), env, log)}
        lines.append(rec)
        write_lines(out, lines)
        print(f"gpu-check: {step.name}: {rec['status']} ({rec.get('wall_s', 0)} s)", flush=True)
    bad = [r["step"] for r in lines if r["status"] != "ok"]
    print(f"gpu-check: {len(lines) - len(bad)}/{len(lines)} steps ok; results: {out}"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
