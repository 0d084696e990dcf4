"""Fault-injection campaign: kills, corruption, concurrent writers, hostile files, bad input.

Prints one JSON line: ``{"classes": {class: {"tried", "held", "failed"}}, "failures": [...],
...}``. A case *holds* when it ends without lost data, a silent overwrite, a resume from damaged
state, or a user error that is not one line with exit status 2. Classes:

* ``sigkill_time`` / ``sigkill_fileop``: ``gen-ad train`` (tiny demo configs of every family)
  killed with SIGKILL at a random moment, or just before/after its n-th rename or folder
  deletion (every checkpoint, re-save, prune and export step is such an operation). After each
  kill the run is recovered as the next command would, and must show: every published state and
  the export intact (manifests verify), the newest complete state no older than before the kill.
  Each family then finishes and must equal an uninterrupted run bitwise (``exact_resume``).
* ``corrupt_state`` / ``corrupt_export``: every file of the newest state and of ``model/``
  flipped, truncated, emptied or deleted: ``--resume latest`` must skip the damaged state (with
  a warning naming it) and ``load_run`` must refuse the export; one real resume per family must
  then equal the uninterrupted run.
* ``concurrent``: a second writer on the folder of each writing command while the first is
  inside its lock: exit 2 naming the first's pid; the first completes.
* ``containment``: tiling manifests, ``bank.json`` and manifests naming paths outside their
  folder: refused, nothing outside read or deleted.
* ``nonfinite``: a NaN weight in training: exit 2, every published state and export finite.
* ``user_errors``: the bad inputs of issue 16 (files as ``out``, negative workers, NaN mpp,
  unknown device, non-UTF-8 or invalid YAML, wrong seed, refused pickle, full disk).

Processes are forked from this one (imports paid once), so a campaign stays minutes on 2 cores.

    python bench/faults.py [--kills 30] [--families wgan,stylegan2,ddpm] [--seed 0] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
SLIDE = Path(os.environ.get("GEN_AD_DATA", REPO.parent / "shared" / "data")) / "wsi" / \
    "CMU-1-Small-Region.svs"
TINY = {  # a few seconds per run on 2 CPU cores; checkpoint + prune + export every step
    "wgan": ["data.synthetic=20", "train.batch_size=10", "gan.n_critic=5"],
    "stylegan2": ["data.synthetic=16", "train.batch_size=4"],
    "ddpm": ["data.synthetic=16", "train.batch_size=4", "optim.warmup_steps=2",
             "sample.steps=2"],
}
STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "train.ckpt_every=1", "train.keep_last=2",
          "train.log_every=1", "train.sample_every=0", "train.cpu=true"]


class Tally:
    """tried / held / failed counts per class, and the failures' descriptions."""

    def __init__(self) -> None:
        self.classes: dict[str, dict[str, int]] = {}
        self.failures: list[str] = []

    def add(self, cls: str, problem: str | None, case: str = "") -> None:
        c = self.classes.setdefault(cls, {"tried": 0, "held": 0, "failed": 0})
        c["tried"] += 1
        if problem is None:
            c["held"] += 1
        else:
            c["failed"] += 1
            self.failures.append(f"{cls} {case}: {problem}"[:400])


# ----------------------------------------------------------------------------- processes


def fork(fn: Callable[[], int | None], log: Path | None = None) -> int:
    """Run ``fn`` in a forked child (stdout/stderr to ``log`` or /dev/null); return its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = int(fn() or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child reports through its exit status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float = 300.0) -> int:
    """Exit status of a child (negative: killed by that signal); killed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def error_line(log: Path) -> str:
    """The error a command printed last, when it is a single line (else ``""``).

    Progress bars share stderr, so only what follows the last ``gen-ad`` prefix is judged."""
    text = log.read_text(encoding="utf-8", errors="replace")
    at = max(text.rfind("gen-ad: "), text.rfind("gen-ad knn fit: "), text.rfind("gen-ad tile: "))
    if at < 0:
        return ""
    lines = [ln.strip() for ln in text[at:].replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and not re.search(r"\d+%\||it/s", ln)]  # no progress bars
    return lines[0] if len(lines) == 1 else ""


