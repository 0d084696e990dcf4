"""What the loop does between steps: stats lines, progress bar, sample grids, periodic FID."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from gen_ad.utils.io import append_jsonl, atomic_path, write_text

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import Dataset

    from gen_ad.config import DataConfig
    from gen_ad.metrics.fid import FIDMonitor, ImageTransform
    from gen_ad.training.loop import RunState

SAMPLE_SEED = 1234
LOG_FILES = ("stats.jsonl", "fid.jsonl")  # the run's step-stamped logs, one JSON line per record


def inference_models(models: Mapping[str, nn.Module],
                     ema: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Models for sampling: the EMA copy under the plain name where one exists."""
    out = dict(models)
    out.update(ema)
    return out


@contextmanager
def eval_mode(models: Mapping[str, nn.Module]) -> Iterator[None]:
    """``models`` in eval mode without gradients (BatchNorm uses, and leaves unchanged, its
    running statistics; dropout is off); each model's previous mode is restored after."""
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for k, m in models.items():
            m.train(was_training[k])


def sample_images(state: RunState, n: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """``n`` samples ``[n,3,H,W]`` in ``[-1,1]`` on CPU from the EMA models (eval mode)."""
    models = inference_models(state.models, state.ema)
    gen = torch.Generator(device=state.accelerator.device).manual_seed(seed)
    with eval_mode(models):
        x = state.family.sample(models, n, gen)
    return x.float().clamp(-1, 1).cpu()


def image_grid(x: torch.Tensor, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images ``[n,3,H,W]`` in ``[-1,1]`` into one uint8 ``[H',W',3]`` grid."""
    n = x.shape[0]
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=1.0)
    blank = torch.ones(nrow * ncol - n, *x.shape[1:])
    x = torch.cat([x, blank])
    grid = rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=nrow, c=ncol)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def save_png(path: str | Path, img: np.ndarray) -> None:
    """Atomically write a uint8 ``[H,W,3]`` or ``[H,W]`` array as PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def save_samples(state: RunState, n: int = 64) -> Path:
    """Write ``samples/step-<N>.png`` (fixed seed so grids are comparable over training)."""
    x = sample_images(state, n)
    path = state.run_dir / "samples" / f"step-{state.counters.step:07d}.png"
    save_png(path, image_grid(x))
    return path


def make_fid_monitor(cfg: Any, run_dir: Path, device: torch.device) -> FIDMonitor | None:
    """The run's periodic FID/KID monitor, or ``None`` when ``train.fid_every`` is 0.

    The real set is ``data.val`` when given, else the training data, read as training reads
    it (``data.size``, ``data.resize``, then ``data.stain_norm`` towards ``data.stain_ref``);
    at most ``train.fid_n`` of its images, a seeded random choice. Without Inception weights
    offline the monitor warns once and training goes on.
    """
    if cfg.train.fid_every <= 0:
        return None
    from gen_ad.data import build_dataset
    from gen_ad.metrics.fid import FIDMonitor

    real: str | Dataset = cfg.data.val or cfg.data.train
    if real == "synthetic":  # synthetic patches are never stain-normalised
        real = build_dataset(cfg.data, split="train", seed=cfg.train.seed)
    return FIDMonitor(real=real, n=cfg.train.fid_n, size=cfg.data.size, kid=True,
                      normal_classes=list(cfg.data.normal_classes), resize=cfg.data.resize,
                      inception_weights=cfg.train.fid_weights, max_real=cfg.train.fid_n,
                      device=device,
                      transform=None if not isinstance(real, str) else fid_stain(cfg.data))


def fid_stain(data_cfg: DataConfig) -> ImageTransform | None:
    """The training data's stain normalisation as a FID real-set transform (``None`` without
    ``data.stain_norm``)."""
    if getattr(data_cfg, "stain_norm", "none") == "none":
        return None
    from gen_ad.data.stain import StainNormalizer
    from gen_ad.metrics.fid import stain_transform

    norm = StainNormalizer(method=data_cfg.stain_norm, reference=data_cfg.stain_ref)
    return stain_transform(norm, data_cfg.stain_ref)


def _maybe_fid(state: RunState) -> None:
    mon = state.fid_monitor
    if mon is None or not state.accelerator.is_main_process:
        return

    def sample_fn(n: int, generator: torch.Generator) -> torch.Tensor:
        models = inference_models(state.models, state.ema)
        with eval_mode(models):
            return state.family.sample(models, n, generator)

    result = mon.maybe_compute(state.counters.step, sample_fn)
    if result:
        append_jsonl(state.run_dir / "fid.jsonl",
                     {"step": state.counters.step, "kimg": state.counters.kimg, **result})


def final_samples(state: RunState, reason: str | None = None) -> Path | None:
    """At the end of training, a last sample grid unless the final step already wrote one, or
    training stopped for its time budget (``reason``: why the loop stopped early): sampling can
    take minutes on a CPU (64 DDIM samples of a large UNet), which ``train.max_minutes`` was set
    to prevent; a line says so either way."""
    tc = state.family.cfg.train
    step = state.counters.step
    if not tc.sample_every or step % tc.sample_every == 0 or not state.accelerator.is_main_process:
        return None
    if reason is not None and reason.startswith("train.max_minutes"):
        tqdm.write(f"final sample grid skipped ({reason}; grids are drawn every "
                   f"train.sample_every={tc.sample_every} steps)")
        return None
    tqdm.write(f"final sample grid of step {step} -> {state.run_dir / 'samples'} ...")
    return save_samples(state)


def after_step(state: RunState, logs: Mapping[str, Any], bar: tqdm, *,
               outputs: bool = True, last: bool = False) -> None:
    """Logging, and (``outputs``) sample grids and FID, at their intervals (``counters.step``
    already advanced). The first and the ``last`` step of a run are always logged (so the
    progress bar and ``stats.jsonl`` end on the last step's values; every process knows it
    is the last, as the reduction needs).

    ``logs`` may hold device tensors: they are read back to the host only here, at logging time,
    averaged over the processes (each logged its own share of the batch).
    """
    tc = state.family.cfg.train
    step = state.counters.step
    if tc.log_every and (step % tc.log_every == 0 or step == 1 or last):
        values = mean_over_processes(state.accelerator, logs)
        log_stats(state, values)
        bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:5]})
    if not outputs:
        return
    if tc.sample_every and step % tc.sample_every == 0 and state.accelerator.is_main_process:
        save_samples(state)
    if tc.fid_every and step % tc.fid_every == 0:
        _maybe_fid(state)


