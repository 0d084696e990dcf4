"""The one Accelerate training loop every family runs on.

``run_training(family)`` owns devices, DDP (``accelerate launch``), mixed precision, gradient
accumulation, EMA, step/image counters, logging (``stats.jsonl``, trackers, progress bar), sample
grids, periodic FID, checkpoints (periodic, final, and on SIGINT/SIGTERM) and the inference
export. The family only builds its networks and runs one optimisation step
(:class:`~gen_ad.training.family.Family`).

Exact resume: the data order is a pure function of the seed (:mod:`gen_ad.training.sampler`) and
every random draw of step ``s`` comes from a generator seeded by ``(seed, s, rank)``; with the
weights, EMA, optimiser/schedule states and counters restored, ``N`` steps in one go and
``N/2 + resume + N/2`` give bitwise-identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gen_ad.config import ConfigError, TrainConfig, save_config, to_dict
from gen_ad.errors import CheckpointError, DiskFullError, TrainingDivergedError
from gen_ad.models.ema import ema_copy, ema_update
from gen_ad.training import checkpoint as ckpt
from gen_ad.training.export import export_models
from gen_ad.training.family import Family, StepContext
from gen_ad.training.resume_config import check_resume, plain_config
from gen_ad.training.sampler import ResumableSampler
from gen_ad.utils.determinism import ENV_VAR, deterministic_mode, requested_by_environment
from gen_ad.utils.io import (
    publish_dir,
    recover_dir,
    torch_load,
    torch_save,
    unique_tag,
)
from gen_ad.utils.lock import folder_lock
from gen_ad.utils.workers import worker_init

if TYPE_CHECKING:
    from gen_ad.metrics.fid import FIDMonitor


@dataclass
class RunState:
    """Everything the loop holds for one run (no module-level state)."""

    family: Family
    accelerator: Accelerator
    run_dir: Path
    models: dict[str, nn.Module]
    prepared: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    ema: dict[str, nn.Module]
    counters: ckpt.Counters = field(default_factory=ckpt.Counters)
    stop_signal: list[int] = field(default_factory=list)
    fid_monitor: FIDMonitor | None = None


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the random draws of ``step`` on process ``rank``."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) % (2**63 - 1)


# ----------------------------------------------------------------------------- set-up


def make_accelerator(train_cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """An Accelerator for the config: CPU when asked or when no GPU, bf16/fp16 only on GPU."""
    cpu = bool(train_cfg.cpu) or not torch.cuda.is_available()
    mp = "no" if cpu else train_cfg.mixed_precision
    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    release_other_state(cpu, mp)
    return Accelerator(cpu=cpu, mixed_precision=mp, log_with=log_with, project_dir=str(run_dir))


def release_other_state(cpu: bool, mixed_precision: str) -> None:
    """Start accelerate's process-wide state afresh when this run wants another device or
    precision than an earlier run of the same process (a notebook, a test session).

    Accelerate keeps one state per process: it refuses a later CPU run after a CUDA one, or
    another mixed precision, and a later CUDA run after a CPU one would silently stay on the CPU.
    Only outside a distributed launch: there the state belongs to the launcher.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not PartialState._shared_state:
        return
    partial = PartialState()
    if partial.distributed_type != DistributedType.NO:
        return
    other_device = (partial.device.type == "cpu") != cpu
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if other_device or (held is not None and held != mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=True)


def per_process_batch(train_cfg: TrainConfig, world: int) -> int:
    """``train.batch_size`` split over ``world`` processes, checked at start-up.

    Raises:
        ConfigError: the batch does not split evenly over the processes, or the per-process
            batch not into ``train.grad_accum`` equal micro-batches (unequal chunks would
            mis-scale the gradients, each being divided by ``grad_accum``).
    """
    b, accum = train_cfg.batch_size, train_cfg.grad_accum
    if b % world:
        raise ConfigError(f"config key 'train.batch_size': {b} is not divisible by the number of "
                          f"processes ({world})")
    per = b // world
    if per % accum:
        raise ConfigError(
            f"config keys 'train.batch_size' and 'train.grad_accum': the per-process batch "
            f"{b} / {world} processes = {per} is not divisible by train.grad_accum={accum}; "
            f"use a train.batch_size divisible by {world * accum} (processes x grad_accum)")
    return per