def cli(argv: Sequence[str]) -> Callable[[], int]:
    def run() -> int:
        from gen_ad.cli import main

        return main(list(argv))
    return run


def arm_fileops(kill_at: int, after: bool, count_file: Path | None = None) -> None:
    """In a child: SIGKILL this process at its ``kill_at``-th rename/folder deletion (just
    before it, or just after it); with ``count_file``, count them and write the total there."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    calls = [0]

    def tick(op: Callable[[], Any]) -> Any:
        calls[0] += 1
        hit = calls[0] == kill_at
        if hit and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = op()
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        if count_file is not None:
            count_file.write_text(str(calls[0]), encoding="utf-8")
        return out

    os.replace = lambda a, b, **kw: tick(lambda: real_replace(a, b, **kw))  # type: ignore
    shutil.rmtree = lambda p, *a, **kw: tick(lambda: real_rmtree(p, *a, **kw))  # type: ignore


def train_argv(family: str, run: Path, extra: Sequence[str] = ()) -> list[str]:
    from gen_ad.training import checkpoint as ckpt

    resume = ["--resume", "latest"] if ckpt.list_states(run) else []
    return ["train", family, "--config", str(REPO / "configs" / family / "demo.yaml"),
            f"out={run}", *COMMON, *TINY[family], *extra, *resume]


# ----------------------------------------------------------------------------- run checks


def inspect_run(run: Path, floor: int) -> tuple[str | None, int]:
    """Recover ``run`` as the next command would, then check what a resume would trust.

    Returns:
        ``(problem or None, newest complete step)``.
    """
    from gen_ad.errors import CheckpointError
    from gen_ad.training import checkpoint as ckpt
    from gen_ad.training.export import verify_export
    from gen_ad.utils.io import MANIFEST, recover_dir
    from gen_ad.utils.lock import folder_lock

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with folder_lock(run, "run folder"):
            ckpt.recover_states(run)
            recover_dir(run / "model")
        for _, p in ckpt.list_states(run):
            if not (p / MANIFEST).is_file():
                return f"published {p.name} has no manifest", floor
            try:
                ckpt.verify_state(p)
            except CheckpointError as e:
                return f"published {p.name} is damaged: {e}", floor
        newest = ckpt.newest_complete(run, quiet=True)
        step = int(newest.name.split("-")[1]) if newest is not None else -1
        if step < floor:
            return f"lost: newest complete step {step} < {floor} before the kill", floor
        if (run / "model").exists():
            try:
                verify_export(run / "model")
            except CheckpointError as e:
                return f"published export damaged: {e}", step
    return None, step


def final_weights(run: Path) -> dict[str, Any]:
    from gen_ad.training import checkpoint as ckpt
    from gen_ad.utils.io import load_safetensors

    step, path = ckpt.list_states(run)[-1]
    out: dict[str, Any] = {"step": step}
    for f in sorted((path / "models").glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_safetensors(f).items()})
    return out


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    import torch

    if a.keys() != b.keys() or a["step"] != b["step"]:
        return f"different tensors or steps ({a.get('step')} vs {b.get('step')})"
    bad = [k for k in a if k != "step" and not torch.equal(a[k], b[k])]
    return f"{len(bad)} tensors differ from the uninterrupted run, e.g. {bad[:2]}" if bad else None


# ----------------------------------------------------------------------------- kills


def reference(family: str, root: Path) -> tuple[dict[str, Any], float, int]:
    """An uninterrupted run: final weights, wall time, number of renames/deletions."""
    run, count = root / f"{family}-ref", root / f"{family}-ops"
    argv = train_argv(family, run)
    t0 = time.perf_counter()

    def counted() -> int:
        arm_fileops(0, False, count)
        return cli(argv)()

    rc = wait(fork(counted, root / f"{family}-ref.log"))
    if rc != 0:
        raise RuntimeError(f"reference {family} run failed ({rc}): "
                           f"{(root / f'{family}-ref.log').read_text(encoding='utf-8')[-2000:]}")
    return final_weights(run), time.perf_counter() - t0, int(count.read_text(encoding="utf-8"))


def kill_campaign(family: str, root: Path, kills: int, rng: random.Random, tally: Tally,
                  all_modes: bool = True) -> None:
    """``kills`` SIGKILLs of one family's training (half at random moments, half at file
    operations; about a third after the run finished, i.e. while re-saving), then exactness."""
    ref, seconds, ops = reference(family, root)
    run, floor, done = root / f"{family}-killed", -1, 0
    while done < kills:
        at_op = done % 2 == 1
        left = (STEPS - max(floor, 0) + 1) / (STEPS + 1)  # share of a full run still to do
        kill_at, after = rng.randint(1, max(2, round(ops * left))), rng.random() < 0.5
        resave = floor >= STEPS
        argv = train_argv(family, run)

        def child(argv: list[str] = argv, kill_at: int = kill_at, after: bool = after,
                  at_op: bool = at_op) -> int:
            if at_op:
                arm_fileops(kill_at, after)
            return cli(argv)()

        pid = fork(child, root / f"{family}-kill.log")
        if not at_op:
            time.sleep(rng.uniform(0.05, max(1.5, seconds * left)))
            os.kill(pid, signal.SIGKILL)
        rc = wait(pid)
        if rc not in (0, -signal.SIGKILL):
            tally.add("sigkill_fileop" if at_op else "sigkill_time", f"exit {rc}: " +
                      (root / f"{family}-kill.log").read_text(encoding="utf-8")[-300:], family)
            done += 1
            continue
        if rc == 0:  # finished before the kill: the next kills hit re-saves of the last step
            _, floor = inspect_run(run, floor)
            continue
        problem, floor = inspect_run(run, floor)
        cls = "sigkill_fileop" if at_op else "sigkill_time"
        tally.add(cls, problem, f"{family} kill {done} ({'re-save' if resave else 'training'}"
                  f"{f', op {kill_at} ' + ('after' if after else 'before') if at_op else ''})")
        done += 1
    rc = wait(fork(cli(train_argv(family, run)), root / f"{family}-finish.log"))
    problem = f"finishing after the kills: exit {rc}" if rc else same_weights(
        final_weights(run), ref)
    tally.add("exact_resume", problem, family)
    shutil.rmtree(run, ignore_errors=True)
    corrupt_campaign(family, root / f"{family}-ref", root, ref, tally, all_modes)


# ----------------------------------------------------------------------------- corruption


def corrupt(path: Path, mode: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if mode == "flip" and data:
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
    elif mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "empty":
        path.write_bytes(b"")
    elif mode == "delete":
        path.unlink()


def corrupt_campaign(family: str, run: Path, root: Path, ref: dict[str, Any], tally: Tally,
                     all_modes: bool = True) -> None:
    """Damage each file of the newest state and of model/ in turn (copies of ``run``): every
    mode for every file, or (``all_modes=False``) one mode per file, in rotation."""
    from gen_ad.errors import CheckpointError, GenAdError
    from gen_ad.training import checkpoint as ckpt
    from gen_ad.training.runs import load_run

    rng = random.Random(7)
    (older, _), (_, newest) = ckpt.list_states(run)[-2:]
    modes = ("flip", "truncate", "empty", "delete")
    for sub, files in (("state", sorted(p for p in newest.rglob("*") if p.is_file())),
                       ("model", sorted(p for p in (run / "model").rglob("*") if p.is_file()))):
        for i, f in enumerate(files):
            for mode in modes if all_modes else (modes[i % len(modes)],):
                case = root / "case"
                shutil.rmtree(case, ignore_errors=True)
                shutil.copytree(run, case)
                target = case / f.relative_to(run)
                corrupt(target, mode, rng)
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    try:
                        if sub == "state":
                            got = ckpt.resolve_resume(case, "latest")
                            named = any(target.parents[0].name in str(w.message) or
                                        newest.name in str(w.message) for w in seen)
                            problem = None if got.name == f"step-{older}" and named else \
                                f"resumed from {got.name} (warned: {named})"
                        else:
                            load_run(case)
                            problem = "load_run accepted a damaged export"
                    except CheckpointError:
                        problem = None if sub == "model" else "no fallback to the older state"
                    except GenAdError as e:
                        problem = None if sub == "model" else f"{type(e).__name__}: {e}"
                    except Exception as e:  # noqa: BLE001 - the very failure this campaign seeks
                        problem = f"{type(e).__name__}: {e}"
                tally.add(f"corrupt_{'state' if sub == 'state' else 'export'}", problem,
                          f"{family} {f.relative_to(run)} {mode}")
    case = root / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(run, case)
    target = sorted((case / "state" / newest.name / "models").glob("*.safetensors"))[0]
    corrupt(target, "flip", rng)
    rc = wait(fork(cli(train_argv(family, case)), root / f"{family}-corrupt-resume.log"))
    tally.add("corrupt_state", f"resume exit {rc}" if rc else same_weights(final_weights(case),
                                                                          ref),
              f"{family} real resume past a flipped {target.name}")
    shutil.rmtree(case, ignore_errors=True)


# ----------------------------------------------------------------------------- concurrency


def blocked(argv: Sequence[str], gate: Path) -> Callable[[], int]:
    """A child running ``argv`` that stops at its first rename (inside its lock) until
    ``gate`` exists."""
    def run() -> int:
        real = os.replace

        def replace(a: Any, b: Any, **kw: Any) -> None:
            while not gate.exists():
                time.sleep(0.02)
            os.replace = real  # type: ignore[assignment]
            real(a, b, **kw)

        os.replace = replace  # type: ignore[assignment]
        return cli(argv)()
    return run


def holding(folder: Path, gate: Path) -> Callable[[], int]:
    """A child holding ``folder``'s writer lock until ``gate`` exists."""
    def run() -> int:
        from gen_ad.utils.lock import folder_lock

        with folder_lock(folder):
            while not gate.exists():
                time.sleep(0.02)
        return 0
    return run


