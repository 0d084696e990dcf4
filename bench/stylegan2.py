"""StyleGAN2 benchmark: training images/s per resolution and config, and projection ms/image for
plain vs encoder-initialised inversion at equal final LPIPS. Prints one JSON line.

    python bench/stylegan2.py            # GPU: E/F at 64-512; CPU: E/F at 1/8 width, 64-128
    python bench/stylegan2.py --smoke    # tiny, seconds on CPU (used by the test suite)
    python bench/stylegan2.py --reference DIR   # side by side with NVlabs' stylegan2-ada-pytorch

``--reference DIR`` (a checkout of github.com/NVlabs/stylegan2-ada-pytorch that the user provides;
nothing of it is shipped here) times the reference's networks, ``StyleGAN2Loss`` and ADA pipeline
('bgc', fixed p = 0.2) through its training loop's per-step work (Gmain, Greg every 4, Dmain, Dreg
every 16, lazy-regularisation learning-rate/beta scaling, ``nan_to_num`` of the gradients, G_ema
update) and gen_ad's training step as its loop runs it (the same phases, each sanitising its
gradients; the loop's finiteness check; G_ema update; ADA at the same fixed p: ``augment.ada``
off) with the same resolution, config (E: channel_base 16384; F: 32768; channel_max 512,
8 mapping layers, 4 low-precision blocks, conv_clamp 256, minibatch-stddev group), batch and
augmentation, on the same device: GPU 256 px config E batch 64 and 512 px config F batch 32 (as in
the issue); CPU at 1/8 width, 64 px, batch 8. After one warm-up step each, the two sides run
``--rounds`` interleaved rounds of ``--steps`` steps (gen_ad, reference, gen_ad, ...) and each
keeps its best round. The reference's CUDA ops compile at first use as for its users (they fall
back to its reference implementations when they cannot, or on CPU). One JSON line: both images/s
per setting, every round, the ratio (gen_ad / reference), the per-step work
(``per_step_work``), the reference checkout's commit (null when it is not a git checkout of its
own; then `py_files_sha256`, a digest of its .py files, names it) and the machine.

Projection is measured on images the generator made (targets with a known latent): plain
projection runs ``proj_steps`` steps from the mean ``w`` (GPU 1000 as in the reference, CPU 100)
and reaches LPIPS ``L``; the encoder-initialised projection (an image-to-w+ encoder trained once
for ``enc_steps`` steps, its time reported apart) restarts with ``enc_chunk`` more steps each time
until its LPIPS is ``<= L``. ``enc_ms_per_image`` is the run that matched (encoder forward + its
steps); ``enc_ms_per_image_search`` the whole search. LPIPS is VGG16 with random trunk weights
unless ``--lpips-weights`` points to the torchvision VGG16 file (timings are the same either way).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gen_ad.config import from_dict
from gen_ad.inversion.lpips_net import build_lpips
from gen_ad.inversion.projector import project, train_projection_encoder, w_stats
from gen_ad.models.ema import ema_copy, ema_update
from gen_ad.models.stylegan2 import CHANNEL_BASE
from gen_ad.training.family import StepContext
from gen_ad.training.loop import _finite_or_raise
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.utils.hardware import cpu_name

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import (  # noqa: E402
    best,
    git_commit,
    interleaved_rounds,
    machine,
    timed,
    tree_digest,
)

AUGMENT_P = 0.2  # ADA's p in the training timings ('bgc', every transform)
EMA_RAMPUP = 0.05  # both sides' G_ema half-life: batch * 10 / 32 kimg, ramped up as in their loops
PER_STEP_WORK = {
    "phases": "Gmain, Greg every 4 steps, Dmain, Dreg every 16 steps (lazy regularisation)",
    "gradient_sanitising": "nan_to_num of every gradient before each optimiser step, both sides "
                           "(gen_ad inside its phases; the reference as its training_loop.py)",
    "g_ema": "G_ema update after every step on both sides (parameters lerp, buffers copied)",
    "ada_p": f"fixed at {AUGMENT_P} on both sides (gen_ad augment.ada = false; the reference "
             "without ada_target): neither adapts p in the timed steps",
    "gen_ad_only": "its training loop's one host read per step checking the logged losses are "
                   "finite (train_one_step); the reference's loop has no such check",
    "data": "one resident batch of random images on both sides (no data loading)",
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _gen_ad_family(res: int, preset: str, batch: int, model: dict[str, Any], cpu: bool,
                   width_div: int, compile_train: bool, ada: bool) -> StyleGAN2Family:
    if width_div > 1:
        model = {"channel_base": CHANNEL_BASE[preset] // width_div, **model}
    return StyleGAN2Family(from_dict(StyleGAN2Config, {
        "data": {"size": res}, "train": {"batch_size": batch, "cpu": cpu},
        "model": {"preset": preset, **model},
        "loss": {"pl_interval": 4, "r1_interval": 16, "ema_rampup": EMA_RAMPUP},
        "augment": {"p": AUGMENT_P, "ada": ada}, "speed": {"compile_train": compile_train}}))


def gen_ad_trainer(res: int, preset: str, batch: int, model: dict[str, Any], cpu: bool,
                   width_div: int = 1, compile_train: bool = False, ada: bool = True,
                   ) -> tuple[Callable[[], None], StyleGAN2Family]:
    """A function running gen_ad's next training step as its loop does (``train_one_step``): the
    family's step (Gmain, Greg, Dmain, Dreg, each sanitising its gradients; ADA's adjustment when
    ``ada``), the loop's finiteness check of the logged losses, then the G_ema update.

    ``width_div`` divides the preset's channel_base (E 16384, F 32768), keeping F twice E's width.
    ``compile_train``: ``speed.compile_train`` (the first step compiles)."""
    fam = _gen_ad_family(res, preset, batch, model, cpu, width_div, compile_train, ada)
    acc = Accelerator(cpu=cpu)
    raw = fam.build_models()
    fam.setup(raw, acc.device)
    opts = {k: acc.prepare(o) for k, o in fam.build_optimizers(raw).items()}
    models = {k: acc.prepare(m) for k, m in raw.items()}
    ema = {n: ema_copy(raw[n]) for n in fam.ema_models()}
    batch_x = torch.rand(batch, 3, res, res, device=acc.device) * 2 - 1
    count = [0]

    def step() -> None:
        i, kimg = count[0], count[0] * batch / 1000
        gen = torch.Generator(device=acc.device).manual_seed(i)
        ctx = StepContext(acc, models, opts, {}, ema, step=i, kimg=kimg, generator=gen,
                          host_rng=random.Random(i))
        _finite_or_raise(dict(fam.train_step(ctx, batch_x)), i)
        decay = fam.ema_decay(i, kimg)
        for name, e in ema.items():
            ema_update(e, raw[name], decay)
        count[0] += 1

    return step, fam


def _steps(step: Callable[[], None], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            step()
    return run


def train_speed(res: int, preset: str, batch: int, steps: int, model: dict[str, Any],
                cpu: bool, width_div: int = 1, compile_train: bool = False,
                ) -> tuple[float, float]:
    """Training images/s of gen_ad's full step (G, PL, D, R1, ADA adapting, G_ema) over steps
    ``1..steps`` after one warm-up step; with ``steps`` a multiple of 16 the window holds whole
    lazy-R1 and path-length periods, so the figure is the amortised rate a real run sees.
    Returns (images/s, seconds of the warm-up step: with ``compile_train``, the compilation)."""
    step, _ = gen_ad_trainer(res, preset, batch, model, cpu, width_div, compile_train)
    dev = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    first, _ = timed(step, dev)
    dt, _ = timed(_steps(step, steps), dev)
    return batch * steps / dt, first


def projection_speed(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """ms/image of plain vs encoder-initialised projection at equal final LPIPS."""
    from gen_ad.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(resolution=args.proj_res, z_dim=args.proj_width, w_dim=args.proj_width,
                  channel_base=args.proj_width * 64, channel_max=args.proj_width,
                  mapping_layers=2).to(dev).eval().requires_grad_(False)
    lpips_net = build_lpips(args.lpips_trunk, weights=args.lpips_weights,
                            random_init=args.lpips_weights is None).to(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        real = G(torch.randn(64, G.z_dim, generator=gen, device=dev), noise_mode="const")
        target = G(torch.randn(args.proj_batch, G.z_dim, generator=gen, device=dev),
                   noise_mode="const")
    stats = w_stats(G)
    kw = {"lpips_net": lpips_net, "w_avg": stats[0], "w_std": stats[1]}
    _sync(dev)
    t = time.perf_counter()
    plain = project(G, target, steps=args.proj_steps, generator=gen, **kw)
    _sync(dev)
    plain_ms = (time.perf_counter() - t) * 1000 / args.proj_batch
    goal = float(plain.lpips.mean())
    print(f"plain projection: LPIPS {goal:.4f} after {args.proj_steps} steps, "
          f"{plain_ms:.0f} ms/image", file=sys.stderr, flush=True)
    t = time.perf_counter()
    E = train_projection_encoder(G, real, steps=args.enc_steps, batch_size=16, lpips_net=None)
    _sync(dev)
    enc_train_s = time.perf_counter() - t
    t_search = time.perf_counter()
    steps, reached, last_ms = 0, float("inf"), float("nan")
    while steps < args.proj_steps:  # restart with more steps until the plain LPIPS is matched
        steps += args.enc_chunk
        t = time.perf_counter()
        with torch.no_grad():
            init = E(target)
        res = project(G, target, steps=steps, latent="w+", init_ws=init, generator=gen, **kw)
        _sync(dev)
        last_ms = (time.perf_counter() - t) * 1000 / args.proj_batch
        reached = float(res.lpips.mean())
        print(f"encoder-initialised: LPIPS {reached:.4f} after {steps} steps", file=sys.stderr,
              flush=True)
        if reached <= goal:
            break
    enc_ms_total = (time.perf_counter() - t_search) * 1000 / args.proj_batch
    t = time.perf_counter()
    for i in range(min(args.proj_batch, 4)):
        project(G, target[i:i + 1], steps=args.enc_chunk, generator=gen, **kw)
    _sync(dev)
    single_ms = (time.perf_counter() - t) * 1000 / min(args.proj_batch, 4)
    t = time.perf_counter()
    project(G, target, steps=args.enc_chunk, generator=gen, **kw)
    _sync(dev)
    batched_ms = (time.perf_counter() - t) * 1000 / args.proj_batch
    return {"res": args.proj_res, "batch": args.proj_batch, "plain_steps": args.proj_steps,
            "lpips_trunk": args.lpips_trunk, "plain_lpips": goal,
            "plain_ms_per_image": plain_ms, "enc_steps_to_match": steps,
            "enc_lpips": reached, "enc_matched": reached <= goal,
            "enc_ms_per_image": last_ms, "speedup": plain_ms / last_ms,
            "enc_ms_per_image_search": enc_ms_total,
            "enc_train_steps": args.enc_steps, "enc_train_s_once": enc_train_s,
            f"batched_{args.enc_chunk}steps_ms_per_image": batched_ms,
            f"single_{args.enc_chunk}steps_ms_per_image": single_ms}


def reference_trainer(ref: str, res: int, preset: str, batch: int, model: dict[str, Any],
                      dev: torch.device) -> tuple[Callable[[], None], dict[str, Any], Any]:
    """A function running the next training step of NVlabs' stylegan2-ada-pytorch (checkout
    ``ref``) as its ``training_loop.py`` does: the phases (lazy-regularisation learning-rate and
    beta scaling), ``misc.nan_to_num`` of the gradients before each optimiser step, the G_ema
    update (parameters and buffers); ADA at a fixed ``p`` (no ``ada_target``).

    Mixed precision (``num_fp16_res = 4``) on CUDA only, as gen_ad: on CPU the reference would
    run its float16 layers in float16 (slow CPU kernels), so there it is built as ``--fp32``.
    Returns (step, the ops it runs with, its AugmentPipe).
    """
    import copy

    if ref not in sys.path:
        sys.path.insert(0, ref)
    from torch_utils import misc  # type: ignore[import-not-found]
    from training.augment import AugmentPipe  # type: ignore[import-not-found]
    from training.loss import StyleGAN2Loss  # type: ignore[import-not-found]
    from training.networks import Discriminator, Generator  # type: ignore[import-not-found]

    ops = reference_ops(ref, dev)
    base = model.get("channel_base", CHANNEL_BASE[preset])
    cmax, group = model.get("channel_max", 512), model.get("mbstd_group", 4)
    common = {"c_dim": 0, "img_resolution": res, "img_channels": 3}
    fp16_res = 4 if dev.type == "cuda" else 0  # gen_ad's low-precision layers are CUDA-only
    ops["num_fp16_res"] = fp16_res
    G = Generator(z_dim=model.get("z_dim", 512), w_dim=model.get("w_dim", 512), **common,
                  mapping_kwargs={"num_layers": model.get("mapping_layers", 8)},
                  synthesis_kwargs={"channel_base": base, "channel_max": cmax,
                                    "num_fp16_res": fp16_res, "conv_clamp": 256})
    D = Discriminator(**common, channel_base=base, channel_max=cmax, num_fp16_res=fp16_res,
                      conv_clamp=256, epilogue_kwargs={"mbstd_group_size": group})
    G, D = (m.train().requires_grad_(False).to(dev) for m in (G, D))
    G_ema = copy.deepcopy(G).eval()
    aug = AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
                      brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    aug = aug.train().requires_grad_(False).to(dev)
    aug.p.copy_(torch.as_tensor(AUGMENT_P))
    loss = StyleGAN2Loss(device=dev, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                         augment_pipe=aug, r1_gamma=1.0 if preset == "E" else 0.5)
    phases = []
    for name, module, interval in (("G", G, 4), ("D", D, 16)):
        ratio = interval / (interval + 1)  # the reference's lazy-regularisation scaling
        opt = torch.optim.Adam(module.parameters(), lr=0.0025 * ratio,
                               betas=(0.0, 0.99 ** ratio), eps=1e-8)
        phases += [(name + "main", module, opt, 1), (name + "reg", module, opt, interval)]
    real = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
    c = torch.zeros(batch, 0, device=dev)
    count = [0]

    def step() -> None:
        i = count[0]
        for name, module, opt, interval in phases:
            if i % interval:
                continue
            opt.zero_grad(set_to_none=True)
            module.requires_grad_(True)
            z = torch.randn(batch, G.z_dim, device=dev)
            loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=z, gen_c=c,
                                      sync=True, gain=interval)
            module.requires_grad_(False)
            for param in module.parameters():  # as its training_loop.py
                if param.grad is not None:
                    misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            opt.step()
        with torch.no_grad():
            ema_nimg = min(batch * 10 / 32 * 1000, i * batch * EMA_RAMPUP)
            beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.copy_(p.lerp(p_ema, beta))
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)
        count[0] += 1

    return step, ops, aug


def register_loaded_extensions() -> None:
    """Let the reference's ``custom_ops.get_plugin`` find the op it just built.

    It calls ``torch.utils.cpp_extension.load(name=...)`` and then imports ``name``; current
    PyTorch returns the built module from ``load`` without registering it in ``sys.modules``,
    so the import fails and the reference falls back to its slow ops. Wrapping ``load`` to
    register what it returns is the usual fix; the reference's own code stays untouched.
    """
    import torch.utils.cpp_extension as cpp

    if getattr(cpp.load, "_gen_ad_registers", False):
        return
    original = cpp.load

    def load(*args: Any, **kwargs: Any) -> Any:
        module = original(*args, **kwargs)
        sys.modules.setdefault(kwargs.get("name") or args[0], module)
        return module

    load._gen_ad_registers = True  # type: ignore[attr-defined]
    cpp.load = load


def build_reference_ops(ref: str) -> dict[str, Any]:
    """Build (or find built) the reference's CUDA ops, as its users' first run does."""
    if ref not in sys.path:
        sys.path.insert(0, ref)
    register_loaded_extensions()
    from torch_utils.ops import bias_act, upfirdn2d  # type: ignore[import-not-found]

    return {"bias_act_cuda": bool(bias_act._init()), "upfirdn2d_cuda": bool(upfirdn2d._init())}


def reference_ops(ref: str, dev: torch.device) -> dict[str, Any]:
    """Build the reference's CUDA ops as its training loop would, and say which ones run.

    Its ``grid_sample_gradfix`` custom op only engages on PyTorch 1.7-1.9; on later versions it
    falls back to ``F.grid_sample``, which has no CUDA second derivative, so R1 through ADA fails
    in the reference itself. Users of the reference on current PyTorch must patch it; here its
    module function is pointed at gen_ad's double-differentiable op (the same sampling), which is
    stated in the output.
    """
    from torch_utils.ops import (  # type: ignore[import-not-found]
        conv2d_gradfix,
        grid_sample_gradfix,
    )

    from gen_ad.training.grid_sample import grid_sample as ours

    conv2d_gradfix.enabled = grid_sample_gradfix.enabled = True  # as its training_loop.py
    cuda = dev.type == "cuda"
    info = build_reference_ops(ref) if cuda else {"bias_act_cuda": False, "upfirdn2d_cuda": False}
    info["extension_loader"] = ("module returned by torch's load() registered in sys.modules "
                                "(the reference imports it by name)")
    if cuda and not grid_sample_gradfix._should_use_custom_op():
        grid_sample_gradfix.grid_sample = lambda input, grid: ours(input, grid)
        info["grid_sample"] = ("gen_ad.training.grid_sample substituted: the reference's op "
                               f"does not engage on PyTorch {torch.__version__}")
    else:
        info["grid_sample"] = "reference"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as its training_loop.py (both sides)
    return info


def _compare_row(ref: str, res: int, preset: str, batch: int, steps: int, rounds: int,
                 m: dict[str, Any], dev: torch.device, compile_train: bool) -> dict[str, Any]:
    """One setting: one warm-up step each, then ``rounds`` interleaved rounds of ``steps`` steps
    (gen_ad, reference[, gen_ad compiled], gen_ad, ...); each side's best round."""
    cpu = dev.type == "cpu"
    theirs, ops, aug = reference_trainer(ref, res, preset, batch, m, dev)
    ours, fam = gen_ad_trainer(res, preset, batch, m, cpu, ada=False)
    methods = {"gen_ad": ours, "reference": theirs}
    fam_c = None
    if compile_train:
        methods["gen_ad_compiled"], fam_c = gen_ad_trainer(res, preset, batch, m, cpu,
                                                           compile_train=True, ada=False)
    warm = {k: timed(f, dev)[0] for k, f in methods.items()}  # step 0: every phase; compiles
    seconds = interleaved_rounds({k: _steps(f, steps) for k, f in methods.items()}, rounds, dev)
    rate = {k: batch * steps / v for k, v in best(seconds).items()}
    row = {"res": res, "config": preset, "batch": batch, "steps": steps, "rounds": rounds,
           "model": m, "gen_ad_img_per_s": rate["gen_ad"],
           "reference_img_per_s": rate["reference"],
           "ratio": rate["gen_ad"] / rate["reference"],
           "round_img_per_s": {k: [round(batch * steps / t, 3) for t in v]
                               for k, v in seconds.items()},
           "warmup_step_s": {k: round(v, 2) for k, v in warm.items()},
           "ada_adapts": {"gen_ad": fam.cfg.augment.ada, "reference": False},  # no ada_target
           "ada_p_end": {"gen_ad": fam.ada.p, "reference": float(aug.p),
                         **({"gen_ad_compiled": fam_c.ada.p} if fam_c else {})},
           "reference_ops": ops}
    if compile_train:
        row.update(gen_ad_compiled_img_per_s=rate["gen_ad_compiled"],
                   ratio_compiled=rate["gen_ad_compiled"] / rate["reference"],
                   compiled_first_step_s=warm["gen_ad_compiled"])
    return row


