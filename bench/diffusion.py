"""Benchmark the diffusion pieces: simplex noise, DDPM training and AnoDDPM/AutoDDPM latency.

Prints one JSON line with:

* ``peers`` (and ``ours`` / ``peer`` / ``ratio`` at the top level): AnoDDPM with every ancestral
  step from ``t`` (200), ms/image, gen_ad's scorer with its automatic speed settings (CUDA: bf16
  autocast, channels-last, torch.compile; CPU: plain fp32 eager; per-image noise streams, its
  default) against the plain loop a diffusers user writes over the same UNet and
  ``DDPMScheduler.step``: in fp32 and, on CUDA (``--peer-bf16``), under bf16 autocast with the
  UNet and input channels-last. ``peer`` is the faster plain loop. Each method runs one warm-up
  call (timed apart: ``warmup_s``, ours' includes its compilation), then ``--rounds`` interleaved
  rounds of ``--repeat`` calls (ours, ours fp32 eager, plain fp32, plain bf16, ours, ...); each
  keeps its best round. ``ours_fp32_eager`` is our scorer with every speed setting off, same
  streams. ``score_checks``: the timed ``ours`` against ``ours_fp32_eager`` (same image streams
  and seed: equal to float32 rounding in fp32, within 5e-2 relative under bf16), and our scorer
  with one generator in the plain loop's order (``streams="batch"``) against the plain fp32 loop
  (same noise: 1e-4 fp32 eager, 5e-2 with ours' speed settings).

* ``simplex``: batched torch simplex noise (``[B,3,H,W]``, AnoDDPM defaults 6/0.8/64) in
  images/s against two straightforward per-image NumPy implementations written here: ``loop``
  (a scalar Python loop over pixels, the textbook implementation) and ``vectorised`` (NumPy over
  the pixels of one image-channel at a time). Both references run on a few images and are
  extrapolated per image; ``max_abs_diff`` checks that they compute the same field.
* ``train``: DDPM training images/s (one optimiser step per batch, ``DDPMFamily.train_step``).
* ``recon``: ms/image of AnoDDPM (t=200) and AutoDDPM (t=200, then t=50 x 5 resamples) with every
  ancestral step (``full``) and with DDIM (``ddim``: 20 steps, AutoDDPM 20 + 10 x 5). On CPU the
  ``full`` variants are estimated from the timed per-evaluation latency times the number of UNet
  evaluations (``"estimated": true``) unless ``--exact``.

    python bench/diffusion.py [--size 64] [--unet autoddpm] [--batch 16] [--device cpu|cuda]
                              [--peer-unet tiny|autoddpm] [--peer-batch 4] [--only peers|all]
                              [--rounds 3] [--repeat 1] [--peer-bf16 auto|on|off]
                              [--exact] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from gen_ad.config import from_dict
from gen_ad.inversion.diffusion import AnoDDPMScorer, AutoDDPMScorer, Speed, SpeedConfig
from gen_ad.inversion.simplex import draw_tables, fractal_from_tables, lattice_shift, simplex_noise
from gen_ad.models.schedule import build_scheduler
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.family import StepContext
from gen_ad.training.loop import release_other_state

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import best, interleaved_rounds, machine, timed  # noqa: E402

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_G2 = (3.0 - math.sqrt(3.0)) / 6.0




def _timed(fn: Callable[[], Any], sync: bool, repeat: int = 1) -> float:
    """Seconds per call (after one untimed warm-up call)."""
    fn()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


# ----------------------------------------------------------------------------- NumPy references


def _np_pixel(perm: np.ndarray, grad: np.ndarray, oi: int, oj: int, x: float, y: float) -> float:
    """Classic 2-D simplex noise at one point (scalar Python)."""
    s = (x + y) * _F2
    i, j = math.floor(x + s), math.floor(y + s)
    t = (i + j) * _G2
    x0, y0 = x - (i - t), y - (j - t)
    i1, j1 = (1, 0) if x0 > y0 else (0, 1)
    total = 0.0
    for ci, cj, dx, dy in ((i, j, x0, y0), (i + i1, j + j1, x0 - i1 + _G2, y0 - j1 + _G2),
                           (i + 1, j + 1, x0 - 1 + 2 * _G2, y0 - 1 + 2 * _G2)):
        w = 0.5 - dx * dx - dy * dy
        if w > 0:
            h = perm[((ci + oi) & 255) + perm[(cj + oj) & 255]] & 255
            total += w ** 4 * (grad[h, 0] * dx + grad[h, 1] * dy)
    return 70.0 * total


def numpy_loop_field(perm: np.ndarray, grad: np.ndarray, off: np.ndarray, shift: np.ndarray,
                     h: int, w: int, octaves: int, persistence: float,
                     frequency: float) -> np.ndarray:
    """One fractal field ``[H,W]`` by a scalar loop over pixels and octaves."""
    out = np.zeros((h, w))
    for yy in range(h):
        for xx in range(w):
            amp, wl, v = 1.0, frequency, 0.0
            for k in range(octaves):
                v += amp * _np_pixel(perm, grad, int(off[k, 0]), int(off[k, 1]),
                                     xx / wl + shift[k, 0], yy / wl + shift[k, 1])
                amp, wl = amp * persistence, wl / 2
            out[yy, xx] = v
    return out


def numpy_vec_field(perm: np.ndarray, grad: np.ndarray, off: np.ndarray, shift: np.ndarray,
                    h: int, w: int, octaves: int, persistence: float,
                    frequency: float) -> np.ndarray:
    """One fractal field ``[H,W]``, NumPy-vectorised over the pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w))
    amp, wl = 1.0, frequency
    for k in range(octaves):
        x, y = xx / wl + shift[k, 0], yy / wl + shift[k, 1]
        s = (x + y) * _F2
        i, j = np.floor(x + s), np.floor(y + s)
        t = (i + j) * _G2
        x0, y0 = x - (i - t), y - (j - t)
        i1 = (x0 > y0).astype(np.float64)
        j1 = 1.0 - i1
        corners = ((i, j, x0, y0), (i + i1, j + j1, x0 - i1 + _G2, y0 - j1 + _G2),
                   (i + 1, j + 1, x0 - 1 + 2 * _G2, y0 - 1 + 2 * _G2))
        for ci, cj, dx, dy in corners:
            ii = (ci.astype(np.int64) + off[k, 0]) & 255
            jj = (cj.astype(np.int64) + off[k, 1]) & 255
            hsh = perm[ii + perm[jj]] & 255
            wt = np.maximum(0.5 - dx * dx - dy * dy, 0.0) ** 4
            out += amp * 70.0 * wt * (grad[hsh, 0] * dx + grad[hsh, 1] * dy)
        amp, wl = amp * persistence, wl / 2
    return out