def second_writer(first: Callable[[], int], argv: Sequence[str], out: Path, root: Path,
                  check: Callable[[], str | None] | None = None) -> str | None:
    """Start ``first``; once it holds ``out``'s lock, run ``argv`` on the same folder: it must
    exit 2 with one line naming the first's pid; then the first must finish and ``check``."""
    from gen_ad.utils.lock import lock_holder

    gate = root / "gate"
    gate.unlink(missing_ok=True)
    pid_a = fork(first, root / "first.log")
    deadline = time.monotonic() + 120
    while (lock_holder(out) or {}).get("pid") != pid_a and time.monotonic() < deadline:
        time.sleep(0.02)
    rc_b = wait(fork(cli(argv), root / "second.log"))
    gate.write_text("go", encoding="utf-8")
    rc_a = wait(pid_a)
    msg = error_line(root / "second.log")
    if rc_b != 2 or f"pid {pid_a}" not in msg:
        return f"second writer: exit {rc_b}, said {msg or 'more than one line'}"
    if rc_a != 0:
        said = (root / "first.log").read_text(encoding="utf-8")[-300:]
        return f"first writer failed ({rc_a}): {said}"
    return check() if check else None


def _colour_benchmark(root: Path, synth: Path, out: Path) -> Path:
    """A benchmark config that needs no trained run (a colour-statistics KNN on ``synth``): its
    inputs are valid, so the held lock is what must stop it (inputs are checked first)."""
    cfg = {"out": str(out), "data": {"test": str(synth), "val": str(synth / "normal"),
                                     "classes": ["normal", "anomalous"], "size": 32},
           "methods": [{"knn": {"extractor": "colour-stats", "k": 2,
                                "bank": str(synth / "normal")}}],
           "n_boot": 10, "device": "cpu", "examples": 0, "fid": {"enabled": False}}
    path = root / "colour-benchmark.json"  # JSON is YAML: the config loader reads it
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def concurrent_campaign(root: Path, ddpm_run: Path | None, tally: Tally) -> None:
    """Two writers on one folder, for every command that writes."""
    from gen_ad.baselines.knn import FeatureBank

    g = root / "gate"
    synth = root / "synth"
    s_args = ["synth", "--out", str(synth), "--n", "24", "--size", "32", "--anomaly-fraction",
              "0.25"]

    def n_images() -> str | None:
        n = len(list(synth.glob("normal/*.png"))) + len(list(synth.glob("anomalous/*.png")))
        return None if n == 24 else f"{n} images instead of 24"

    tally.add("concurrent", second_writer(blocked(s_args, g), s_args, synth, root, n_images),
              "synth")
    bank = root / "bank"
    fit = ["knn", "fit", "--extractor", "dino-vits16", "--random-init", "--tiny", "--normal",
           str(synth), "--out", str(bank), "--k", "3", "--workers", "0", "--calib-size", "8",
           "--device", "cpu"]
    tally.add("concurrent", second_writer(blocked(fit, g), fit, bank, root,
                                          lambda: None if FeatureBank(bank).count else "empty"),
              "knn fit")
    count = FeatureBank(bank).count
    more = root / "synth-more"  # extending adds new files only (files in the bank are skipped)
    assert cli(["synth", "--out", str(more), "--n", "12", "--size", "32", "--seed", "1",
                "--anomaly-fraction", "0"])() == 0
    ext = [*fit, "--extend"]
    ext[ext.index(str(synth))] = str(more)
    tally.add("concurrent", second_writer(
        blocked(ext, g), ext, bank, root,
        lambda: None if FeatureBank(bank).count == count + 12 else
        f"{FeatureBank(bank).count} vectors after one extend of {count} by 12"),
        "knn fit --extend")
    ks = ["knn", "score", str(bank), "--data", str(synth), "--out", str(root / "kscore"),
          "--workers", "0", "--device", "cpu"]
    tally.add("concurrent", second_writer(blocked(ks, g), ks, root / "kscore", root), "knn score")
    run = root / "conc-run"
    tr = train_argv("wgan", run)
    tally.add("concurrent", second_writer(blocked(tr, g), tr, run, root,
                                          lambda: inspect_run(run, STEPS)[0]), "train")
    if SLIDE.is_file():
        tl = ["tile", str(SLIDE), "--out", str(root / "tiles"), "--size", "256", "--level", "0"]
        tally.add("concurrent", second_writer(blocked(tl, g), tl, root / "tiles", root), "tile")
    if ddpm_run is not None:
        sc = ["score", str(ddpm_run), "--data", str(synth), "--out", str(root / "score"),
              "--method", "anoddpm", "--normal", str(synth / "normal"), "--steps", "2",
              "--device", "cpu", "--examples", "0"]
        tally.add("concurrent", second_writer(blocked(sc, g), sc, root / "score", root), "score")
    bench_out = root / "bench-out"
    bb = ["benchmark", "--config", str(_colour_benchmark(root, synth, bench_out))]
    tally.add("concurrent", second_writer(holding(bench_out, g), bb, bench_out, root),
              "benchmark (held lock)")
    if SLIDE.is_file():
        sl = ["slide", str(SLIDE), "--bank", str(bank), "--out", str(root / "slide")]
        tally.add("concurrent", second_writer(holding(root / "slide", g), sl, root / "slide",
                                              root), "slide (held lock)")


