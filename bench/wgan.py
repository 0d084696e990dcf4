"""Benchmark f-AnoGAN: training images/s of both stages and scoring images/s (CPU, and GPU if any).

Prints one JSON line. Randomly initialised networks at the given resolution and width; the
throughput does not depend on the weights.

- ``gan_img_per_s``: real images consumed per second by the WGAN-GP step (``n_critic`` critic
  updates on ``batch`` images each, then one generator update), i.e. ``n_critic * batch / t``.
- ``encoder_img_per_s``: images per second of the izi_f encoder step.
- ``score_izif_img_per_s`` / ``score_iterative_img_per_s``: scoring throughput (izi_f: one
  encoder + generator + 2 critic passes; iterative: ``--iter-steps`` Adam steps on ``z``).

    python bench/wgan.py [--size 64] [--base-dim 64] [--batch 32] [--device cpu|cuda] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gen_ad.config import from_dict
from gen_ad.inversion.encoder import FAnoGANScorer
from gen_ad.training.family import StepContext
from gen_ad.training.loop import release_other_state
from gen_ad.training.wgan import WGANConfig, WGANFamily
from gen_ad.utils.hardware import cpu_name

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import machine  # noqa: E402


def _timed(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Seconds per call after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _family(stage: str, args: argparse.Namespace, batch: int) -> WGANFamily:
    return WGANFamily(from_dict(WGANConfig, {
        "stage": stage, "gan_run": "unused" if stage == "encoder" else None,
        "data": {"size": args.size}, "train": {"batch_size": batch},
        "model": {"base_dim": args.base_dim, "latent_dim": args.latent_dim},
        "gan": {"n_critic": args.n_critic}}))


def _train_rate(stage: str, args: argparse.Namespace, device: torch.device) -> float:
    batch = args.batch * (args.n_critic if stage == "gan" else 1)
    fam = _family(stage, args, batch)
    models = {k: m.to(device) for k, m in fam.build_models().items()}
    opts = fam.build_optimizers(models)
    # accelerate keeps one state per process: a CUDA Accelerator after the CPU one silently
    # stayed on the CPU (and its CPU device met the CUDA generator in the latent draw)
    release_other_state(device.type == "cpu", "no")
    acc = Accelerator(cpu=device.type == "cpu")
    if acc.device.type != device.type:
        raise RuntimeError(f"accelerate placed the run on {acc.device}, not {device}")
    x = torch.rand(batch, 3, args.size, args.size, device=device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        ctx = StepContext(acc, models, opts, {}, {}, step=0, kimg=0.0, generator=gen)
        fam.train_step(ctx, x)

    return batch / _timed(step, args.reps, device)


def _score_rates(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    fam = _family("encoder", args, args.batch)
    models = {k: m.to(device).eval() for k, m in fam.build_models().items()}
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    out = {}
    for mode, kw in (("izif", {}), ("iterative", {"steps": args.iter_steps})):
        scorer = FAnoGANScorer(generator=models["G"], critic=models["D"], encoder=models["E"],
                               mode=mode, **kw)
        out[f"score_{mode}_img_per_s"] = round(
            args.batch / _timed(lambda s=scorer: s.score(x), args.reps, device), 2)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--base-dim", type=int, default=64)
    ap.add_argument("--latent-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="images per critic update / encoder step")
    ap.add_argument("--n-critic", type=int, default=5)
    ap.add_argument("--iter-steps", type=int, default=20, help="Adam steps of iterative scoring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda if any)")
    ap.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.base_dim, args.latent_dim, args.batch = 16, 4, 16, 2
        args.reps, args.iter_steps = 1, 2
    devices = [args.device] if args.device else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    rec: dict[str, Any] = {
        "bench": "wgan", "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k != "device"} | {"devices": devices},
        "results": {}}
    for name in devices:
        dev = torch.device(name)
        torch.manual_seed(0)
        rec["results"][name] = {
            "gan_img_per_s": round(_train_rate("gan", args, dev), 2),
            "encoder_img_per_s": round(_train_rate("encoder", args, dev), 2),
            **_score_rates(args, dev)}
    rec["hardware"] = machine(devices[-1])
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