def make_loader(dataset: Dataset, *, batch: int, seed: int, rank: int, world: int,
                start: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """An endless iterator of batches continuing the seeded order at stream position ``start``."""
    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank, world=world, start=start)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                        worker_init_fn=worker_init(num_workers))
    return iter(loader)


def _prepare(state: RunState) -> None:
    """Move models to the device; wrap trainable ones (and their optimisers) for DDP/AMP."""
    acc = state.accelerator
    for name, m in state.models.items():
        trainable = any(p.requires_grad for p in m.parameters())
        state.prepared[name] = acc.prepare(m) if trainable else m.to(acc.device)
    for name, o in state.optimizers.items():
        state.optimizers[name] = acc.prepare(o)
    for m in state.ema.values():
        m.to(acc.device)


def _check_new_or_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is not None:
        return ckpt.resolve_resume(run_dir, resume)
    if ckpt.list_states(run_dir):
        raise CheckpointError(f"run folder {run_dir} already has checkpoints: pass --resume latest "
                              "to continue it, or choose another 'out'")
    return None


def _start_branch(run_dir: Path, path: Path | None) -> None:
    """Set aside what the run's folder holds beyond the state it continues from (``None``: a
    new run, step 0): newer states (see :func:`~gen_ad.training.checkpoint.set_aside_newer`)
    and log lines (see :func:`~gen_ad.training.monitor.set_aside_log_lines`), saying so on
    stderr."""
    from gen_ad.training.monitor import abandoned_name, set_aside_log_lines

    step = 0 if path is None else ckpt.state_step(path)
    moved = None if path is None else ckpt.set_aside_newer(run_dir, step)
    start = "new run" if path is None else f"resume: continuing from step {step}"
    if moved is not None:
        folder, names = moved
        tqdm.write(f"{start}; the newer states {', '.join(names)} (rolled back from, or skipped "
                   f"as damaged) were moved to {folder} (nothing deleted; model/ is replaced at "
                   "the next checkpoint)", file=sys.stderr)
    lines = set_aside_log_lines(run_dir, step)
    if lines:
        shown = ", ".join(f"{n} line(s) of {name}" for name, n in lines.items())
        tqdm.write(f"{start}; {shown} (logged past step {step} by a killed run, or on an "
                   f"abandoned branch) were set aside into "
                   f"{', '.join(abandoned_name(n) for n in lines)} (nothing deleted)",
                   file=sys.stderr)


def resolve_resume_agreed(acc: Accelerator, run_dir: Path, resume: str | None) -> Path | None:
    """The state to resume from, the same on every process (``None``: a new run).

    The main process resolves it (after its writer lock repaired any interrupted swap) and sets
    aside newer states and log lines past it (of an abandoned branch, or of a killed run); the
    others receive its answer, or its error.

    Raises:
        CheckpointError: no usable state, or ``run_dir`` has states and ``resume`` is ``None``.
    """
    answer: list[str | None] = [None, None]  # [path, error]
    error: Exception | None = None
    if acc.is_main_process:
        try:
            path = _check_new_or_resume(run_dir, resume)
            _start_branch(run_dir, path)
            answer[0] = None if path is None else str(path)
        except Exception as e:  # noqa: BLE001 - handed to the other processes, then re-raised
            error, answer[1] = e, str(e)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    if error is not None:
        raise error
    if answer[1] is not None:
        handed_on = CheckpointError(f"{answer[1]} (the main process could not resume)")
        handed_on.from_main_process = True  # type: ignore[attr-defined]  # printed by main only
        raise handed_on
    return None if answer[0] is None else Path(answer[0])