# ----------------------------------------------------------------------------- containment


def containment_campaign(root: Path, tally: Tally) -> None:
    """Files the toolkit wrote, edited to name paths outside their folder."""
    import numpy as np

    from gen_ad.baselines.knn import FeatureBank
    from gen_ad.data.wsi import MANIFEST_COLUMNS, update_manifest
    from gen_ad.errors import GenAdError
    from gen_ad.utils.io import check_manifest, write_manifest

    victim = root / "victim.png"
    for rel in ("../victim.png", str(victim)):
        tiles = root / "tiles-c"
        tiles.mkdir(exist_ok=True)
        victim.write_bytes(b"keep me")
        (tiles / "manifest.csv").write_text(",".join(MANIFEST_COLUMNS) + "\n" +
                                            f"s,0,0,0,1.0,{rel}\n", encoding="utf-8")
        try:
            update_manifest(tiles, ["s"], [])
            problem = "the manifest was accepted"
        except GenAdError:
            problem = None
        tally.add("containment", problem or (None if victim.is_file() else "deleted outside"),
                  f"tile manifest {rel}")
    bank = root / "bank-c"
    bank.mkdir(exist_ok=True)
    np.save(root / "outside.npy", np.zeros((2, 4), np.float32))
    for rel in ("../outside.npy", str(root / "outside.npy")):
        (bank / "bank.json").write_text(json.dumps({
            "dim": 4, "count": 2, "extractor": {}, "settings": {}, "paths": ["a", "b"],
            "shards": [{"file": rel, "count": 2}]}), encoding="utf-8")
        try:
            FeatureBank(bank)
            problem = "bank.json with an outside shard was accepted"
        except GenAdError:
            problem = None
        tally.add("containment", problem, f"bank.json shard {rel}")
    state = root / "state-c"
    state.mkdir(exist_ok=True)
    (state / "a.bin").write_bytes(b"x")
    write_manifest(state)
    m = json.loads((state / "manifest.json").read_text(encoding="utf-8"))
    m["files"]["../victim.png"] = {"size": 7, "sha256": "0" * 64}
    (state / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    try:
        check_manifest(state)
        problem = "a manifest naming ../victim.png was accepted"
    except GenAdError:
        problem = None
    tally.add("containment", problem, "state manifest ../victim.png")


# ----------------------------------------------------------------------------- NaN, user errors


def nonfinite_campaign(family: str, root: Path, tally: Tally) -> None:
    """A weight turns NaN after step 3 (loss still finite): nothing non-finite is published."""
    import torch

    from gen_ad.training import checkpoint as ckpt
    from gen_ad.utils.io import load_safetensors

    run = root / f"{family}-nan"
    argv = train_argv(family, run)

    def child() -> int:
        import gen_ad.training.loop as loop

        orig = loop.train_one_step

        def step(state: Any, batch: Any) -> Any:
            logs = orig(state, batch)
            if state.counters.step == 3:
                with torch.no_grad():
                    next(iter(state.models.values())).parameters().__next__().fill_(float("nan"))
            return logs

        loop.train_one_step = step
        return cli(argv)()

    rc = wait(fork(child, root / f"{family}-nan.log"))
    files = [f for _, p in ckpt.list_states(run) for f in (p / "models").glob("*.safetensors")]
    files += list((run / "model").glob("*.safetensors"))
    bad = [str(f) for f in files if not all(torch.isfinite(v).all()
                                            for v in load_safetensors(f).values())]
    msg = error_line(root / f"{family}-nan.log")
    ok_msg = rc == 2 and "not finite" in msg and "newest complete checkpoint" in msg
    tally.add("nonfinite", None if ok_msg and not bad and files else
              f"exit {rc}, {len(bad)} non-finite files published, said {msg!r}", family)


def user_error_cases(root: Path) -> list[tuple[str, list[str], str]]:
    """(case, argv, text the one-line message must contain)."""
    afile = root / "afile"
    afile.write_text("x", encoding="utf-8")
    (root / "latin.yaml").write_bytes(b"out: caf\xe9\n")
    (root / "bad.yaml").write_text("train:\n  batch_size: [1,\n  max_steps: }\n", encoding="utf-8")
    import torch

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned > " + str(root / "pwned"),))

    torch.save({"w": Evil()}, root / "evil.pt")
    wg = ["train", "wgan", "--config", str(REPO / "configs/wgan/demo.yaml")]
    knn = ["knn", "fit", "--extractor", "dino-vits16", "--tiny", "--normal", str(root / "synth")]
    return [
        ("train out=file", [*wg, f"out={afile}"], str(afile)),
        ("synth --out file", ["synth", "--out", str(afile), "--n", "2"], str(afile)),
        ("tile --out file", ["tile", str(SLIDE), "--out", str(afile), "--size", "64"], str(afile)),
        ("knn fit --out file", [*knn, "--random-init", "--out", str(afile)], str(afile)),
        ("score --out file", ["score", str(root / "run"), "--data", str(root / "synth"), "--out",
                              str(afile)], str(afile)),
        ("knn --workers -1", [*knn, "--random-init", "--out", str(root / "b"), "--workers", "-1"],
         "--workers"),
        ("tile --mpp nan", ["tile", str(SLIDE), "--out", str(root / "t"), "--size", "64",
                            "--mpp", "nan"], "--mpp"),
        ("score --device", ["score", str(root / "run"), "--data", str(root / "synth"), "--out",
                            str(root / "s"), "--device", "tpu9"], "tpu9"),
        ("non-UTF-8 config", ["train", "wgan", "--config", str(root / "latin.yaml")], "UTF-8"),
        ("invalid YAML", ["train", "wgan", "--config", str(root / "bad.yaml")], "line"),
        ("train.seed=-1", [*wg, "train.seed=-1", f"out={root / 'r'}"], "train.seed"),
        ("refused pickle", [*knn, "--weights", str(root / "evil.pt"), "--out",
                            str(root / "b2")], "refused"),
    ]


def user_error_campaign(root: Path, tally: Tally) -> None:
    for case, argv, needle in user_error_cases(root):
        rc = wait(fork(cli(argv), root / "err.log"))
        msg = error_line(root / "err.log")
        ok = rc == 2 and needle in msg
        tally.add("user_errors", None if ok and not (root / "pwned").exists() else
                  f"exit {rc}, said {msg!r}", case)
    run = root / "full-run"

    def full_disk() -> int:
        import errno

        import gen_ad.utils.io as gio

        real = gio._write_file

        def write(path: Path, data: bytes) -> None:
            if "step-4" in str(path) or "step-4" in str(path.parent):
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, data)

        gio._write_file = write
        return cli(train_argv("wgan", run))()

    rc = wait(fork(full_disk, root / "err.log"))
    msg = error_line(root / "err.log")
    ok = rc == 2 and "no space left" in msg and "step-4" in msg and msg.endswith("step-3")
    tally.add("user_errors", None if ok else f"exit {rc}, said {msg!r}", "disk full")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs per family")
    ap.add_argument("--families", default="wgan,stylegan2,ddpm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one-mode", action="store_true",
                    help="corrupt each file one way (rotating), not all four ways")
    ap.add_argument("--smoke", action="store_true", help="2 kills of wgan only")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    families = ["wgan"] if args.smoke else args.families.split(",")
    kills = 2 if args.smoke else args.kills
    rng, tally, t0 = random.Random(args.seed), Tally(), time.perf_counter()
    root = Path(args.keep or tempfile.mkdtemp(prefix="gen-ad-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for fam in families:
            kill_campaign(fam, root, kills, rng, tally, all_modes=not args.one_mode)
            if not args.smoke:
                nonfinite_campaign(fam, root, tally)
        containment_campaign(root, tally)
        if not args.smoke:
            user_error_campaign(root, tally)
            ddpm = root / "ddpm-ref" if (root / "ddpm-ref" / "model").is_dir() else None
            concurrent_campaign(root, ddpm, tally)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    totals = {k: sum(c[k] for c in tally.classes.values()) for k in ("tried", "held", "failed")}
    sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py (imports torch)
    from _common import machine

    rec = {"bench": "faults", "families": families, "kills_per_family": kills,
           "classes": tally.classes, "total": totals, "failures": tally.failures[:20],
           "seconds": round(time.perf_counter() - t0, 1), "cpu_count": os.cpu_count(),
           "settings": {"families": families, "kills": kills, "seed": args.seed,
                        "one_mode": args.one_mode, "smoke": args.smoke},
           "hardware": machine()}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    sys.exit(1 if main()["total"]["failed"] else 0)