def compare_reference(ref: str, cpu: bool, smoke: bool, steps_arg: int | None = None,
                      compile_train: bool = False, rounds: int = 3) -> dict[str, Any]:
    """gen_ad vs the reference, images/s per (resolution, config, batch) and the ratio.

    With ``compile_train`` gen_ad is also timed with ``speed.compile_train`` (``*_compiled``
    keys); the headline ratio is then the compiled one."""
    dev = torch.device("cpu" if cpu else "cuda")
    if smoke:
        grid, steps, model = [(16, "E", 4)], 1, {"channel_base": 64, "channel_max": 8,
                                                  "z_dim": 8, "w_dim": 8, "mapping_layers": 2}
    elif cpu:
        grid, steps = [(64, "E", 8), (64, "F", 8)], 16
        model = {"channel_max": 64}
    else:
        grid, steps, model = [(256, "E", 64), (512, "F", 32)], 32, {}
    steps = steps_arg or steps
    rows = []
    for res, preset, batch in grid:
        m = dict(model)
        if cpu and not smoke:
            m["channel_base"] = CHANNEL_BASE[preset] // 8
        m["mbstd_group"] = min(4, batch)
        row = _compare_row(ref, res, preset, batch, steps, rounds, m, dev, compile_train)
        rows.append(row)
        print(f"{preset}{res} batch {batch}: gen_ad {row['gen_ad_img_per_s']:.3g} "
              + (f"(compiled {row['gen_ad_compiled_img_per_s']:.3g}) " if compile_train else "")
              + f"vs reference {row['reference_img_per_s']:.3g} images/s (best of {rounds} "
              "rounds)", file=sys.stderr, flush=True)
    head = rows[0]
    ours, ratio = ((head["gen_ad_compiled_img_per_s"], head["ratio_compiled"]) if compile_train
                   else (head["gen_ad_img_per_s"], head["ratio"]))
    return {"rows": rows, "ours": {"img_per_s": ours, "compile_train": compile_train},
            "peer": {"name": "NVlabs stylegan2-ada-pytorch",
                     "img_per_s": head["reference_img_per_s"]},
            "ratio": ratio}


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--lpips-weights", default=None)
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a stylegan2-ada-pytorch checkout: compare training speed with it")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per setting of --reference (default 32 on GPU; a multiple "
                        "of 16 holds whole lazy-regularisation periods)")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --reference: interleaved rounds of --steps steps per side (gen_ad, "
                        "reference, gen_ad, ...), each side's best round")
    p.add_argument("--compile", action="store_true",
                   help="also time gen_ad's training with speed.compile_train (torch.compile of "
                        "the synthesis network and D; the warm-up step compiles, not timed)")
    p.add_argument("--build-ops", action="store_true",
                   help="with --reference: only build the reference's CUDA ops, print which")
    return p.parse_args()