def deterministic_switch(train_cfg: TrainConfig) -> str | None:
    """What asks for deterministic mode for this run: ``train.deterministic=true``,
    ``GEN_AD_DETERMINISTIC=1``, both (joined by ``and``), or ``None`` (neither).

    Raises:
        ConfigError: ``GEN_AD_DETERMINISTIC`` is neither on nor off.
    """
    asked = [name for name, on in (("train.deterministic=true", train_cfg.deterministic),
                                   (f"{ENV_VAR}=1", requested_by_environment())) if on]
    return " and ".join(asked) or None


def check_deterministic_conflicts(family: Family, device: torch.device) -> None:
    """Refuse, before any training, a CUDA run in deterministic mode whose config runs an
    operation without a deterministic CUDA kernel (:meth:`Family.deterministic_conflicts`), rather
    than failing when the run first reaches it (ADA's augmentation: once ``p`` rises).

    Raises:
        ConfigError: naming the config keys and what to change.
    """
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    conflicts = family.deterministic_conflicts()
    if conflicts:
        raise ConfigError(f"deterministic mode on CUDA: {'; '.join(conflicts)} (or turn "
                          f"deterministic mode off: train.deterministic=false, {ENV_VAR} unset)")


def build_run(family: Family, resume: str | None = None) -> tuple[RunState, Path | None]:
    """Create models, EMA, optimisers and the accelerator for ``family.cfg``.

    Checks the batch split over the processes and agrees on the state to resume from (see
    :func:`resolve_resume_agreed`) before building anything.
    """
    cfg = family.cfg
    run_dir = Path(cfg.out)
    acc = make_accelerator(cfg.train, run_dir)
    per_process_batch(cfg.train, acc.num_processes)
    check_deterministic_conflicts(family, acc.device)
    resume_path = resolve_resume_agreed(acc, run_dir, resume)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process and resume
    models = family.build_models()
    family.setup(models, acc.device, resuming=resume_path is not None)
    ema = {n: ema_copy(models[n]) for n in family.ema_models()}
    optimizers = family.build_optimizers(models)
    schedulers = family.build_schedulers(optimizers)
    state = RunState(family, acc, run_dir, models, {}, dict(optimizers), schedulers, ema)
    _prepare(state)
    return state, resume_path


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: RunState) -> Path:
    """Publish the full state as ``state/step-<N>/`` and the export as ``model/`` (all processes
    must call this).

    Each folder is assembled under a name unique to this process, gets its integrity manifest
    last, and is swapped in as a whole (re-saving a step replaces it only once the new one is
    complete); old states are pruned by renaming them away first.

    Raises:
        TrainingDivergedError: a weight, EMA, optimiser or family tensor is not finite
            (nothing is published).
        CheckpointError: the disk filled up (names the file and the newest complete state).
    """
    acc, c = state.accelerator, state.counters
    _check_finite(state)
    root = ckpt.state_root(state.run_dir)
    final = root / f"step-{c.step}"
    names = [f".step-{c.step}.{unique_tag()}.tmp" if acc.is_main_process else ""]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(names)
    tmp = root / names[0]
    try:
        if acc.is_main_process:
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch_save(tmp / f"rng-{acc.process_index}.pt", ckpt.rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            _publish_state(state, tmp, final)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{e}; step {c.step} was not completely saved; the newest complete "
                              f"checkpoint is {_kept(state.run_dir)}") from e
    acc.wait_for_everyone()
    return final


def _publish_state(state: RunState, tmp: Path, final: Path) -> None:
    acc, c = state.accelerator, state.counters
    ckpt.save_state(tmp, models=state.models, ema=state.ema, optimizers=state.optimizers,
                    schedulers=state.schedulers, scaler=getattr(acc, "scaler", None),
                    family_state=state.family.state_dict(), counters=c,
                    extra_meta={"family": state.family.name, "world": acc.num_processes,
                                "config": plain_config(state.family.cfg)})
    publish_dir(tmp, final)
    ckpt.prune_states(state.run_dir, state.family.cfg.train.keep_last)
    export_models(state.run_dir / "model", family=state.family, models=state.models,
                  ema=state.ema, counters=c)