def mean_over_processes(acc: Accelerator, logs: Mapping[str, Any]) -> dict[str, float]:
    """Logged scalars (floats or 0-d tensors) as floats, averaged over the processes under DDP
    (one reduction for all of them; every process must call it at the same step)."""
    if acc.num_processes == 1 or not logs:
        return {k: float(v) for k, v in logs.items()}
    keys = list(logs)
    flat = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=acc.device)
                        .detach().reshape(()) for k in keys])
    mean = acc.reduce(flat, reduction="mean").tolist()
    return dict(zip(keys, mean))


def log_stats(state: RunState, logs: Mapping[str, float]) -> None:
    """Append a ``stats.jsonl`` line and send the scalars to the trackers."""
    c = state.counters
    record = {"step": c.step, "kimg": round(c.kimg, 3), **{k: float(v) for k, v in logs.items()}}
    for name, sched in state.schedulers.items():
        record[f"lr_{name}"] = float(sched.get_last_lr()[0])
    if state.accelerator.is_main_process:
        append_jsonl(state.run_dir / "stats.jsonl", record)
    if state.accelerator.log_with:
        state.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=c.step)


# ----------------------------------------------------------------------------- resume


def set_aside_log_lines(run_dir: Path, step: int) -> dict[str, int]:
    """Keep in the run's logs (:data:`LOG_FILES`) only the lines of the run continued from the
    state at ``step`` (``0``: a new run); append the others to ``<name>.abandoned.jsonl``.

    A run killed at step ``N + k`` and resumed from its state at ``N`` had logged steps
    ``N+1 .. N+k`` that it logs again; a roll-back to an older state leaves the abandoned
    branch's lines. Both files are rewritten atomically; nothing is deleted. Call with the run
    locked, on the main process.

    Returns:
        ``{file name: lines set aside}`` for the files that had any.
    """
    out = {}
    for name in LOG_FILES:
        n = _set_aside(run_dir / name, step)
        if n:
            out[name] = n
    return out


def _set_aside(path: Path, step: int) -> int:
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    keep = branch_lines([_line_step(ln) for ln in lines], step)
    dropped = [ln for ln, k in zip(lines, keep, strict=True) if not k]
    if not dropped:
        return 0
    aside = path.with_name(abandoned_name(path.name))
    before = aside.read_text(encoding="utf-8") if aside.is_file() else ""
    write_text(aside, before + "".join(f"{ln}\n" for ln in dropped))  # first: nothing lost
    write_text(path, "".join(f"{ln}\n" for ln, k in zip(lines, keep, strict=True) if k))
    return len(dropped)


def abandoned_name(name: str) -> str:
    """Where the lines set aside from the log ``name`` go (``stats.abandoned.jsonl``)."""
    return f"{name.removesuffix('.jsonl')}.abandoned.jsonl"


def branch_lines(steps: list[int | None], step: int) -> list[bool]:
    """Which log lines (their ``steps``; ``None``: torn or not a record) belong to the run
    continued from ``step``: walking back from the end, each line whose step is below every
    step kept after it and at most ``step``. The kept steps strictly increase; lines of an
    abandoned branch (or logged past ``step`` before a kill) fail the test."""
    keep = [False] * len(steps)
    low = step + 1
    for i in range(len(steps) - 1, -1, -1):
        s = steps[i]
        if s is not None and s < low:
            keep[i], low = True, s
    return keep


def _line_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    s = record.get("step") if isinstance(record, dict) else None
    return s if isinstance(s, int) and not isinstance(s, bool) else None