def bench_simplex(b: int, size: int, device: torch.device, n_ref: int) -> dict[str, Any]:
    """Images/s of the batched torch noise vs. the per-image NumPy references."""
    sync = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    t_torch = _timed(lambda: simplex_noise((b, 3, size, size), gen), sync, repeat=3)
    tables = draw_tables(3 * n_ref, 6, torch.Generator().manual_seed(1), dtype=torch.float64)
    perm, grad, off = tables.perm.numpy(), tables.grad.numpy(), tables.offset.numpy()
    shift = lattice_shift(tables, 64.0).numpy()  # [fields, octaves, 2]
    ref_fast = fractal_from_tables(tables, size, size, 6, 0.8, 64.0).numpy()
    out: dict[str, Any] = {"batch": b, "size": size, "torch_img_per_s": b / t_torch}
    for name, fn in (("vectorised", numpy_vec_field), ("loop", numpy_loop_field)):
        t0 = time.perf_counter()
        fields = [fn(perm[f], grad[f], off[f], shift[f], size, size, 6, 0.8, 64.0)
                  for f in range(3 * n_ref)]  # 3 channels per image
        per_img = (time.perf_counter() - t0) / n_ref
        out[f"numpy_{name}_img_per_s"] = 1.0 / per_img
        out[f"speedup_vs_numpy_{name}"] = (b / t_torch) * per_img
        out[f"max_abs_diff_{name}"] = float(np.abs(np.stack(fields) - ref_fast).max())
    return out


# ----------------------------------------------------------------------------- model timings


def _family(unet: str, size: int, batch: int, compile_train: bool = False) -> DDPMFamily:
    cfg = from_dict(DDPMConfig, {"data": {"size": size}, "model": {"name": unet},
                                 "train": {"batch_size": batch, "max_steps": 1000},
                                 "speed": {"compile_train": compile_train}})
    return DDPMFamily(cfg)


