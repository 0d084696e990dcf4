"""Diffusion reconstruction maths (against diffusers' schedulers) and the two scorers' mechanics
on a small random UNet (behaviour on a trained model: tests/unit/training/test_ddpm.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen_ad.errors import ConfigError, DataError
from gen_ad.inversion.diffusion import (
    AnoDDPMScorer,
    AutoDDPMScorer,
    Denoiser,
    add_noise,
    ddim_step,
    ddpm_step,
    predict_x0,
    renoise,
    timestep_sequence,
)
from gen_ad.inversion.lpips_net import build_lpips
from gen_ad.inversion.noise import ImageStreams
from gen_ad.models.schedule import build_scheduler
from gen_ad.models.unet import build_unet


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=16, block_out_channels=[16, 32],
                      attention_levels=[False, False]).eval()


@pytest.fixture(scope="module")
def lp() -> torch.nn.Module:
    return build_lpips(net="squeeze", spatial=True, random_init=True)  # needs >= 32 px


def _x(b: int = 3, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _Const(torch.nn.Module):
    """A UNet stand-in predicting a fixed noise tensor whatever ``x_t`` and ``t``."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.eps.expand_as(x))


def _alpha_bar(t: int) -> float:
    """``prod_{s<=t} (1 - beta_s)`` of the default linear schedule (Ho et al. 2020: betas
    1e-4..0.02 over T = 1000), computed here in float64."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return float(torch.prod(1.0 - betas[:t + 1]))


def test_timestep_sequences() -> None:
    assert timestep_sequence(3) == [3, 2, 1, 0]
    ts = timestep_sequence(200, 20)
    assert ts[0] == 200 and ts[-1] == 0 and len(ts) == 20
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert timestep_sequence(5, 100) == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ConfigError):
        timestep_sequence(-1)


def test_add_noise_then_exact_denoising_recovers_x0() -> None:
    s = build_scheduler("ddpm")
    x0, eps = _x(), torch.randn(3, 3, 16, 16)
    for t in (0, 200, 999):
        x_t = add_noise(s, x0, t, eps)
        ab = s.alphas_cumprod[t]
        assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
        assert torch.allclose(predict_x0(s, x_t, t, eps, clip=False), x0, atol=2e-4)


def test_ddim_step_with_true_noise_lands_on_the_previous_noised_image() -> None:
    s = build_scheduler("ddpm")
    x0, eps = _x(), torch.randn(3, 3, 16, 16)
    for t, t_prev in ((200, 150), (50, 49), (10, -1)):
        out = ddim_step(s, eps, add_noise(s, x0, t, eps), t, t_prev, clip=False)
        assert torch.allclose(out, add_noise(s, x0, t_prev, eps), atol=1e-5)


def test_ddim_step_matches_diffusers() -> None:
    d = build_scheduler("ddim")
    d.set_timesteps(10)
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t in d.timesteps[:3].tolist():
        ref = d.step(eps, t, x_t, eta=0.0).prev_sample
        assert torch.allclose(ddim_step(d, eps, x_t, t, t - 100), ref, atol=1e-5)


def test_ddpm_step_matches_diffusers() -> None:
    s = build_scheduler("ddpm")
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t in (500, 1, 0):
        ref = s.step(eps, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
        # float32 (diffusers) vs float64 coefficients: 1 - alpha_bar is ~1e-4 at t = 1
        assert torch.allclose(ddpm_step(s, eps, x_t, t, t - 1, noise), ref, atol=5e-4)


def test_renoise_is_one_forward_step() -> None:
    """One jump equals one forward step; up to float32 rounding of alphas_cumprod (whose ratio
    gives 1 - beta ~ 1e-3 to ~1e-4 relative), hence atol 1e-5 on unit-variance inputs."""
    s = build_scheduler("ddpm")
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    b = s.betas[40]
    assert torch.allclose(renoise(s, x, 39, 40, n), (1 - b).sqrt() * x + b.sqrt() * n, atol=1e-5)
    assert torch.allclose(renoise(s, x, -1, 0, n), add_noise(s, x, 0, n), atol=1e-6)


def test_inpaint_keeps_the_known_region(unet: torch.nn.Module) -> None:
    s = build_scheduler("ddpm")
    den = Denoiser(unet, s, "gaussian")
    x = _x(2)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:10, 4:10] = True
    out = den.inpaint(x, x, mask, t_start=6, steps=None, resample=2,
                      gen=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, ~mask[0]], x[:, :, ~mask[0]])
    assert not torch.allclose(out[:, :, mask[0]], x[:, :, mask[0]])


def test_inpaint_resamples_every_step_but_the_last(unet: torch.nn.Module) -> None:
    # RePaint / AutoDDPM: `resample` rounds per step while t > 0; the final step runs once
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = unet

        def forward(self, x: torch.Tensor, t: torch.Tensor):  # type: ignore[no-untyped-def]
            calls.append(int(t[0]))
            return self.inner(x, t)

    den = Denoiser(Counting(), build_scheduler("ddpm"), "gaussian")
    x = _x(1)
    mask = torch.ones(1, 16, 16, dtype=torch.bool)
    den.inpaint(x, x, mask, t_start=4, steps=None, resample=3,
                gen=torch.Generator().manual_seed(0))
    assert calls == [4] * 3 + [3] * 3 + [2] * 3 + [1] * 3 + [0]


def test_reconstruct_noises_to_t_then_denoises() -> None:
    """Denoiser.reconstruct = forward noising to ``t`` (Ho et al. 2020, Eq. 4) then the reverse
    process. With DDIM (eta 0, no clipping) and a stand-in UNet predicting the very noise the
    forward step drew, every step lands on ``sqrt(ab_prev) x + sqrt(1 - ab_prev) n`` and the
    end on ``x``; predicting zero noise, DDIM returns ``x_t / sqrt(ab_t)``."""
    s = build_scheduler("ddpm")
    x = _x(2, seed=1, size=8)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # reconstruct's draw
    oracle = Denoiser(_Const(n), s, "gaussian", sampler="ddim", clip=False)
    out = oracle.reconstruct(x, 200, 10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)
    zero = Denoiser(_Const(torch.zeros(())), s, "gaussian", sampler="ddim", clip=False)
    out0 = zero.reconstruct(x, 200, 10, torch.Generator().manual_seed(0))
    ab = _alpha_bar(200)
    want = (math.sqrt(ab) * x + math.sqrt(1 - ab) * n) / math.sqrt(ab)
    torch.testing.assert_close(out0, want, atol=1e-4, rtol=1e-4)
    assert (out0 - x).abs().mean() > 0.3  # the noise at t = 200 is visible


def test_anoddpm_scorer_reconstructs_from_the_image_stream_noise() -> None:
    """The scorer path (image streams, the default): the forward noise is the first draw of
    each image's stream; an oracle UNet knowing it gives back x (map ~0), a zero-noise UNet
    the noised image rescaled, ``clamp(x_t / sqrt(ab_t))``, and its L1 residual map."""
    s = build_scheduler("ddpm", clip_sample=False)
    x = _x(2, seed=3)
    n = ImageStreams.for_images(x, 7).draw("gaussian", x)
    kw = {"t": 200, "noise": "gaussian", "sampler": "ddim", "steps": 10, "seed": 7}
    good = AnoDDPMScorer(_Const(n), s, **kw).score(x)
    torch.testing.assert_close(good.recon, x, atol=1e-4, rtol=0)
    assert good.maps.max() < 1e-4
    blind = AnoDDPMScorer(_Const(torch.zeros(())), s, **kw).score(x)
    ab = _alpha_bar(200)
    recon = ((math.sqrt(ab) * x + math.sqrt(1 - ab) * n) / math.sqrt(ab)).clamp(-1, 1)
    torch.testing.assert_close(blind.recon, recon, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blind.maps, (x - recon).abs().mean(dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blind.scores, (x - recon).abs().mean(dim=(1, 2, 3)), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("noise, sampler", [("simplex", "ddpm"), ("gaussian", "ddim")])
def test_anoddpm_maps_scores_and_seeds(unet: torch.nn.Module, noise: str, sampler: str) -> None:
    s = build_scheduler("ddpm")
    sc = AnoDDPMScorer(unet, s, t=20, noise=noise, sampler=sampler, steps=5, seed=1)
    x = _x(3)
    a, b = sc.score(x), sc.score(x)
    assert a.scores.shape == (3,) and a.maps.shape == (3, 16, 16) and a.recon.shape == x.shape
    assert (a.maps >= 0).all() and a.recon.abs().max() <= 1
    assert torch.allclose(a.scores, a.maps.mean(dim=(1, 2)))
    assert torch.equal(a.scores, b.scores)  # same seed: identical scores
    other = AnoDDPMScorer(unet, s, t=20, noise=noise, sampler=sampler, steps=5, seed=2).score(x)
    if sampler == "ddpm" or noise == "simplex":
        assert not torch.equal(a.scores, other.scores)


def test_anoddpm_rejects_bad_input(unet: torch.nn.Module) -> None:
    s = build_scheduler("ddpm")
    with pytest.raises(ConfigError):
        AnoDDPMScorer(unet, s, t=1000)
    with pytest.raises(DataError):
        AnoDDPMScorer(unet, s, t=5).score(torch.zeros(2, 1, 16, 16))


def _first_recon(sc: AutoDDPMScorer, x: torch.Tensor) -> torch.Tensor:
    """The scorer's first reconstruction of ``x`` from the images' own streams (clamped)."""
    gen = ImageStreams.for_images(x, sc.seed)
    return sc.denoiser.reconstruct(x, sc.t_recon, sc.steps_recon, gen).clamp(-1, 1)


def _initial_ref(lp: torch.nn.Module, x: torch.Tensor, recon: torch.Tensor,
                 normalize: bool) -> torch.Tensor:
    """AutoDDPM's initial map (Bercea et al. 2023; reference code): spatial LPIPS times the L1
    residual, the residual divided by its per-image 95th percentile and clipped to [0, 1]."""
    with torch.no_grad():
        lpips_part = lp(x, recon)[:, 0].clamp_min(0)
    res = (x - recon).abs().mean(dim=1)
    if normalize:
        q95 = torch.quantile(res.flatten(1), 0.95, dim=1)[:, None, None]
        res = (res / q95).clamp(0, 1)
    return lpips_part * res


def test_autoddpm_fit_mask_and_final_map(unet: torch.nn.Module, lp: torch.nn.Module) -> None:
    s = build_scheduler("ddpm")
    sc = AutoDDPMScorer(unet, s, t_recon=20, t_inpaint=5, resample=2, steps_recon=4,
                        steps_inpaint=3, fpr=0.1, lpips=lp, seed=0)
    fit = [_x(4, seed=10, size=32), _x(4, seed=11, size=32)]
    sc.fit(fit)
    # threshold: the 1 - fpr (linear) quantile of all normal initial-map pixels
    pixels = torch.cat([_initial_ref(lp, xb, _first_recon(sc, xb), True).flatten()
                        for xb in fit])
    assert sc.threshold == float(np.quantile(pixels.double().numpy(), 0.9))
    x = _x(3, seed=12, size=32)
    a, b = sc.score(x), sc.score(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (3, 32, 32) and (a.maps >= 0).all()
    frac = a.terms["mask_fraction"]
    assert ((frac > 0) & (frac < 1)).all()  # ~10% of pixels over threshold, then dilated
    recon = _first_recon(sc, x)
    init = sc.initial_map(x, ImageStreams.for_images(x, 0))[1]
    ref = _initial_ref(lp, x, recon, True)
    torch.testing.assert_close(init, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(init, _initial_ref(lp, x, recon, False))  # normalisation matters
    torch.testing.assert_close(a.terms["initial"], ref.mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    # mask: initial map above the threshold, dilated 3x3
    mask = F.max_pool2d((ref > sc.threshold).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    assert torch.equal(mask.float().mean(dim=(1, 2)), frac)
    # final map: L1 residual of the re-sampled image inside the mask, 0 outside
    res = (x - a.recon).abs().mean(dim=1)
    torch.testing.assert_close(a.maps, res * mask, atol=1e-6, rtol=1e-5)
    assert (a.maps[mask] > 0).float().mean() > 0.5
    torch.testing.assert_close(a.scores, (res * mask).mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    assert torch.equal(a.recon[:, :, ~mask[0]][0], x[:, :, ~mask[0]][0])  # stitched outside


def test_autoddpm_weighted_final_map_and_raw_residual(unet: torch.nn.Module,
                                                      lp: torch.nn.Module) -> None:
    """final="weighted" (the reference code): the final residual times the initial map;
    normalize_residual=False: the initial map is LPIPS times the raw L1 residual."""
    s = build_scheduler("ddpm")
    sc = AutoDDPMScorer(unet, s, t_recon=20, t_inpaint=5, resample=2, steps_recon=4,
                        steps_inpaint=3, lpips=lp, seed=0, threshold=0.0,
                        normalize_residual=False, final="weighted")
    x = _x(2, seed=13, size=32)
    recon = _first_recon(sc, x)
    raw = _initial_ref(lp, x, recon, False)
    init = sc.initial_map(x, ImageStreams.for_images(x, 0))[1]
    torch.testing.assert_close(init, raw, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(init, _initial_ref(lp, x, recon, True))
    out = sc.score(x)
    want = (x - out.recon).abs().mean(dim=1) * raw
    torch.testing.assert_close(out.maps, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.scores, want.mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)


def test_autoddpm_without_calibration_warns(unet: torch.nn.Module, lp: torch.nn.Module) -> None:
    s = build_scheduler("ddpm")
    sc = AutoDDPMScorer(unet, s, t_recon=5, t_inpaint=2, resample=1, lpips=lp, fpr=0.1,
                        dilation=1)
    x = _x(2, size=32)
    with pytest.warns(UserWarning, match="not calibrated.*top 10 % of pixels"):
        out = sc.score(x)
    assert out.scores.shape == (2,)
    # each image masks its own top 10 % of initial-map pixels (the reference's fallback)
    init = sc.initial_map(x, ImageStreams.for_images(x, 0))[1]
    q = torch.quantile(init.flatten(1), 0.9, dim=1)
    assert torch.equal(out.terms["mask_fraction"], (init > q[:, None, None]).float().mean((1, 2)))
    frac = out.terms["mask_fraction"]  # 10 % up to the interpolated quantile's one pixel
    assert ((frac >= 0.1 - 1 / 1024) & (frac <= 0.1 + 1 / 1024)).all()
    with pytest.raises(DataError, match="LPIPS"):
        sc.score(_x(1, size=16))
    with pytest.raises(ConfigError):
        AutoDDPMScorer(unet, s, dilation=2)


def test_inpaint_refuses_zero_rounds(unet: torch.nn.Module) -> None:
    """resample 0 ran no round and then read a result never made (UnboundLocalError)."""
    den = Denoiser(unet, build_scheduler("ddpm"), "gaussian")
    x = _x(1)
    with pytest.raises(ValueError, match="resample must be >= 1"):
        den.inpaint(x, x, torch.ones(1, 16, 16, dtype=torch.bool), t_start=3, steps=None,
                    resample=0, gen=torch.Generator().manual_seed(0))


class _Recording(torch.nn.Module):
    """A UNet stand-in predicting zero noise that records each call's timestep and input."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        assert (t == t[0]).all()
        self.calls.append((int(t[0]), x.clone()))
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("t", [3, 37])
def test_anoddpm_noises_to_its_t_and_runs_the_reverse_process_from_there(t: int) -> None:
    """AnoDDPM's defaults (simplex noise, every ancestral step, image streams): the UNet sees
    ``t, t-1, ..., 0`` (``t + 1`` calls, never 0 alone nor T), first ``x_t`` whose noise part
    ``x_t - sqrt(ab_t) x`` has per-image standard deviation ``sqrt(1 - ab_t)`` (unit-variance
    simplex noise scaled as the schedule states) and is the image stream's first draw; with DDIM
    and ``steps`` the evaluations are :func:`timestep_sequence` from ``t``."""
    s = build_scheduler("ddpm")
    x = _x(2, seed=4)
    rec = _Recording()
    out = AnoDDPMScorer(rec, s, t=t, seed=7).score(x)
    assert [c[0] for c in rec.calls] == list(range(t, -1, -1))
    ab = _alpha_bar(t)
    noise_part = rec.calls[0][1] - math.sqrt(ab) * x
    torch.testing.assert_close(noise_part.flatten(1).std(dim=1, correction=0),
                               torch.full((2,), math.sqrt(1 - ab)), atol=1e-4, rtol=1e-3)
    n = ImageStreams.for_images(x, 7).draw("simplex", x)
    torch.testing.assert_close(noise_part, math.sqrt(1 - ab) * n, atol=1e-5, rtol=1e-4)
    assert out.scores.min() > 0
    rec.calls.clear()
    AnoDDPMScorer(rec, s, t=t, sampler="ddim", steps=3, seed=7).score(x)
    assert [c[0] for c in rec.calls] == timestep_sequence(t, 3) and rec.calls[0][0] == t


