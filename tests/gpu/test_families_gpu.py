"""Every family on CUDA with its intended precision: train, checkpoint, resume, export, score.

Each body runs on ``cpu`` (here, proving the body) and on ``cuda`` (marked ``gpu``: skipped without
a GPU). Per device the check is the same; only the tolerance differs, and each one says why.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gen_ad.config import load_config
from gen_ad.data.synthetic import generate
from gen_ad.inversion import diffusion, projector
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.loop import run_training
from gen_ad.training.runs import load_run
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.training.wgan import WGANConfig, WGANFamily
from gen_ad.utils.io import load_safetensors

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# the CPU twin takes minutes on 2 cores: slow; on a GPU machine the cuda case takes seconds
DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]
COMMON = ["train.sample_every=0", "train.log_every=1", "train.fid_every=0", "train.ckpt_every=1"]
# family: (config class, family class, demo config, tiny overrides, Adam lr, Adam steps a weight
# can take per training step: StyleGAN2's lazy R1/path-length steps, WGAN's 5 critic updates)
FAMILIES = {
    "ddpm": (DDPMConfig, DDPMFamily, "ddpm/demo.yaml", [
        "data.synthetic=16", "data.size=32", "train.batch_size=4", "optim.warmup_steps=1",
        "model.block_out_channels=[16, 32]", "model.attention_levels=[false, false]",
        "sample.steps=2", "train.mixed_precision=bf16"], 5e-4, 1),  # bf16 autocast on GPU
    "stylegan2": (StyleGAN2Config, StyleGAN2Family, "stylegan2/demo.yaml", [
        "data.synthetic=16", "data.size=32", "train.batch_size=4", "model.channel_base=64",
        "model.channel_max=8", "model.z_dim=8", "model.w_dim=8", "loss.r1_interval=2",
        "loss.pl_interval=2", "augment.p=0.5"], 2.5e-3, 2),  # float16 top layers on GPU
    "wgan": (WGANConfig, WGANFamily, "wgan/demo.yaml", [
        "data.synthetic=24", "train.batch_size=10"], 1e-3, 5),
}
STEPS = 4


def _train(family: str, device: str, out: Path, *extra: str, resume: str | None = None) -> Path:
    cfg_cls, fam_cls, yaml, tiny, _, _ = FAMILIES[family]
    over = [*COMMON, *tiny, f"out={out}", f"train.max_steps={STEPS}",
            f"train.cpu={'true' if device == 'cpu' else 'false'}", *extra]
    return run_training(fam_cls(load_config(cfg_cls, CONFIGS / yaml, over)), resume=resume)


def _assert_resumed_equal(a: Path, b: Path, device: str, family: str) -> None:
    """The resumed run ``b`` equals the uninterrupted run ``a``: bitwise on CPU; on CUDA within
    what run-to-run nondeterminism allows (reasons below)."""
    *_, lr, per_step = FAMILIES[family]
    n = STEPS * per_step  # Adam steps any one weight took
    for f, wa, wb in _weight_pairs(a, b):
        if device == "cpu":  # CPU kernels are deterministic: exact resume is bitwise
            assert all(torch.equal(wa[k], wb[k]) for k in wa), f
            continue
        # CUDA: atomic-add backward kernels (e.g. grid_sample's) sum in a run-dependent order, so
        # two runs differ by float rounding. Adam can turn that into a different update only
        # where a gradient is lost in that rounding, by at most 2 lr sqrt(n) per step (its step is
        # lr * m / sqrt(v) and |m| / sqrt(v) <= sqrt(n) after n steps): a loose bound on the
        # largest difference. Almost all weights differ by far less, so the mean difference over
        # the model must stay under lr / 20; a resume that lost state (Adam moments, RNG streams,
        # EMA, ADA p) moves nearly every weight by ~lr and fails it.
        d = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
        assert float(d.max()) <= 2 * lr * n * n ** 0.5, f"{f}: max {float(d.max())}"
        assert float(d.mean()) <= lr / 20, f"{f}: mean {float(d.mean())}"


def _images(n: int, size: int, device: str) -> torch.Tensor:
    batch = generate(n, size, seed=3, anomaly_fraction=0.5)
    return (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def _cpu_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Diffusion noise and the projector's ``w`` statistics from CPU generators seeded like the
    device's: the CPU and CUDA scorers then see the same draws (the two devices' random streams
    differ by design)."""
    orig = diffusion.draw_noise
    # keyed by id, holding the device generator itself so that its id is never reused
    pairs: dict[int, tuple[torch.Generator, torch.Generator]] = {}

    def draw(kind, like, generator, simplex=None):
        if id(generator) not in pairs:
            pairs[id(generator)] = (generator,
                                    torch.Generator().manual_seed(generator.initial_seed()))
        return orig(kind, like.cpu(), pairs[id(generator)][1], simplex).to(like.device)

    monkeypatch.setattr(diffusion, "draw_noise", draw)

    orig_stats = projector.w_stats

    def w_stats(G, *args, **kw):  # the projection's start (mean w), from CPU draws as well
        dev = next(G.parameters()).device
        return tuple(t.to(dev) for t in orig_stats(copy.deepcopy(G).cpu(), *args, **kw))

    monkeypatch.setattr(projector, "w_stats", w_stats)