def bench_train(fam: DDPMFamily, batch: int, steps: int, device: torch.device,
                precision: str = "no") -> dict[str, Any]:
    """Training images/s of ``steps`` optimiser steps (after one warm-up step), ``precision``
    being the accelerator's autocast (``no``, ``bf16``, ``fp16``)."""
    release_other_state(device.type == "cpu", precision)  # accelerate: one state per process
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    torch.manual_seed(0)
    models = {k: m.to(device) for k, m in fam.build_models().items()}
    opts = fam.build_optimizers(models)
    scheds = fam.build_schedulers(opts)
    size = fam.cfg.data.size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    counter = [0]

    def step() -> None:
        gen = torch.Generator(device=device).manual_seed(counter[0])
        ctx = StepContext(acc, models, opts, scheds, {}, counter[0], 0.0, gen)
        fam.train_step(ctx, x)
        counter[0] += 1

    dt = _timed(step, device.type == "cuda", repeat=steps)
    return {"batch": batch, "img_per_s": batch / dt, "noise": fam.cfg.noise.kind,
            "precision": precision, "steps": steps,
            "compiled": fam.cfg.speed.compile_train}


def bench_recon(fam: DDPMFamily, batch: int, device: torch.device, exact: bool,
                ) -> dict[str, Any]:
    """ms/image of AnoDDPM and AutoDDPM, full ancestral steps and DDIM."""
    from gen_ad.inversion.lpips_net import build_lpips

    sync = device.type == "cuda"
    torch.manual_seed(0)
    unet = fam.build_models()["unet"].to(device).eval()
    sched = build_scheduler("ddpm")
    lp = build_lpips(net="vgg", spatial=True, random_init=True).to(device)
    size = fam.cfg.data.size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ts = torch.full((batch,), 100, device=device)
    with torch.no_grad():
        per_eval = _timed(lambda: unet(x, ts), sync, repeat=3)
    variants = {
        "anoddpm_full": (AnoDDPMScorer(unet, sched, t=200, noise="simplex"), 201),
        "anoddpm_ddim": (AnoDDPMScorer(unet, sched, t=200, noise="simplex", sampler="ddim",
                                       steps=20), 20),
        "autoddpm_full": (AutoDDPMScorer(unet, sched, lpips=lp, threshold=0.1), 201 + 50 * 5 + 1),
        "autoddpm_ddim": (AutoDDPMScorer(unet, sched, lpips=lp, threshold=0.1, sampler="ddim",
                                         steps_recon=20, steps_inpaint=10), 20 + 9 * 5 + 1),
    }
    out: dict[str, Any] = {"batch": batch, "unet_eval_ms_per_image": 1e3 * per_eval / batch}
    for name, (scorer, evals) in variants.items():
        estimate = name.endswith("full") and device.type == "cpu" and not exact
        if estimate:
            ms = 1e3 * per_eval * evals / batch
        else:
            ms = 1e3 * _timed(lambda s=scorer: s.score(x), sync) / batch
        out[name] = {"ms_per_image": ms, "unet_evals": evals, "estimated": estimate}
    return out


# ----------------------------------------------------------------------------- ours vs plain

PEER_BF16_SKIP = ("not run on CPU: bf16 convolutions are slow on most CPUs (our scorer runs fp32 "
                  "there too); --peer-bf16 on runs it")