def test_anoddpm_residual_grows_with_t() -> None:
    """With a zero-noise UNet and DDIM the reconstruction is ``clamp(x_t / sqrt(ab_t))``
    (Eq. 12 with ``eps = 0``): the same per-image noise scaled by ``sqrt((1 - ab_t) / ab_t)``,
    so each image's score rises strictly with ``t`` (a scorer that ignores its ``t``, or starts
    at 0 and returns the input, gives equal or zero scores)."""
    s = build_scheduler("ddpm")
    x = _x(2, seed=5)
    scores = torch.stack([AnoDDPMScorer(_Const(torch.zeros(())), s, t=t, noise="gaussian",
                                        sampler="ddim", steps=2, seed=1).score(x).scores
                          for t in (2, 20, 100, 400)])
    assert (scores[0] > 0).all() and (scores[1:] > scores[:-1]).all()


def test_autoddpm_reconstructs_from_t_recon_and_resamples_from_t_inpaint(
        lp: torch.nn.Module) -> None:
    """AutoDDPM's two stages start where configured: the first reconstruction runs
    ``t_recon .. 0``, the re-sampling ``t_inpaint .. 1`` with ``resample`` rounds each, then 0."""
    rec = _Recording()
    sc = AutoDDPMScorer(rec, build_scheduler("ddpm"), t_recon=6, t_inpaint=3, resample=2,
                        lpips=lp, threshold=0.0, seed=0)
    sc.score(_x(1, seed=6, size=32))
    assert [c[0] for c in rec.calls] == [6, 5, 4, 3, 2, 1, 0] + [3, 3, 2, 2, 1, 1, 0]
