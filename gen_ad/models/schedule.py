"""The weightless diffusion noise schedule and its maths, shared by training and reconstruction.

The schedule is diffusers' ``DDPMScheduler``/``DDIMScheduler`` (T=1000, linear betas 1e-4..0.02
by default, epsilon prediction): training (:mod:`gen_ad.training.ddpm`) and reconstruction
(:mod:`gen_ad.inversion.diffusion`) build it from the same config values and use the functions
below, so the forward process a UNet was trained on is the one its reverse steps undo.

Notation: ``ab_t = alphas_cumprod[t]`` (``alpha-bar_t`` of Ho et al. 2020, ``alpha_t`` of Song et
al. 2021), with ``ab_{-1} = 1`` standing for the clean image. Timesteps are ints in
``[0, T)``; ``t_prev < t``, and ``t_prev = -1`` is the step to the clean image. Images are
``[B,C,H,W]`` float (in ``[-1,1]`` for clean images; noised images are unbounded), noise is
standard (unit variance) and shaped like the image. The maths runs in the input's dtype
(float32 in this package) with the schedule's values as Python floats.

Equations:

* forward marginal ``q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)``: Ho et al. 2020, Eq. 4;
* ``x_0`` from a noise prediction ``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``:
  Ho et al. 2020, Eq. 15;
* ancestral step: a draw of the posterior ``q(x_{t-1} | x_t, x_0 = x0_hat)``, mean and variance
  of Ho et al. 2020, Eqs. 6-7 (with ``eps`` substituted this is the mean of Eq. 11);
* deterministic step: DDIM with ``eta = 0``, Song et al. 2021, Eq. 12;
* jump back ``q(x_t | x_{t_prev})`` (RePaint's resampling, Lugmayr et al. 2022, Algorithm 1):
  the forward process between two noise levels.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gen_ad.errors import ConfigError

Scheduler: TypeAlias = DDPMScheduler | DDIMScheduler
"""A diffusers noise scheduler built by :func:`build_scheduler` (its ``alphas_cumprod``,
``add_noise`` and ``config`` are what this module reads)."""


def build_scheduler(kind: Literal["ddpm", "ddim"] = "ddpm", num_train_timesteps: int = 1000,
                    beta_schedule: str = "linear", beta_start: float = 1e-4,
                    beta_end: float = 0.02, clip_sample: bool = True) -> Scheduler:
    """A diffusers noise scheduler (epsilon prediction, fixed small variance).

    Args:
        kind: ``ddpm`` (ancestral) or ``ddim``.
        num_train_timesteps: T.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        beta_start / beta_end: end points of the (scaled) linear schedule.
        clip_sample: clip predicted ``x_0`` to ``[-1,1]``.
    Returns:
        The scheduler (its ``alphas_cumprod``/``betas`` define the forward process).
    Raises:
        ConfigError: an unknown ``kind``.
    """
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  beta_start=beta_start, beta_end=beta_end, clip_sample=clip_sample,
                  prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    raise ConfigError(f"unknown scheduler kind '{kind}' (choose ddpm or ddim)")


def alpha_bar(scheduler: Scheduler, t: int) -> float:
    """``alphas_cumprod[t]`` for ``t`` in ``[0, T)``, and 1 for ``t < 0`` (the clean image)."""
    return 1.0 if t < 0 else float(scheduler.alphas_cumprod[t])


def timestep_sequence(t_start: int, steps: int | None = None) -> list[int]:
    """Descending timesteps from ``t_start`` to 0.

    Args:
        t_start: first (noisiest) timestep, ``>= 0``.
        steps: number of model evaluations; ``None`` = every step (``t_start + 1`` of them).
    Returns:
        Strictly decreasing ints starting at ``t_start`` and ending at 0 (evenly spaced, rounded).
    Raises:
        ConfigError: ``t_start < 0`` or ``steps < 1``.
    """
    if t_start < 0:
        raise ConfigError(f"start timestep must be >= 0, got {t_start}")
    if steps is None or steps >= t_start + 1:
        return list(range(t_start, -1, -1))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [t_start]
    ts = [round(t_start * (1 - i / (steps - 1))) for i in range(steps)]
    return sorted(set(ts), reverse=True)


def predict_x0(scheduler: Scheduler, x_t: torch.Tensor, t: int, eps: torch.Tensor,
               clip: bool = True) -> torch.Tensor:
    """The clean image implied by a noise prediction (Ho et al. 2020, Eq. 15).

    ``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``.

    Args:
        scheduler: the schedule.
        x_t: ``[B,C,H,W]`` noised images at timestep ``t``.
        t: timestep in ``[0, T)`` (``t < 0``: ``x_t`` is clean and is returned, clipped or not).
        eps: ``[B,C,H,W]`` predicted noise.
        clip: clamp the result to ``[-1,1]``.
    Returns:
        ``[B,C,H,W]`` predicted ``x_0`` (in ``[-1,1]`` when ``clip``).
    """
    ab = alpha_bar(scheduler, t)
    x0 = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddpm_step(scheduler: Scheduler, eps: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
              noise: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Ancestral step ``x_t -> x_{t_prev}``: a draw of ``q(x_prev | x_t, x_0 = x0_hat)``.

    Posterior mean and variance of Ho et al. 2020, Eqs. 6-7, with ``x0_hat`` from Eq. 15 (for
    ``t_prev = t - 1`` the mean equals Eq. 11's ``mu_theta``). With ``t_prev = t - 1`` this is
    ``DDPMScheduler.step`` (fixed small variance ``beta-tilde``) with ``noise`` as its variance
    noise; larger gaps use the gap's effective beta ``1 - ab_t / ab_prev``.

    Args:
        scheduler: the schedule.
        eps: ``[B,C,H,W]`` predicted noise at ``(x_t, t)``.
        x_t: ``[B,C,H,W]`` noised images.
        t: current timestep in ``[0, T)``; at ``t <= 0`` the mean is returned (no noise).
        t_prev: next timestep, ``-1 <= t_prev < t`` (``-1``: the clean image).
        noise: ``[B,C,H,W]`` standard noise for the posterior draw (ignored at ``t <= 0``).
        clip: clamp ``x0_hat`` to ``[-1,1]`` before forming the mean.
    Returns:
        ``[B,C,H,W]`` images at ``t_prev`` (unbounded; clean-image range when ``t_prev = -1``).
    """
    ab_t, ab_p = alpha_bar(scheduler, t), alpha_bar(scheduler, t_prev)
    beta = 1.0 - ab_t / ab_p
    x0 = predict_x0(scheduler, x_t, t, eps, clip)
    mean = (math.sqrt(ab_p) * beta / (1.0 - ab_t)) * x0 \
        + (math.sqrt(1.0 - beta) * (1.0 - ab_p) / (1.0 - ab_t)) * x_t
    if t <= 0:
        return mean
    var = max((1.0 - ab_p) / (1.0 - ab_t) * beta, 1e-20)
    return mean + math.sqrt(var) * noise