@torch.no_grad()
def plain_anoddpm(unet: torch.nn.Module, sched: Any, x: torch.Tensor, t_start: int,
                  gen: torch.Generator, bf16: bool = False) -> torch.Tensor:
    """The plain loop a user would write: the UNet, ``DDPMScheduler.step``; scores ``[B]``.

    ``bf16``: the UNet under bf16 autocast (its output back to float32 for the scheduler), what a
    diffusers user adds on a GPU, with the UNet and ``x`` in channels-last (the caller's)."""
    noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
    x_t = sched.add_noise(x, noise, torch.full((len(x),), t_start, device=x.device))
    x_t = x_t.contiguous(memory_format=torch.channels_last) if bf16 else x_t
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    for t in range(t_start, -1, -1):
        with autocast:
            eps = unet(x_t, torch.full((len(x),), t, device=x.device)).sample
        x_t = sched.step(eps.float(), t, x_t, generator=gen).prev_sample
    return (x - x_t.clamp(-1, 1)).abs().mean(1).mean((1, 2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def _peer_runs(unet: torch.nn.Module, sched: Any, x: torch.Tensor, t_start: int,
               device: torch.device, speed: Speed, peer_bf16: bool,
               ) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed methods: ours (``speed``, per-image streams), ours fp32 eager (same streams),
    the plain fp32 loop and, with ``peer_bf16``, the plain loop under bf16 + channels-last."""
    ours = AnoDDPMScorer(copy.deepcopy(unet), sched, t=t_start, noise="gaussian", speed=speed)
    eager = AnoDDPMScorer(copy.deepcopy(unet), sched, t=t_start, noise="gaussian", speed=Speed())

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    def scored(sc: AnoDDPMScorer, streams: str) -> torch.Tensor:
        sc.streams = streams  # one scorer (one compiled UNet) for both noise sources
        return sc.score(x).scores

    runs = {"ours": lambda: scored(ours, "image"),
            "ours_fp32_eager": lambda: scored(eager, "image"),
            "plain_fp32_loop": lambda: plain_anoddpm(unet, sched, x, t_start, gen())}
    if peer_bf16:
        unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        runs["plain_bf16_channels_last_loop"] = lambda: plain_anoddpm(unet_cl, sched, x_cl,
                                                                      t_start, gen(), bf16=True)
    # untimed: with streams="batch" our scorer draws from one generator in the plain loop's
    # order, so its scores must equal the plain loop's
    checks = {"ours_batch_streams": lambda: scored(ours, "batch"),
              "ours_fp32_eager_batch_streams": lambda: scored(eager, "batch")}
    return {**runs, **{f"check:{k}": f for k, f in checks.items()}}


def _score_checks(scores: dict[str, torch.Tensor], rtol: float) -> dict[str, Any]:
    """Each comparison: max relative score difference, its tolerance, whether it holds."""
    pairs = {  # name: (a, b, tolerance)
        # the timed configuration against an fp32 eager run of our scorer, same image streams
        "ours_vs_ours_fp32_eager": ("ours", "ours_fp32_eager", rtol),
        "ours_batch_streams_vs_plain_fp32_loop": ("check:ours_batch_streams", "plain_fp32_loop",
                                                  rtol),
        "ours_fp32_eager_batch_streams_vs_plain_fp32_loop": (
            "check:ours_fp32_eager_batch_streams", "plain_fp32_loop", 1e-4)}
    if "plain_bf16_channels_last_loop" in scores:
        pairs["plain_bf16_vs_plain_fp32_loop"] = ("plain_bf16_channels_last_loop",
                                                  "plain_fp32_loop", 5e-2)
    out: dict[str, Any] = {}
    for name, (a, b, tol) in pairs.items():
        rel = _rel(scores[a], scores[b])
        out[name] = {"max_rel_diff": rel, "rtol": tol, "ok": rel <= tol}
    return out


def bench_peers(unet_name: str, size: int, batch: int, t_start: int, device: torch.device,
                rounds: int, repeat: int, peer_bf16: bool) -> dict[str, Any]:
    """ms/image of AnoDDPM: ours (automatic speed) vs the plain loops, best of ``rounds``
    interleaved rounds (``repeat`` calls each) after one timed warm-up call per method."""
    torch.manual_seed(0)
    unet = _family(unet_name, size, batch).build_models()["unet"].to(device).eval()
    unet.to(memory_format=torch.contiguous_format)  # the plain loop gets the plain layout
    sched = build_scheduler("ddpm")
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x.to(device)
    auto = SpeedConfig().resolve(device)
    calls = _peer_runs(unet, sched, x, t_start, device, auto, peer_bf16)
    scores, warm = {}, {}
    for name, fn in calls.items():  # warm-up: compiles ours on CUDA; checks run once here
        warm[name], out = timed(fn, device)
        scores[name] = out.float().cpu()
    timed_fns = {k: f for k, f in calls.items() if not k.startswith("check:")}
    per_round = interleaved_rounds(
        {k: (lambda f=f: [f() for _ in range(repeat)]) for k, f in timed_fns.items()},
        rounds, device)
    ms = {k: 1e3 * v / repeat / batch for k, v in best(per_round).items()}
    peer = min((k for k in ms if k.startswith("plain_")), key=ms.__getitem__)
    checks = _score_checks(scores, 5e-2 if auto.bf16 else 1e-4)
    return {"unet": unet_name, "size": size, "batch": batch, "t": t_start, "steps": t_start + 1,
            "speed": dataclasses.asdict(auto), "rounds": rounds, "repeat": repeat,
            "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
            "round_ms_per_image": {k: [round(1e3 * t / repeat / batch, 3) for t in v]
                                   for k, v in per_round.items()},
            "faster_peer": peer, "ratio_vs_faster_peer": round(ms[peer] / ms["ours"], 3),
            "ratio_vs_plain_fp32": round(ms["plain_fp32_loop"] / ms["ours"], 3),
            "bf16_peer": ("run: bf16 autocast, UNet and input channels-last" if peer_bf16
                          else PEER_BF16_SKIP),
            "score_checks": checks,
            "scores_within_rtol": all(c["ok"] for c in checks.values()),
            "warmup_s": {k: round(v, 2) for k, v in warm.items() if not k.startswith("check:")},
            "check_calls_s": {k[6:]: round(v, 2) for k, v in warm.items()
                              if k.startswith("check:")}}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--unet", default="autoddpm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--noise-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--exact", action="store_true", help="time full-step variants on CPU too")
    p.add_argument("--peer-unet", default=None, help="UNet of the peers section (default: "
                   "autoddpm on CUDA, tiny on CPU)")
    p.add_argument("--peer-batch", type=int, default=None, help="default: 64 CUDA, 4 CPU")
    p.add_argument("--peer-t", type=int, default=200)
    p.add_argument("--peer-bf16", choices=("auto", "on", "off"), default="auto",
                   help="also time the plain loop under bf16 autocast + channels-last (auto: on "
                        "CUDA only, bf16 being slow on most CPUs)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timed rounds of the peers section (best round each)")
    p.add_argument("--repeat", type=int, default=1,
                   help="calls per round of the peers section (a round's time is their mean)")
    p.add_argument("--only", choices=("peers", "train", "all"), default="all",
                   help="peers: the AnoDDPM comparison; train: and training images/s; all")
    p.add_argument("--train-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="training autocast (default: bf16 on CUDA as configs/ddpm/pcam64.yaml, "
                        "no on CPU)")
    p.add_argument("--train-compile", action="store_true",
                   help="also time training with speed.compile_train (torch.compile of the UNet; "
                   "the warm-up step compiles and is not timed)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
    a = p.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    a.peer_unet = a.peer_unet or ("autoddpm" if cuda else "tiny")
    a.peer_batch = a.peer_batch or (64 if cuda else 4)
    a.train_precision = a.train_precision or ("bf16" if cuda else "no")
    if a.smoke:
        a.size, a.unet, a.batch, a.noise_batch, a.train_steps = 32, "tiny", 2, 4, 1
        a.peer_unet, a.peer_batch, a.peer_t, a.repeat, a.rounds = "tiny", 2, 3, 1, 2
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse(argv)
    device = torch.device(a.device)
    peer_bf16 = a.peer_bf16 == "on" or (a.peer_bf16 == "auto" and device.type == "cuda")
    fam = _family(a.unet, a.size, a.batch)
    settings = {k: v for k, v in vars(a).items() if k != "device"}
    result: dict[str, Any] = {"bench": "diffusion",
                              "settings": {**settings, "device": str(device),
                                           "peer_bf16_run": peer_bf16}}
    peers = bench_peers(a.peer_unet, a.size, a.peer_batch, a.peer_t, device, a.rounds, a.repeat,
                        peer_bf16)
    ms = peers["ms_per_image"]
    result.update({"ours": {"anoddpm_ms_per_image": ms["ours"],
                            "warmup_s": peers["warmup_s"]["ours"]},
                   "peer": {"name": peers["faster_peer"],
                            "anoddpm_ms_per_image": ms[peers["faster_peer"]]},
                   "ratio": peers["ratio_vs_faster_peer"], "peers": peers})
    if a.only in ("train", "all"):
        result["train"] = bench_train(fam, a.batch, a.train_steps, device, a.train_precision)
        if a.train_compile:
            compiled = _family(a.unet, a.size, a.batch, compile_train=True)
            result["train_compiled"] = bench_train(compiled, a.batch, a.train_steps, device,
                                                   a.train_precision)
    if a.only == "all":
        result["simplex"] = bench_simplex(a.noise_batch, a.size, device, n_ref=1)
        result["recon"] = (_smoke_recon(fam, a.batch, device) if a.smoke
                           else bench_recon(fam, a.batch, device, a.exact))
    result["hardware"] = machine(device)
    print(json.dumps(result))
    return 0


def _smoke_recon(fam: DDPMFamily, batch: int, device: torch.device) -> dict[str, Any]:
    """A few-step version of :func:`bench_recon` (exercises the code path in seconds)."""
    from gen_ad.inversion.lpips_net import build_lpips

    unet = fam.build_models()["unet"].to(device).eval()
    sched = build_scheduler("ddpm")
    lp = build_lpips(net="alex", spatial=True, random_init=True).to(device)
    size = fam.cfg.data.size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    out: dict[str, Any] = {"batch": batch}
    for name, sc in (("anoddpm", AnoDDPMScorer(unet, sched, t=4)),
                     ("autoddpm", AutoDDPMScorer(unet, sched, t_recon=4, t_inpaint=2, resample=2,
                                                 lpips=lp, threshold=0.1))):
        t0 = time.perf_counter()
        sc.score(x)
        out[name] = {"ms_per_image": 1e3 * (time.perf_counter() - t0) / batch}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