def _scorers(family: str, run: Path, device: str) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init LPIPS nets built here are the same on both devices
        return _build_scorers(family, run, device)


def _build_scorers(family: str, run: Path, device: str) -> dict:
    r = load_run(run, device)
    if family == "ddpm":
        return r.scorers(steps=3, lpips_random_init=True, anoddpm={"t": 20},
                         autoddpm={"t_recon": 20, "t_inpaint": 4, "steps_inpaint": 2,
                                   "resample": 2})
    if family == "stylegan2":  # deterministic projection: no w noise, constant noise maps
        return r.scorers(steps=5, lpips_random_init=True, initial_noise_factor=0.0,
                         optimize_noise=False)
    return r.scorers()


def _fit_score(scorer, x: torch.Tensor, device: str):
    # the same CPU seed for both devices: random-init LPIPS nets are built lazily in fit/score
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scorer.fit([x[:2].to(device)])
        return scorer.score(x.to(device))


def _check_scores(family: str, run: Path, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export -> load_run -> every scorer on ``device`` agrees with the same scorer on the CPU."""
    _cpu_draws(monkeypatch)
    x = _images(4, 32, "cpu")
    here, ref = _scorers(family, run, device), _scorers(family, run, "cpu")
    assert set(here) == set(ref) and here
    for name in here:
        got, want = _fit_score(here[name], x, device), _fit_score(ref[name], x, "cpu")
        assert torch.isfinite(got.scores).all() and got.scores.shape == (4,), name
        # CUDA: TF32 convolutions/matmuls (PyTorch's cuDNN default) keep a 10-bit mantissa, and
        # bf16/float16 layers run where the family asks for them: relative error ~1e-3 per layer,
        # a few percent after tens of layers and a few optimisation or denoising steps
        tol = {"rtol": 0.0, "atol": 1e-6} if device == "cpu" else {"rtol": 5e-2, "atol": 5e-3}
        torch.testing.assert_close(got.scores.float().cpu(), want.scores.float(), **tol,
                                   msg=f"{family}/{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["ddpm", "stylegan2"])
def test_train_resume_export_and_score(family: str, device: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = FAMILIES[family][3]
    batch = int(next(o for o in tiny if o.startswith("train.batch_size=")).split("=")[1])
    a = _train(family, device, tmp_path / "a")
    b = _train(family, device, tmp_path / "b", f"train.max_kimg={2 * batch / 1000}")
    assert (b / "state").is_dir()
    b = _train(family, device, tmp_path / "b", resume="latest")
    _assert_resumed_equal(a, b, device, family)
    _check_scores(family, a, device, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_wgan_two_stages_resume_export_and_score(device: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gan = _train("wgan", device, tmp_path / "gan")
    b = _train("wgan", device, tmp_path / "b", "train.max_kimg=0.02")
    b = _train("wgan", device, tmp_path / "b", resume="latest")
    _assert_resumed_equal(gan, b, device, "wgan")
    enc = run_training(WGANFamily(load_config(WGANConfig, CONFIGS / "wgan/demo_encoder.yaml", [
        *COMMON, "data.synthetic=24", f"out={tmp_path / 'enc'}", f"gan_run={gan}",
        "train.batch_size=6", "train.max_steps=2",
        f"train.cpu={'true' if device == 'cpu' else 'false'}"])))
    _check_scores("wgan", enc, device, monkeypatch)


def _weight_pairs(a: Path, b: Path):
    files = sorted((a / "model").glob("*.safetensors"))
    assert files
    for f in files:
        wa, wb = load_safetensors(f), load_safetensors(b / "model" / f.name)
        assert wa.keys() == wb.keys(), f.name
        yield f.name, wa, wb