def ddim_step(scheduler: Scheduler, eps: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
              clip: bool = True) -> torch.Tensor:
    """Deterministic DDIM step (``eta = 0``) ``x_t -> x_{t_prev}`` (Song et al. 2021, Eq. 12).

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps``, as ``DDIMScheduler.step``.

    Args:
        scheduler: the schedule.
        eps: ``[B,C,H,W]`` predicted noise at ``(x_t, t)``.
        x_t: ``[B,C,H,W]`` noised images.
        t: current timestep in ``[0, T)``.
        t_prev: next timestep, ``-1 <= t_prev < t`` (``-1``: the clean image, ``x0_hat``).
        clip: clamp ``x0_hat`` to ``[-1,1]``.
    Returns:
        ``[B,C,H,W]`` images at ``t_prev``.
    """
    ab_p = alpha_bar(scheduler, t_prev)
    x0 = predict_x0(scheduler, x_t, t, eps, clip)
    return math.sqrt(ab_p) * x0 + math.sqrt(1.0 - ab_p) * eps


def renoise(scheduler: Scheduler, x_prev: torch.Tensor, t_prev: int, t: int,
            noise: torch.Tensor) -> torch.Tensor:
    """Forward jump ``q(x_t | x_{t_prev})`` (RePaint's "jump back", Lugmayr et al. 2022).

    ``x_t = sqrt(ab_t / ab_prev) x_prev + sqrt(1 - ab_t / ab_prev) noise``: for ``t = t_prev + 1``
    the one-step forward process ``N(sqrt(1 - beta_t) x_prev, beta_t I)`` (Ho et al. 2020,
    Eq. 2), which RePaint's resampling applies (Algorithm 1).

    Args:
        scheduler: the schedule.
        x_prev: ``[B,C,H,W]`` images at ``t_prev``.
        t_prev: their timestep, ``-1 <= t_prev < t`` (``-1``: clean images).
        t: target timestep in ``[0, T)``.
        noise: ``[B,C,H,W]`` standard noise.
    Returns:
        ``[B,C,H,W]`` images at ``t``.
    """
    ratio = alpha_bar(scheduler, t) / alpha_bar(scheduler, t_prev)
    return math.sqrt(ratio) * x_prev + math.sqrt(1.0 - ratio) * noise


def add_noise(scheduler: Scheduler, x0: torch.Tensor, t: int | torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Forward marginal ``q(x_t | x_0)`` (Ho et al. 2020, Eq. 4) through ``scheduler.add_noise``.

    ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise``.

    Args:
        scheduler: the schedule.
        x0: ``[B,C,H,W]`` clean images in ``[-1,1]``.
        t: one timestep for the whole batch (an int in ``[0, T)``; ``t < 0`` returns ``x0``),
            or per-image timesteps, a ``[B]`` long tensor with values in ``[0, T)`` (training).
        noise: ``[B,C,H,W]`` standard noise.
    Returns:
        ``[B,C,H,W]`` noised images (unbounded).
    """
    if isinstance(t, torch.Tensor):
        return scheduler.add_noise(x0, noise, t)
    if t < 0:
        return x0
    ts = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    return scheduler.add_noise(x0, noise, ts)


__all__ = ["Scheduler", "add_noise", "alpha_bar", "build_scheduler", "ddim_step", "ddpm_step",
           "predict_x0", "renoise", "timestep_sequence"]