def _kept(run_dir: Path) -> str:
    kept = ckpt.newest_complete(run_dir, quiet=True)
    return str(kept) if kept is not None else "none"


def _check_finite(state: RunState) -> None:
    """Refuse to publish a state with a NaN/inf tensor (every process runs the same check)."""
    groups: dict[str, Any] = {f"model '{n}'": m.state_dict() for n, m in state.models.items()}
    groups.update({f"EMA of '{n}'": m.state_dict() for n, m in state.ema.items()})
    groups.update({f"optimiser '{n}'": o.state_dict() for n, o in state.optimizers.items()})
    groups["the family state"] = state.family.state_dict()
    bad = ckpt.nonfinite_tensor(groups)
    if bad is not None:
        raise TrainingDivergedError(
            f"{bad} is not finite at step {state.counters.step}: this state was not saved nor "
            f"exported; the newest complete checkpoint is {_kept(state.run_dir)} (lower the "
            "learning rate, or check the data)")


def load_checkpoint(state: RunState, path: Path) -> None:
    """Restore a state folder written by :func:`save_checkpoint`.

    The config's optimiser settings win over the checkpoint's: a changed learning rate (or
    betas, weight decay, ...) is applied, and a line says so.
    """
    acc = state.accelerator
    _check_resume_config(state, path)
    scaler = getattr(acc, "scaler", None)
    wanted = ckpt.optimizer_settings(state.optimizers)
    counters, fam = ckpt.load_state(path, models=state.models, ema=state.ema,
                                    optimizers=state.optimizers, schedulers=state.schedulers,
                                    scaler=scaler)
    changes = ckpt.apply_optimizer_settings(state.optimizers, state.schedulers, wanted)
    if changes and acc.is_main_process:
        tqdm.write(f"resume: the config's optimiser settings replace the checkpoint's: "
                   f"{'; '.join(changes)}", file=sys.stderr)
    state.family.load_state_dict(fam)
    state.counters = counters
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(torch_load(rng_file))