def train_grid(grid: list[tuple[int, str]], batch: int, steps: int, model: dict[str, Any],
               cpu: bool, width_div: int, compile_train: bool) -> dict[str, float]:
    """images/s per ``{config}{res}`` (eager; with ``compile_train`` also ``*_compiled`` and the
    compiled warm-up step's seconds)."""
    train: dict[str, float] = {}
    for r, c in grid:
        for comp in [False, True] if compile_train else [False]:
            key = f"{c}{r}" + ("_compiled" if comp else "")
            train[key], first_s = train_speed(r, c, batch, steps, model, cpu, width_div, comp)
            if comp:
                train[f"{key}_first_step_s"] = first_s
            print(f"train {key}: {train[key]:.3g} images/s", file=sys.stderr, flush=True)
    return train


def main() -> None:
    args = _parse_args()
    if args.build_ops:
        if args.reference is None:
            raise SystemExit("bench/stylegan2.py: --build-ops needs --reference DIR")
        print(json.dumps(build_reference_ops(str(Path(args.reference).resolve()))))
        return
    cpu = args.cpu or not torch.cuda.is_available()
    dev = torch.device("cpu" if cpu else "cuda")
    if args.reference is not None:
        if not (Path(args.reference) / "training" / "networks.py").is_file():
            raise SystemExit(f"bench/stylegan2.py: {args.reference} is not a stylegan2-ada-pytorch "
                             "checkout (no training/networks.py)")
        ref = Path(args.reference).resolve()
        rec = compare_reference(str(ref), cpu, args.smoke, args.steps, args.compile, args.rounds)
        print(json.dumps({"bench": "stylegan2_vs_reference", "smoke": args.smoke,
                          "device": str(dev), "gpu": torch.cuda.get_device_name(0)
                          if dev.type == "cuda" else None, "cpu": cpu_name(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count(), "augment": f"bgc, p={AUGMENT_P}",
                          "settings": {"steps": rec["rows"][0]["steps"], "rounds": args.rounds,
                                       "compile": args.compile, "cpu": cpu,
                                       "smoke": args.smoke},
                          "per_step_work": PER_STEP_WORK,
                          "ada_adapts": rec["rows"][0]["ada_adapts"],
                          "reference_checkout": {"path": str(ref), "commit": git_commit(
                              ref, own_checkout=True), "py_files_sha256": tree_digest(ref)},
                          **rec, "hardware": machine(dev)}))
        return
    args.lpips_trunk = "vgg"
    if args.smoke:
        grid, batch, steps, width_div = [(16, "E")], 4, 1, 1
        model = {"channel_base": 32, "channel_max": 4, "z_dim": 4, "w_dim": 4,
                 "mapping_layers": 2}
        args.proj_res, args.proj_width, args.proj_batch = 32, 4, 2
        args.proj_steps, args.enc_steps, args.enc_chunk = 4, 2, 2
        args.lpips_trunk = "alex"  # cheap to build; the full runs use VGG16
    elif cpu:
        grid, batch, steps = [(r, c) for r in (64, 128) for c in "EF"], 8, 16
        model, width_div = {"channel_max": 64}, 8  # E: base 2048 as configs/*/pcam64_cpu
        args.proj_res, args.proj_width, args.proj_batch = 64, 32, 8
        args.proj_steps, args.enc_steps, args.enc_chunk = 100, 200, 10
    else:
        grid, batch, steps = [(r, c) for r in (64, 128, 256, 512) for c in "EF"], 32, 32
        model, width_div = {}, 1
        args.proj_res, args.proj_width, args.proj_batch = 256, 256, 32
        args.proj_steps, args.enc_steps, args.enc_chunk = 1000, 2000, 50
    train = train_grid(grid, batch, steps, model, cpu, width_div, args.compile)
    proj = projection_speed(args, dev)
    print(json.dumps({
        "bench": "stylegan2", "smoke": args.smoke, "device": str(dev),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "cpu": cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "train_batch": batch, "train_steps": steps,
        "train_model_overrides": model, "train_channel_base_div": width_div,
        "train_augment": f"bgc, p={AUGMENT_P} (ADA adapting), G_ema updated",
        "train_img_per_s": train, "projection": proj, "hardware": machine(dev)}))


if __name__ == "__main__":
    main()
