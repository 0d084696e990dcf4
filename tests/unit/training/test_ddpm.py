"""DDPM family: config, one training step, sampling, scorer options, and, on a tiny model trained
for 60 steps on synthetic normal tissue, that AnoDDPM/AutoDDPM find planted anomalies."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gen_ad.config import from_dict, load_config
from gen_ad.data.synthetic import generate
from gen_ad.errors import ConfigError
from gen_ad.inversion.lpips_net import build_lpips
from gen_ad.inversion.noise import ImageStreams
from gen_ad.inversion.simplex import simplex_like
from gen_ad.models.ema import ema_copy, ema_update
from gen_ad.scoring.maps import dilate
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.family import StepContext

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"name": "tiny", "block_out_channels": [16, 32], "attention_levels": [False, False]}


def _family(**over: object) -> DDPMFamily:
    data = {"data": {"size": 16}, "model": SMALL,
            "train": {"batch_size": 4, "max_steps": 10, "cpu": True},
            "optim": {"warmup_steps": 2}}
    data.update(over)
    return DDPMFamily(from_dict(DDPMConfig, data))


def _images(batch, ) -> torch.Tensor:
    return torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _step(fam: DDPMFamily, models: dict, opts: dict, scheds: dict, x: torch.Tensor,
          step: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(step)
    ctx = StepContext(Accelerator(cpu=True), models, opts, scheds, {}, step, 0.0, gen)
    return fam.train_step(ctx, x)


def test_shipped_configs_load() -> None:
    demo = load_config(DDPMConfig, ROOT / "configs/ddpm/demo.yaml")
    assert demo.data.train == "synthetic" and demo.model.name == "tiny"
    pcam = load_config(DDPMConfig, ROOT / "configs/ddpm/pcam64.yaml")
    assert pcam.data.size == 64 and pcam.model.name == "autoddpm"
    assert pcam.data.normal_classes == ["normal"] and pcam.optim.lr == 1e-4


@pytest.mark.parametrize("data, key", [
    ({"noise": {"kind": "perlin"}}, "noise.kind"),
    ({"anoddpm": {"t": 1000}}, "anoddpm.t"),
    ({"autoddpm": {"dilation": 2}}, "autoddpm.dilation"),
    ({"data": {"size": 30}, "model": {"name": "autoddpm"}}, "data.size"),
    ({"model": {"name": "big"}}, "model.name"),
])
def test_bad_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(DDPMConfig, data)


def _replayed_loss(unet: torch.nn.Module, x0: torch.Tensor, noise: str, fam: DDPMFamily,
                   step: int) -> float:
    """Ho et al. 2020, Algorithm 1 / Eq. 14 replayed from the step's generator (``t`` first,
    then ``eps``): ``|| eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2`` averaged,
    with ``ab`` the cumulative product of the linear betas 1e-4..0.02 (T = 1000, float32 as
    diffusers builds them)."""
    gen = torch.Generator().manual_seed(step)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen) if noise == "gaussian" \
        else simplex_like(x0, gen, fam.cfg.noise.simplex)
    ab = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), dim=0)[t]
    x_t = ab[:, None, None, None] ** 0.5 * x0 + (1 - ab[:, None, None, None]) ** 0.5 * eps
    with torch.no_grad():
        pred = unet.train()(x_t, t).sample
    return float(F.mse_loss(pred, eps))


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_train_step_is_seeded_and_updates(noise: str) -> None:
    x = _images(generate(4, 16, seed=0))
    results = []
    for _ in range(2):
        fam = _family(noise={"kind": noise})
        torch.manual_seed(0)
        models = fam.build_models()
        opts = fam.build_optimizers(models)
        scheds = fam.build_schedulers(opts)
        before = [p.detach().clone() for p in models["unet"].parameters()]
        _step(fam, models, opts, scheds, x, step=0)  # warm-up starts at lr 0
        assert scheds["unet"].get_last_lr()[0] == pytest.approx(0.5e-4)  # warm-up 1 of 2 steps
        want = _replayed_loss(models["unet"], x, noise, fam, step=1)
        logs = _step(fam, models, opts, scheds, x, step=1)
        assert float(logs["loss"]) == want  # L_simple on the step's own (t, eps) draws
        assert scheds["unet"].get_last_lr()[0] == pytest.approx(1e-4)  # peak, then cosine
        assert set(logs) == {"loss", "grad_norm"} and 0 < logs["loss"] < 10
        after = list(models["unet"].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        results.append((logs["loss"], [p.detach().clone() for p in after]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert _family().ema_models() == ["unet"]


def test_sample_shape_range_and_seed() -> None:
    fam = _family(sample={"steps": 3})
    torch.manual_seed(0)
    unet = fam.build_models()["unet"].eval()
    with torch.no_grad():
        a = fam.sample({"unet": unet}, 2, torch.Generator().manual_seed(1))
        b = fam.sample({"unet": unet}, 2, torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1.0 + 1e-6
    assert torch.equal(a, b)


def test_scorer_options() -> None:
    fam = _family(anoddpm={"t": 30}, autoddpm={"t_recon": 30})
    unet = fam.build_models()["unet"].eval()
    sc = fam.scorers({"unet": unet}, steps=4, seed=3, lpips_random_init=True,
                     autoddpm={"resample": 2})
    assert set(sc) == {"anoddpm", "autoddpm"}
    assert sc["anoddpm"].steps == 4 and sc["anoddpm"].t == 30 and sc["anoddpm"].seed == 3
    assert sc["autoddpm"].steps_recon == 4 and sc["autoddpm"].resample == 2
    with pytest.raises(ConfigError, match="unknown config key 'scorer.bogus'"):
        fam.scorers({"unet": unet}, bogus=1)
    with pytest.raises(ConfigError, match="unknown config key 'scorer.autoddpm.t'"):
        fam.scorers({"unet": unet}, autoddpm={"t": 3})
    with pytest.raises(ConfigError, match="'scorer.steps'"):
        fam.scorers({"unet": unet}, steps="many")  # a wrong type is a config error too


# ----------------------------------------------------------------------------- trained model


@pytest.fixture(scope="module")
def trained() -> tuple[DDPMFamily, torch.nn.Module]:
    """A [16, 32] UNet trained 60 steps (batch 16) on 256 synthetic normal 32x32 patches.

    60 steps pass every assertion below with the margins of 150 (CPU, 1 and 2 threads: loss
    last/first 0.18, AnoDDPM higher in 11/16, AutoDDPM Dice 0.36 vs chance 0.26) at 40 % of the
    cost; the loss drop is still asserted."""
    steps = 60
    fam = DDPMFamily(from_dict(DDPMConfig, {
        "data": {"size": 32}, "model": SMALL,
        "train": {"batch_size": 16, "max_steps": steps, "cpu": True},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
        "anoddpm": {"t": 100, "steps": 20},
        "autoddpm": {"t_recon": 100, "steps_recon": 20, "t_inpaint": 25, "steps_inpaint": 5,
                     "resample": 2, "fpr": 0.05, "lpips_net": "squeeze"}}))
    torch.manual_seed(0)
    models = fam.build_models()
    opts, ema = fam.build_optimizers(models), ema_copy(models["unet"])
    scheds = fam.build_schedulers(opts)
    x = _images(generate(256, 32, seed=0))
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=torch.Generator().manual_seed(10_000 + s))
        losses.append(_step(fam, models, opts, scheds, x[idx], s)["loss"])
        ema_update(ema, models["unet"], min(0.99, (1 + s) / (10 + s)))
    print(f"\ntrained {steps} steps in {time.perf_counter() - t0:.1f}s; loss "
          f"{sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    return fam, ema.eval()


def _in_mask_mean(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return (maps * masks).sum(dim=(1, 2)) / masks.sum(dim=(1, 2)).clamp_min(1)


def test_trained_model_finds_planted_anomalies(trained) -> None:
    fam, unet = trained
    # same tissue with and without an anomaly: pixels outside the mask are identical
    normal, anomal = generate(16, 32, seed=5), generate(16, 32, seed=5, anomaly_fraction=1.0)
    xn, xa = _images(normal), _images(anomal)
    gt = torch.from_numpy(anomal.masks)
    torch.manual_seed(0)
    lp = build_lpips(net="squeeze", spatial=True, random_init=True)  # AutoDDPM's LPIPS trunk
    sc = fam.scorers({"unet": unet}, lpips=lp)

    ano = sc["anoddpm"]
    rn, ra = ano.score(xn), ano.score(xa)
    res_n, res_a = _in_mask_mean(rn.maps, gt), _in_mask_mean(ra.maps, gt)
    print(f"AnoDDPM residual inside anomaly masks: normal {res_n.mean():.4f}, "
          f"anomalous {res_a.mean():.4f} (anomalous higher in {(res_a > res_n).sum()}/16)")
    assert res_a.mean() > res_n.mean() and (res_a > res_n).float().mean() >= 0.6
    assert torch.equal(ano.score(xa).scores, ra.scores)  # same seed, same scores

    auto = sc["autoddpm"].fit([_images(generate(32, 32, seed=7))])
    fa, fn = auto.score(xa), auto.score(xn)
    init = auto.initial_map(xa, ImageStreams.for_images(xa, auto.seed))[1]
    pred = dilate(init > auto.threshold, auto.dilation)
    assert torch.equal(pred.float().mean(dim=(1, 2)), fa.terms["mask_fraction"])
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    p, q = pred.float().mean(), gt.float().mean()
    chance = 2 * p * q / (p + q)  # Dice of a random mask of the same size
    fin_a, fin_n = _in_mask_mean(fa.maps, gt), _in_mask_mean(fn.maps, gt)
    print(f"AutoDDPM mask Dice {dice:.3f} (chance {chance:.3f}); final map inside anomaly masks: "
          f"anomalous {fin_a.mean():.4f}, normal {fin_n.mean():.4f}")
    assert dice > chance
    assert fin_a.mean() > fin_n.mean()
    assert torch.equal(auto.score(xa).scores, fa.scores)


def test_bench_smoke_prints_one_json_line(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("diffusion.py")
    assert rec["bench"] == "diffusion" and rec["hardware"]["torch"] == torch.__version__
    peers = rec["peers"]  # the timed configuration is checked; rounds interleaved, best kept
    assert peers["scores_within_rtol"] and "ours_vs_ours_fp32_eager" in peers["score_checks"]
    assert rec["ours"]["warmup_s"] > 0 and rec["settings"]["rounds"] == peers["rounds"]
    assert all(len(v) == peers["rounds"] for v in peers["round_ms_per_image"].values())
    # the bf16 peer runs where bf16 autocast is the users' choice (CUDA: --peer-bf16 auto)
    bf16 = rec["settings"]["device"].startswith("cuda")
    assert rec["settings"]["peer_bf16_run"] is bf16
    assert ("plain_bf16_channels_last_loop" in peers["ms_per_image"]) is bf16  # CPU: said only
    s = rec["simplex"]
    assert s["torch_img_per_s"] > 0 and s["max_abs_diff_loop"] < 1e-9
    assert s["max_abs_diff_vectorised"] < 1e-9 and s["speedup_vs_numpy_loop"] > 0
    assert rec["train"]["img_per_s"] > 0
    assert all(rec["recon"][m]["ms_per_image"] > 0 for m in ("anoddpm", "autoddpm"))