def _check_resume_config(state: RunState, path: Path) -> None:
    """Refuse another family or a change to what defines the model (see
    :mod:`gen_ad.training.resume_config`); say which other config keys changed."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    changes = check_resume(meta, state.family.name, plain_config(state.family.cfg), str(path))
    if changes and state.accelerator.is_main_process:
        tqdm.write(f"resume: the config differs from the checkpoint's in {len(changes)} key(s), "
                   f"now applied: {'; '.join(changes)}", file=sys.stderr)


# ----------------------------------------------------------------------------- the loop


@contextmanager
def _signal_guard(state: RunState) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a flag: the loop checkpoints after the current step and stops."""
    def handler(signum: int, frame: Any) -> None:
        state.stop_signal.append(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _finite_or_raise(logs: Mapping[str, torch.Tensor | float], step: int) -> None:
    """One host read per step (not per micro-batch): are all logged values finite?"""
    tensors = [v.detach().float().reshape(()) for v in logs.values() if isinstance(v, torch.Tensor)]
    finite = all(math.isfinite(v) for v in logs.values() if not isinstance(v, torch.Tensor))
    if finite and tensors:
        dev = tensors[0].device
        finite = bool(torch.stack([t.to(dev) for t in tensors]).isfinite().all())
    if finite:
        return
    for k, v in logs.items():
        if not math.isfinite(float(v)):
            raise TrainingDivergedError(
                f"loss '{k}' is {v} at step {step}; training stopped (lower the learning rate, "
                "or check the data)")


def _done(state: RunState) -> bool:
    tc = state.family.cfg.train
    c = state.counters
    return c.step >= tc.max_steps or (tc.max_kimg is not None and c.kimg >= tc.max_kimg)


def _stop_reason(state: RunState, t0: float) -> str | None:
    """Why the loop stops after this step (``None``: go on), agreed by every process.

    Two flags: ``train.max_minutes`` has passed since ``t0``; a SIGINT/SIGTERM was received.
    Under DDP both are summed over the processes in one reduction (one host read per step), so
    every process stops at the same step even when a signal reaches them a step apart (a process
    leaving alone would wait in the checkpoint's collective while the others wait in the next
    step's). A single process reads its flags without touching the device.
    """
    acc, limit = state.accelerator, state.family.cfg.train.max_minutes
    late = limit is not None and time.perf_counter() - t0 >= 60.0 * limit
    signalled = bool(state.stop_signal)
    if acc.num_processes > 1:
        flags = torch.tensor([float(late), float(signalled)], device=acc.device)
        late, signalled = (v > 0 for v in acc.reduce(flags, reduction="sum").tolist())
    if late:
        return f"train.max_minutes={limit} reached"
    if signalled:
        return f"signal {state.stop_signal[0]} received" if state.stop_signal else \
            "another process received a stop signal"
    return None


def _budget_total(state: RunState, t0: float, step0: int) -> int:
    """Steps the run will reach: ``max_steps``, or fewer where ``max_kimg`` or ``max_minutes``
    ends it sooner.

    ``max_kimg`` counts the steps its images take at the current batch size; ``max_minutes``
    projects the rate since ``t0`` (``step0`` steps done then) over the time left, so the
    progress bar's total and ETA follow whichever limit comes first.
    """
    tc, c = state.family.cfg.train, state.counters
    total = tc.max_steps
    if tc.max_kimg is not None:
        left = max(1000.0 * tc.max_kimg - c.images, 0.0)
        total = min(total, c.step + math.ceil(left / tc.batch_size))
    dt = time.perf_counter() - t0
    if tc.max_minutes is None or c.step <= step0 or dt <= 0:
        return max(c.step, total)
    rate = (c.step - step0) / dt
    projected = c.step + int(rate * max(60.0 * tc.max_minutes - dt, 0.0)) + 1
    return max(c.step, min(total, projected))


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def train_one_step(state: RunState, batch: torch.Tensor) -> dict[str, Any]:
    """Run the family's step for the current counters and update EMA and counters.

    Returns the step's logs as the family gave them (device tensors stay on the device until
    :func:`~gen_ad.training.monitor.log_stats` writes them).
    """
    acc, fam, c = state.accelerator, state.family, state.counters
    tc = fam.cfg.train
    seed = step_seed(tc.seed, c.step, acc.process_index)
    torch.manual_seed(seed)  # layers that draw from the global RNG (dropout) are seeded too
    gen = torch.Generator(device=acc.device).manual_seed(seed)
    ctx = StepContext(acc, state.prepared, state.optimizers, state.schedulers, state.ema,
                      step=c.step, kimg=c.kimg, generator=gen, grad_accum=tc.grad_accum,
                      host_rng=random.Random(seed))
    logs = dict(fam.train_step(ctx, batch))
    _finite_or_raise(logs, c.step)
    decay = fam.ema_decay(c.step, c.kimg)
    for name, e in state.ema.items():
        ema_update(e, state.models[name], decay)
    c.step += 1
    c.images += tc.batch_size
    return logs


def run_training(family: Family, *, resume: str | None = None) -> Path:
    """Train ``family`` on its config until ``train.max_steps`` / ``train.max_kimg``.

    Args:
        family: the family (holding its validated config).
        resume: ``None`` (new run), ``"latest"``, or a state/run folder path.
    Returns:
        The run folder.
    Raises:
        FolderLockedError: another process is writing the run folder.
        TrainingDivergedError: a non-finite loss or tensor (names the newest complete state).
        NondeterministicOpError: deterministic mode is on (``train.deterministic`` or
            ``GEN_AD_DETERMINISTIC=1``, applied here before any CUDA work and undone after) and
            an operation has no deterministic kernel on the device.
    """
    switch = deterministic_switch(family.cfg.train)
    with deterministic_mode(switch is not None, switch), _writer_lock(Path(family.cfg.out)):
        return _run_training(family, resume)


@contextmanager
def _writer_lock(run_dir: Path) -> Iterator[None]:
    """The run folder's writer lock, held by the first process of a (DDP) launch, which also
    puts back a state or export whose swap a kill interrupted."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
        yield
        return
    with folder_lock(run_dir, "run folder"):
        ckpt.recover_states(run_dir)
        recover_dir(run_dir / "model")
        yield


def _run_training(family: Family, resume: str | None) -> Path:
    from gen_ad.data import build_dataset
    from gen_ad.training.monitor import final_samples

    cfg = family.cfg
    state, resume_path = build_run(family, resume)
    acc = state.accelerator
    with acc.local_main_process_first():  # one process per machine builds a data.cache
        dataset = build_dataset(cfg.data, split="train", seed=cfg.train.seed)
    if resume_path is not None:
        load_checkpoint(state, resume_path)
        _note_batch_change(state)
    if acc.is_main_process:
        _note_processes(state)
        _record_environment(state)
        _note_data_and_budget(state, len(dataset))  # type: ignore[arg-type]
        _note_stain(state, dataset)
        save_config(cfg, state.run_dir / "config.yaml")
    batches = make_loader(dataset, batch=per_process_batch(cfg.train, acc.num_processes),
                          seed=cfg.train.seed, rank=acc.process_index, world=acc.num_processes,
                          start=state.counters.images, num_workers=cfg.data.num_workers)
    _init_trackers(state)
    with _signal_guard(state):
        reason = _loop(state, batches)
    save_checkpoint(state)  # first: a launcher kills its workers soon after forwarding a signal
    if not (reason or "").startswith(("signal", "another process")):
        final_samples(state, reason)
    acc.end_training()
    return state.run_dir


def _note_processes(state: RunState) -> None:
    """One stderr line: how many processes train on which device, and the batch split (under
    ``accelerate launch`` this is where a launch that started fewer processes shows)."""
    acc, tc = state.accelerator, state.family.cfg.train
    n = acc.num_processes
    split = (f"{per_process_batch(tc, n)} per process" if n > 1 else "") + \
        (f"{', ' if n > 1 else ''}{tc.grad_accum} micro-batches" if tc.grad_accum > 1 else "")
    tqdm.write(f"train {state.family.name}: {n} process{'es' if n > 1 else ''} on "
               f"{acc.device.type}, batch {tc.batch_size}{f' ({split})' if split else ''}, "
               f"mixed precision {acc.mixed_precision}", file=sys.stderr)


def _record_environment(state: RunState) -> None:
    """Append this start's line to ``<run>/environment.jsonl``: the step it starts from, the
    processes, device and precision, and :func:`~gen_ad.utils.provenance.environment` (gen_ad's
    version and commit, the packages). One line per start: a resumed run may have moved to
    another machine or library version, and its numbers then mix them."""
    from datetime import datetime, timezone

    from gen_ad.utils.io import append_jsonl
    from gen_ad.utils.provenance import environment

    acc = state.accelerator
    append_jsonl(state.run_dir / "environment.jsonl", {
        "step": state.counters.step, "started": datetime.now(timezone.utc).isoformat(),
        "processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
        **environment(str(acc.device))})


def _note_data_and_budget(state: RunState, n_images: int) -> None:
    """Say when the run trains on the built-in synthetic tissue (``data.train`` not set, or
    ``synthetic``), and when a resumed run's ``train.max_steps`` leaves nothing to train."""
    from gen_ad.data import SYNTHETIC

    cfg, step = state.family.cfg, state.counters.step
    if str(cfg.data.train) == SYNTHETIC:
        tqdm.write(f"data: {n_images} synthetic tissue patches (data.train is 'synthetic', the "
                   "default: set data.train to a patch folder to train on your data)",
                   file=sys.stderr)
    if step > 0 and step >= cfg.train.max_steps:
        tqdm.write(f"resume: the checkpoint is at step {step} and train.max_steps is "
                   f"{cfg.train.max_steps}: nothing to train (raise train.max_steps to continue)",
                   file=sys.stderr)


def _note_stain(state: RunState, dataset: Dataset) -> None:
    """Say how many sampled training patches ``data.stain_norm`` leaves in their own stain."""
    from gen_ad.data import stain_coverage

    cfg = state.family.cfg
    found = stain_coverage(cfg.data, dataset, seed=cfg.train.seed)
    if found is None:
        return
    unchanged, seen = found
    share = unchanged / max(seen, 1)
    msg = (f"data: {cfg.data.stain_norm} stain normalisation leaves {unchanged} of {seen} sampled "
           f"training patches ({share:.0%}) in their own stain (tissue fraction < 0.05, or the "
           "estimate failed)")
    if share > 0.2:
        msg += ": the model learns a mix of stains; check data.stain_ref or drop blank patches"
    tqdm.write(msg, file=sys.stderr)


def _note_batch_change(state: RunState) -> None:
    """Say so when a resumed run's ``train.batch_size`` differs from the checkpoint's.

    The data stream continues at the images the checkpoint consumed (``counters.images``),
    not at ``step x batch``, so no image is skipped or repeated.
    """
    c, b = state.counters, state.family.cfg.train.batch_size
    if c.images == c.step * b or not state.accelerator.is_main_process:
        return
    tqdm.write(f"resume: train.batch_size is now {b} (the checkpoint consumed {c.images} images "
               f"in {c.step} steps): the data stream continues at image {c.images}",
               file=sys.stderr)


def _init_trackers(state: RunState) -> None:
    from gen_ad.training.monitor import make_fid_monitor

    acc = state.accelerator
    if acc.log_with:
        acc.init_trackers("tb", config=_flat(to_dict(state.family.cfg)),
                          init_kwargs={"tensorboard": _tensorboard_kwargs(state.counters.step)})
    state.fid_monitor = make_fid_monitor(state.family.cfg, state.run_dir, acc.device)


def _tensorboard_kwargs(step: int) -> dict[str, int]:
    """SummaryWriter arguments for a run resumed after ``step`` (``0``: a new run).

    ``purge_step``: TensorBoard hides the earlier event files' points at steps ``> step`` (a
    killed run's, or an abandoned branch's), as the JSON logs set theirs aside; without it a
    resumed run's curves show two values at those steps.
    """
    return {"purge_step": step + 1} if step > 0 else {}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _loop(state: RunState, batches: Iterator[dict[str, Any]]) -> str | None:
    """Train until done or stopped; returns why it stopped early (``None``: done). A stopping
    step logs but draws no sample grid or FID: its checkpoint comes first."""
    from gen_ad.training.monitor import after_step

    acc, tc = state.accelerator, state.family.cfg.train
    bar = tqdm(total=_budget_total(state, time.perf_counter(), state.counters.step),
               initial=state.counters.step, disable=not acc.is_main_process,
               desc=f"train {state.family.name}", dynamic_ncols=True)
    t0, img0, step0 = time.perf_counter(), state.counters.images, state.counters.step
    while not _done(state):
        batch = next(batches)["image"].to(acc.device, non_blocking=True)
        try:
            logs = train_one_step(state, batch)
        except TrainingDivergedError as e:
            raise TrainingDivergedError(f"{e}; the newest complete checkpoint is "
                                        f"{_kept(state.run_dir)} (its tensors are finite)") from e
        bar.total = _budget_total(state, t0, step0)
        bar.update(1)
        dt = max(time.perf_counter() - t0, 1e-9)
        logs["img_per_s"] = (state.counters.images - img0) / dt
        reason = _stop_reason(state, t0)
        after_step(state, logs, bar, outputs=reason is None,
                   last=reason is not None or _done(state))
        if reason is not None:
            if acc.is_main_process:
                tqdm.write(f"{reason}: checkpointing at step {state.counters.step} and stopping")
            bar.close()
            return reason
        if _every(state.counters.step, tc.ckpt_every) and not _done(state):
            save_checkpoint(state)
    bar.close()
    return None
