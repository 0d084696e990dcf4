"""Benchmark the diffusion pieces: simplex noise, DDPM training and AnoDDPM/AutoDDPM latency.

Prints one JSON line with:

* ``peers`` (and ``ours`` / ``peer`` / ``ratio`` at the top level): AnoDDPM with every ancestral
  step from ``t`` (200), ms/image, gen_ad's scorer with its automatic speed settings (CUDA: bf16
  autocast, channels-last, torch.compile; CPU: plain fp32 eager) against a plain fp32 loop over the
  same diffusers UNet and ``DDPMScheduler.step``, timed after one warm-up (compilation) call.
  Both use Gaussian noise from one generator in the same order, so they draw the same noise and
  their scores agree: to float32 rounding when ours runs fp32, within ``score_rtol`` (5e-2) under
  bf16. ``ours_fp32_eager`` is our scorer with every speed setting off.

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
                              [--exact] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from gen_ad.config import from_dict
from gen_ad.inversion.diffusion import AnoDDPMScorer, AutoDDPMScorer, Speed, SpeedConfig
from gen_ad.inversion.simplex import draw_tables, fractal_from_tables, simplex_noise
from gen_ad.models.unet import build_scheduler
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.family import StepContext
from gen_ad.utils.hardware import cpu_name

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
    shift = tables.shift.numpy()
    ref_fast = fractal_from_tables(tables, size, size, 6, 0.8, 64.0).numpy()
    out: dict[str, Any] = {"batch": b, "size": size, "torch_img_per_s": b / t_torch}
    for name, fn in (("vectorised", numpy_vec_field), ("loop", numpy_loop_field)):
        t0 = time.perf_counter()
        fields = [fn(perm[f], grad[f], off[f], shift, size, size, 6, 0.8, 64.0)
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


@torch.no_grad()
def plain_anoddpm(unet: torch.nn.Module, sched: Any, x: torch.Tensor, t_start: int,
                  gen: torch.Generator) -> torch.Tensor:
    """The plain loop a user would write: fp32 UNet, ``DDPMScheduler.step``; scores ``[B]``."""
    noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
    x_t = sched.add_noise(x, noise, torch.full((len(x),), t_start, device=x.device))
    for t in range(t_start, -1, -1):
        eps = unet(x_t, torch.full((len(x),), t, device=x.device)).sample
        x_t = sched.step(eps, t, x_t, generator=gen).prev_sample
    return (x - x_t.clamp(-1, 1)).abs().mean(1).mean((1, 2))


def bench_peers(unet_name: str, size: int, batch: int, t_start: int, device: torch.device,
                repeat: int) -> dict[str, Any]:
    """ms/image of AnoDDPM: ours (automatic speed, and fp32 eager) vs the plain loop."""
    sync = device.type == "cuda"
    torch.manual_seed(0)
    unet = _family(unet_name, size, batch).build_models()["unet"].to(device).eval()
    unet.to(memory_format=torch.contiguous_format)  # the plain loop gets the plain layout
    sched = build_scheduler("ddpm")
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x.to(device)
    auto = SpeedConfig().resolve(device)
    ours = AnoDDPMScorer(copy.deepcopy(unet), sched, t=t_start, noise="gaussian", speed=auto)
    eager = AnoDDPMScorer(copy.deepcopy(unet), sched, t=t_start, noise="gaussian", speed=Speed())

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    def scored(sc: AnoDDPMScorer, streams: str) -> torch.Tensor:
        sc.streams = streams  # one scorer (one compiled UNet) for both noise sources
        return sc.score(x).scores

    # "ours" is the default (per-image noise streams); with streams="batch" our scorer draws
    # from one generator in the plain loop's order, so its scores must equal the plain loop's
    runs = {"ours": lambda: scored(ours, "image"),
            "ours_batch_streams": lambda: scored(ours, "batch"),
            "ours_fp32_eager": lambda: scored(eager, "batch"),
            "plain_fp32_loop": lambda: plain_anoddpm(unet, sched, x, t_start, gen())}
    t0 = time.perf_counter()
    scores = {k: f().float().cpu() for k, f in runs.items()}  # warm-up (compiles ours on CUDA)
    warm_s = time.perf_counter() - t0
    ms = {k: 1e3 * _timed(f, sync, repeat) / batch for k, f in runs.items()}
    ref = scores["plain_fp32_loop"]
    rel = {k: float(((v - ref).abs() / ref.abs().clamp_min(1e-12)).max())
           for k, v in scores.items()}
    rtol = 5e-2 if auto.bf16 else 1e-4
    return {"unet": unet_name, "size": size, "batch": batch, "t": t_start, "steps": t_start + 1,
            "speed": dataclasses.asdict(auto),
            "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
            "ratio_vs_plain": round(ms["plain_fp32_loop"] / ms["ours"], 3),
            "max_rel_score_diff": {k: rel[k] for k in ("ours_batch_streams", "ours_fp32_eager")},
            "score_rtol": rtol, "scores_within_rtol": rel["ours_batch_streams"] <= rtol,
            "image_streams_vs_plain_max_rel_diff": rel["ours"],  # other noise: sampling noise
            "warmup_s_all": round(warm_s, 1)}


def main(argv: Sequence[str] | None = None) -> int:
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
    p.add_argument("--repeat", type=int, default=2)
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
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    peer_unet = a.peer_unet or ("autoddpm" if cuda else "tiny")
    peer_batch = a.peer_batch or (64 if cuda else 4)
    if a.smoke:
        a.size, a.unet, a.batch, a.noise_batch, a.train_steps = 32, "tiny", 2, 4, 1
        peer_unet, peer_batch, a.peer_t, a.repeat = "tiny", 2, 3, 1
    fam = _family(a.unet, a.size, a.batch)
    result = {
        "bench": "diffusion",
        "hardware": {"cpu": cpu_name(), "gpu": torch.cuda.get_device_name(device)
                     if device.type == "cuda" else None, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "settings": {"size": a.size, "unet": a.unet, "device": str(device), "smoke": a.smoke},
    }
    peers = bench_peers(peer_unet, a.size, peer_batch, a.peer_t, device, a.repeat)
    result.update({"ours": {"anoddpm_ms_per_image": peers["ms_per_image"]["ours"]},
                   "peer": {"name": "plain_fp32_loop",
                            "anoddpm_ms_per_image": peers["ms_per_image"]["plain_fp32_loop"]},
                   "ratio": peers["ratio_vs_plain"], "peers": peers})
    precision = a.train_precision or ("bf16" if cuda else "no")
    if a.only in ("train", "all"):
        result["train"] = bench_train(fam, a.batch, a.train_steps, device, precision)
        if a.train_compile:
            compiled = _family(a.unet, a.size, a.batch, compile_train=True)
            result["train_compiled"] = bench_train(compiled, a.batch, a.train_steps, device,
                                                   precision)
    if a.only == "all":
        result["simplex"] = bench_simplex(a.noise_batch, a.size, device, n_ref=1)
        result["recon"] = (_smoke_recon(fam, a.batch, device) if a.smoke
                           else bench_recon(fam, a.batch, device, a.exact))
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
