"""Diffusion reconstruction for anomaly detection: AnoDDPM and AutoDDPM.

Both methods use a noise-prediction UNet trained on normal tissue and the diffusers schedule it
was trained with. The schedule and its maths (forward process, ``x_0`` prediction, ancestral and
DDIM steps, RePaint's jump back; Ho et al. 2020, Song et al. 2021, Lugmayr et al. 2022) are
:mod:`gen_ad.models.schedule`, shared with training and re-exported here; the reverse steps are
checked against ``DDPMScheduler.step`` / ``DDIMScheduler.step`` in the tests.

* **AnoDDPM** (Wyatt et al. 2022, "AnoDDPM: Anomaly Detection with Denoising Diffusion
  Probabilistic Models using Simplex Noise"): noise the query to step ``t`` (default 200 of 1000)
  with simplex (or Gaussian) noise, denoise back to ``t = 0`` (every ancestral step, or DDIM with
  fewer steps), map = per-pixel residual (mean over channels of ``|x - recon|``, or squared),
  score = mean of the map (or max / top-k mean).
* **AutoDDPM** (Bercea et al. 2023, "Mask, Stitch, and Re-Sample: Enhancing Robustness and
  Generalizability in Anomaly Detection through Automatic Diffusion Models"): reconstruct from
  ``t = 200``; initial map = spatial LPIPS x residual (the residual divided by its per-image 95th
  percentile and clipped to ``[0,1]``, as the reference code does); **mask** = initial map above
  a threshold calibrated on normal images at a chosen pixel false-positive rate
  (:meth:`AutoDDPMScorer.fit`), dilated 3x3; **stitch** (original outside the mask,
  reconstruction inside); **re-sample** the stitched image from ``t = 50`` with 5 resampling
  rounds per step (RePaint, Lugmayr et al. 2022: at each step the known region outside the mask
  comes from the noised original, Eq. 8a, the unknown region from the model, combined by the mask
  as in Algorithm 1; then jump back one step and repeat); final map = residual of the re-sampled
  image inside the mask; score = mean of the final map.

Every random draw of a ``score`` call comes, by default (``streams="image"``), from the image's own
counter-based stream (:class:`~gen_ad.inversion.noise.ImageStreams`, keyed by the image's pixels
and ``seed``), so an image gets the same noise, and the same score, whatever batch it is scored
in; ``streams="batch"`` draws from one ``torch.Generator`` seeded with ``seed`` per call, as a
plain sampling loop does (the noise of an image then depends on its position in the batch). All
steps are batched over images.

Speed (:class:`SpeedConfig`): the UNet can run under bf16 autocast, in channels-last memory format
and through ``torch.compile``; each defaults to on for CUDA and off on CPU (compile: on for
reconstruction only). The schedule maths and the noise stay float32 in every case.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gen_ad.errors import ConfigError, DataError
from gen_ad.inversion.noise import ImageStreams
from gen_ad.inversion.simplex import SimplexConfig, simplex_like
from gen_ad.models.schedule import (
    Scheduler,
    add_noise,
    alpha_bar,
    ddim_step,
    ddpm_step,
    predict_x0,
    renoise,
    timestep_sequence,
)
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.maps import dilate
from gen_ad.scoring.residual import image_score, lpips_map, pixel_residual
from gen_ad.scoring.thresholds import fpr_threshold

NoiseKind = Literal["gaussian", "simplex"]
SamplerKind = Literal["ddpm", "ddim"]
StreamKind = Literal["image", "batch"]
Noise = torch.Generator | ImageStreams  # where a reconstruction's random draws come from


# ----------------------------------------------------------------------------- speed


@dataclass
class SpeedConfig:
    """How the UNet runs; ``None`` = automatic (on for CUDA, off on CPU).

    Attributes:
        bf16: bf16 autocast for UNet evaluations in reconstruction and scoring (training precision
            is ``train.mixed_precision``).
        channels_last: NHWC memory format for the UNet's weights and inputs.
        compile: ``torch.compile`` the UNet for reconstruction (automatic: CUDA only).
        compile_train: compile the UNet for training too (off unless set: compilation time is
            only repaid by long runs).
    """

    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    compile_train: bool = False

    def validate(self, prefix: str) -> None:
        """Nothing to check beyond the types (kept for the config machinery)."""

    def resolve(self, device: torch.device) -> Speed:
        """The settings for a UNet on ``device``."""
        cuda = device.type == "cuda"

        def pick(v: bool | None) -> bool:
            return cuda if v is None else bool(v)

        return Speed(pick(self.bf16), pick(self.channels_last), pick(self.compile))


@dataclass(frozen=True)
class Speed:
    """Resolved :class:`SpeedConfig` (all off: the plain fp32 eager UNet)."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


def prepare_unet(unet: nn.Module, speed: Speed) -> nn.Module:
    """Apply ``speed`` to ``unet``: channels-last weights (in place), then ``torch.compile``.

    Returns the module to call (the compiled wrapper, whose parameters are ``unet``'s).
    """
    if speed.channels_last:
        unet.to(memory_format=torch.channels_last)
    if speed.compile:
        return torch.compile(unet, dynamic=False)
    return unet


# ----------------------------------------------------------------------------- noise


def draw_noise(kind: str, like: torch.Tensor, generator: torch.Generator,
               simplex: SimplexConfig | None = None) -> torch.Tensor:
    """Standard noise shaped like ``like`` ``[B,C,H,W]`` (its device and dtype): Gaussian, or
    AnoDDPM's fractal simplex noise (Wyatt et al. 2022) normalised to zero mean and unit
    variance per image; all of it drawn from ``generator``."""
    if kind == "gaussian":
        n = torch.randn(like.shape, generator=generator, device=generator.device)
        return n.to(device=like.device, dtype=like.dtype)
    if kind == "simplex":
        return simplex_like(like, generator, simplex)
    raise ConfigError(f"unknown noise kind '{kind}' (choose gaussian or simplex)")


# ----------------------------------------------------------------------------- reverse process


@dataclass
class Denoiser:
    """A trained UNet with its schedule and how reverse steps draw noise.

    Images are ``[B,C,H,W]`` float32: clean ones in ``[-1,1]``, noised ones unbounded; timesteps
    are ints in ``[0, T)``, with ``-1`` standing for the clean image.

    Attributes:
        unet: noise-prediction network (``unet(x_t, t).sample``), in eval mode.
        scheduler: the diffusers scheduler it was trained with.
        noise: ``gaussian`` or ``simplex`` (forward noise and ancestral variance noise).
        simplex: simplex parameters.
        sampler: ``ddpm`` (ancestral) or ``ddim`` (deterministic, eta 0).
        clip: clip predicted ``x_0`` to ``[-1,1]``.
        speed: bf16 autocast / channels-last inputs (the UNet itself is prepared by
            :func:`prepare_unet`).
    """

    unet: nn.Module
    scheduler: Scheduler
    noise: str = "gaussian"
    simplex: SimplexConfig = field(default_factory=SimplexConfig)
    sampler: str = "ddpm"
    clip: bool = True
    speed: Speed = field(default_factory=Speed)

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted noise ``[B,C,H,W]`` (``x_t``'s dtype, contiguous) for ``x_t`` ``[B,C,H,W]``
        at timestep ``t`` in ``[0, T)``."""
        ts = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        inp = x_t.contiguous(memory_format=torch.channels_last) if self.speed.channels_last \
            else x_t
        ctx = torch.autocast(x_t.device.type, dtype=torch.bfloat16) if self.speed.bf16 \
            else nullcontext()
        with ctx:
            out = self.unet(inp, ts).sample
        return out.to(x_t.dtype).contiguous()

    def draw(self, like: torch.Tensor, gen: Noise) -> torch.Tensor:
        """Standard noise ``[B,C,H,W]`` of kind ``noise`` shaped like ``like`` ``[B,C,H,W]``:
        from each image's stream (``ImageStreams``) or from one generator."""
        if isinstance(gen, ImageStreams):
            return gen.draw(self.noise, like, self.simplex)
        return draw_noise(self.noise, like, gen, self.simplex)

    def step(self, x_t: torch.Tensor, t: int, t_prev: int, gen: Noise) -> torch.Tensor:
        """One reverse step ``x_t -> x_{t_prev}``: DDIM (Song et al. 2021, Eq. 12) or ancestral
        (Ho et al. 2020, Eqs. 6-7 with Eq. 15's ``x_0``), see :mod:`gen_ad.models.schedule`.

        Args:
            x_t: ``[B,C,H,W]`` images at ``t``.
            t: timestep in ``[0, T)``.
            t_prev: next timestep, ``-1 <= t_prev < t`` (``-1``: the clean image).
            gen: source of the ancestral step's noise (none is drawn at ``t = 0`` or for DDIM).
        Returns:
            ``[B,C,H,W]`` images at ``t_prev``.
        """
        e = self.eps(x_t, t)
        if self.sampler == "ddim":
            return ddim_step(self.scheduler, e, x_t, t, t_prev, self.clip)
        if self.sampler != "ddpm":
            raise ConfigError(f"unknown sampler '{self.sampler}' (choose ddpm or ddim)")
        noise = self.draw(x_t, gen) if t > 0 else torch.zeros_like(x_t)
        return ddpm_step(self.scheduler, e, x_t, t, t_prev, noise, self.clip)

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, timesteps: list[int], gen: Noise) -> torch.Tensor:
        """Run the reverse process from ``timesteps[0]`` to the clean image.

        Args:
            x_t: ``[B,C,H,W]`` images at ``timesteps[0]``.
            timesteps: strictly decreasing ints in ``[0, T)`` (:func:`timestep_sequence`).
            gen: source of the ancestral steps' noise.
        Returns:
            ``[B,C,H,W]`` clean images (in ``[-1,1]`` when ``clip``; not clamped otherwise).
        """
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            x_t = self.step(x_t, t, t_prev, gen)
        return x_t

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, t_start: int, steps: int | None,
                    gen: Noise) -> torch.Tensor:
        """Noise ``x`` ``[B,3,H,W]`` in ``[-1,1]`` to ``t_start`` in ``[0, T)`` (Ho et al. 2020,
        Eq. 4) and denoise back with ``steps`` model evaluations (``None``: every step); returns
        the reconstruction ``[B,3,H,W]``."""
        x_t = add_noise(self.scheduler, x, t_start, self.draw(x, gen))
        return self.denoise(x_t, timestep_sequence(t_start, steps), gen)

    @torch.no_grad()
    def inpaint(self, x: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, t_start: int,
                steps: int | None, resample: int, gen: Noise) -> torch.Tensor:
        """RePaint-style re-sampling of the masked region (Lugmayr et al. 2022; AutoDDPM's
        re-sample stage, Bercea et al. 2023).

        At each step the unknown region (inside the mask) is the model's reverse step, the known
        region the original noised to ``t_prev`` (RePaint Eq. 8a), combined by the mask
        (Algorithm 1); all but the last round of a step then jump back to ``t``
        (:func:`~gen_ad.models.schedule.renoise`).

        Args:
            x: ``[B,3,H,W]`` original in ``[-1,1]`` (known outside the mask).
            start: ``[B,3,H,W]`` clean image noised to ``t_start`` to start from (the stitched
                image).
            mask: ``[B,H,W]`` bool, True where the model re-generates.
            t_start: first timestep, in ``[0, T)`` (AutoDDPM: 50).
            steps: model evaluations per round (``None``: every step).
            resample: rounds per step (AutoDDPM: 5); each but the last jumps back one step.
                The final step (to the clean image) runs once, as in RePaint and the AutoDDPM
                reference code (``t > 0`` condition).
            gen: source of every draw (a generator, or per-image streams).
        Returns:
            ``[B,3,H,W]`` image: ``x`` outside the mask, re-sampled inside.
        Raises:
            ValueError: ``resample`` below 1 (every step needs at least one round).
        """
        if resample < 1:
            raise ValueError(f"resample must be >= 1 (rounds per step), got {resample}")
        m = mask[:, None].to(x.dtype)
        x_t = add_noise(self.scheduler, start, t_start, self.draw(start, gen))
        ts = timestep_sequence(t_start, steps)
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            rounds = resample if t_prev >= 0 else 1  # as RePaint: no re-sampling of the last step
            for u in range(rounds):
                unknown = self.step(x_t, t, t_prev, gen)
                known = add_noise(self.scheduler, x, t_prev, self.draw(x, gen))
                x_prev = m * unknown + (1.0 - m) * known
                if u < rounds - 1:
                    x_t = renoise(self.scheduler, x_prev, t_prev, t, self.draw(x, gen))
            x_t = x_prev
        return x_t


# ----------------------------------------------------------------------------- scorers


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _denoiser(unet: nn.Module, scheduler: Scheduler, noise: str, simplex: SimplexConfig | None,
              sampler: str, speed: SpeedConfig | Speed | None) -> Denoiser:
    """A scorer's :class:`Denoiser`: the UNet in eval mode, prepared for ``speed`` on its device
    (``None``: the plain fp32 eager UNet)."""
    unet = unet.eval()
    fast = speed.resolve(_device_of(unet)) if isinstance(speed, SpeedConfig) else speed or Speed()
    return Denoiser(prepare_unet(unet, fast), scheduler, noise, simplex or SimplexConfig(),
                    sampler, bool(scheduler.config.clip_sample), fast)


def _noise_source(x: torch.Tensor, seed: int, streams: str) -> Noise:
    """The random draws of one ``score`` call on ``x`` (on the UNet's device)."""
    if streams == "image":
        return ImageStreams.for_images(x, seed)
    if streams == "batch":
        return torch.Generator(device=x.device).manual_seed(seed)
    raise ConfigError(f"unknown noise streams '{streams}' (choose image or batch)")


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise DataError(f"images must be [B,3,H,W], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("images contain NaN or infinite values")


class AnoDDPMScorer(AnomalyScorer):
    """AnoDDPM (Wyatt et al. 2022): partial diffusion to ``t`` and back; the residual is the map.

    ``score(x)`` takes images ``[B,3,H,W]`` in ``[-1,1]`` and returns scores ``[B]``, maps
    ``[B,H,W]`` ``>= 0`` and reconstructions ``[B,3,H,W]`` in ``[-1,1]``.

    Args:
        unet: trained noise-prediction UNet (EMA weights), eval mode.
        scheduler: its diffusers scheduler.
        t: noise level (AnoDDPM: about 200-250 of 1000).
        noise: ``simplex`` (AnoDDPM) or ``gaussian``.
        simplex: simplex parameters (AnoDDPM: 6 octaves, persistence 0.8, frequency 64).
        sampler: ``ddpm`` (every ancestral step) or ``ddim``.
        steps: model evaluations (``None`` = all ``t + 1``; use e.g. 20 with DDIM).
        residual: ``l1`` (mean ``|x - recon|`` over channels) or ``l2`` (mean squared).
        reduce: image score from the map: ``mean``, ``max`` or ``topk``.
        seed: seed of the noise.
        streams: ``image`` (each image's noise from its own stream, keyed by its pixels and
            ``seed``: its score does not depend on the batch) or ``batch`` (one generator per
            call, as a plain sampling loop).
    """

    name = "anoddpm"

    def __init__(self, unet: nn.Module, scheduler: Scheduler, *, t: int = 200,
                 noise: NoiseKind = "simplex", simplex: SimplexConfig | None = None,
                 sampler: SamplerKind = "ddpm", steps: int | None = None,
                 residual: Literal["l1", "l2"] = "l1",
                 reduce: Literal["mean", "max", "topk"] = "mean", seed: int = 0,
                 streams: StreamKind = "image",
                 speed: SpeedConfig | Speed | None = None) -> None:
        n_t = int(scheduler.config.num_train_timesteps)
        if not 0 <= t < n_t:
            raise ConfigError(f"anoddpm t must be in [0, {n_t}), got {t}")
        self.denoiser = _denoiser(unet, scheduler, noise, simplex, sampler, speed)
        self.t, self.steps, self.residual, self.reduce, self.seed = t, steps, residual, reduce, seed
        self.streams = streams

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> ScoreBatch:
        _check_images(x)
        dev = _device_of(self.denoiser.unet)
        x = x.to(dev, torch.float32)
        gen = _noise_source(x, self.seed, self.streams)
        recon = self.denoiser.reconstruct(x, self.t, self.steps, gen).clamp(-1.0, 1.0)
        maps = pixel_residual(x, recon, self.residual)
        return ScoreBatch(image_score(maps, self.reduce), maps, recon)


class AutoDDPMScorer(AnomalyScorer):
    """AutoDDPM (Bercea et al. 2023, "Mask, Stitch, and Re-Sample"): reconstruct, mask, stitch,
    re-sample; residual inside the mask.

    ``score(x)`` takes images ``[B,3,H,W]`` in ``[-1,1]`` and returns scores ``[B]``, maps
    ``[B,H,W]`` ``>= 0``, the re-sampled images ``[B,3,H,W]`` in ``[-1,1]`` and the terms
    ``initial`` (mean initial map, ``[B]``) and ``mask_fraction`` (``[B]`` in ``[0,1]``).

    Args:
        unet: trained noise-prediction UNet (EMA weights), eval mode.
        scheduler: its diffusers scheduler.
        t_recon: noise level of the first reconstruction (200).
        t_inpaint: start of the re-sampling (50).
        resample: resampling rounds per step (5).
        noise: ``gaussian`` (AutoDDPM) or ``simplex``.
        simplex: simplex parameters.
        sampler: ``ddpm`` or ``ddim`` for both stages.
        steps_recon / steps_inpaint: model evaluations per stage (``None`` = every step).
        fpr: pixel false-positive rate on normal images that sets the mask threshold in
            :meth:`fit`.
        threshold: fixed mask threshold (overrides calibration until :meth:`fit` is called).
        dilation: odd size of the square dilation of the mask (3).
        normalize_residual: divide the initial residual by its per-image 95th percentile and
            clip to ``[0,1]`` (as the reference code).
        final: ``mask`` (residual inside the binary mask) or ``weighted`` (residual times the
            initial map, as the reference code).
        reduce: image score from the final map.
        lpips: a spatial LPIPS module (``[B,1,H,W]`` output); built lazily from ``lpips_net``,
            ``lpips_weights`` and ``lpips_random_init`` via
            :func:`gen_ad.inversion.lpips_net.build_lpips` when ``None``; without SqueezeNet
            weights it uses the installed AlexNet (``gen-ad weights install``), with a warning,
            and its ``gen_ad_source`` says so.
        seed: seed of the noise.
        streams: ``image`` or ``batch`` (see :class:`AnoDDPMScorer`).
    """

    name = "autoddpm"

    def __init__(self, unet: nn.Module, scheduler: Scheduler, *, t_recon: int = 200,
                 t_inpaint: int = 50, resample: int = 5, noise: NoiseKind = "gaussian",
                 simplex: SimplexConfig | None = None, sampler: SamplerKind = "ddpm",
                 steps_recon: int | None = None, steps_inpaint: int | None = None,
                 fpr: float = 0.05, threshold: float | None = None, dilation: int = 3,
                 normalize_residual: bool = True, final: Literal["mask", "weighted"] = "mask",
                 reduce: Literal["mean", "max", "topk"] = "mean", lpips: nn.Module | None = None,
                 lpips_net: str = "squeeze", lpips_weights: str | None = None,
                 lpips_random_init: bool = False, seed: int = 0,
                 streams: StreamKind = "image",
                 speed: SpeedConfig | Speed | None = None) -> None:
        n_t = int(scheduler.config.num_train_timesteps)
        for key, v in (("t_recon", t_recon), ("t_inpaint", t_inpaint)):
            if not 0 <= v < n_t:
                raise ConfigError(f"autoddpm {key} must be in [0, {n_t}), got {v}")
        if resample < 1 or not 0.0 < fpr < 1.0 or dilation < 1 or dilation % 2 == 0:
            raise ConfigError("autoddpm needs resample >= 1, 0 < fpr < 1 and an odd dilation")
        if final not in ("mask", "weighted"):
            raise ConfigError(f"autoddpm final must be mask or weighted, got '{final}'")
        self.denoiser = _denoiser(unet, scheduler, noise, simplex, sampler, speed)
        self.t_recon, self.t_inpaint, self.resample = t_recon, t_inpaint, resample
        self.steps_recon, self.steps_inpaint = steps_recon, steps_inpaint
        self.fpr, self.threshold, self.dilation = fpr, threshold, dilation
        self.normalize_residual, self.final, self.reduce = normalize_residual, final, reduce
        self._lpips = lpips
        self._lpips_args: dict[str, Any] = dict(
            net=lpips_net, weights=lpips_weights, random_init=lpips_random_init,
            fallback="alex" if lpips_net == "squeeze" else None)  # labelled
        self.seed, self.streams = seed, streams

    def lpips(self) -> nn.Module:
        """The spatial LPIPS module (built on first use, on the UNet's device)."""
        if self._lpips is None:
            from gen_ad.inversion.lpips_net import build_lpips

            self._lpips = build_lpips(spatial=True, **self._lpips_args)
        return self._lpips.to(_device_of(self.denoiser.unet))

    def initial_map(self, x: torch.Tensor, gen: Noise) -> tuple[torch.Tensor, torch.Tensor]:
        """First reconstruction ``[B,3,H,W]`` in ``[-1,1]`` of ``x`` ``[B,3,H,W]`` in ``[-1,1]``,
        and AutoDDPM's initial map ``[B,H,W]`` ``>= 0`` (spatial LPIPS x residual, the residual
        in ``[0,1]`` when ``normalize_residual``)."""
        recon = self.denoiser.reconstruct(x, self.t_recon, self.steps_recon, gen).clamp(-1, 1)
        res = pixel_residual(x, recon, "l1")
        if self.normalize_residual:
            q = torch.quantile(res.flatten(1), 0.95, dim=1).clamp_min(1e-8)
            res = (res / q[:, None, None]).clamp(0.0, 1.0)
        try:
            lp = lpips_map(x, recon, self.lpips())
        except RuntimeError as e:  # e.g. SqueezeNet's pooling on images below ~32 px
            raise DataError(f"the LPIPS network cannot process {x.shape[-2]}x{x.shape[-1]} "
                            f"images ({e}); use larger patches or another lpips_net") from e
        return recon, lp * res

    @torch.no_grad()
    def calibration(self) -> dict[str, float]:
        """The calibrated pixel threshold of the initial map (empty before :meth:`fit`)."""
        return {} if self.threshold is None else {"mask_threshold": float(self.threshold)}

    def load_calibration(self, state: dict[str, float]) -> None:
        """Reuse a mask threshold saved by :meth:`calibration`."""
        if "mask_threshold" in state:
            self.threshold = float(state["mask_threshold"])

    def fit(self, normal_batches: Iterable[torch.Tensor]) -> AutoDDPMScorer:
        """Set the mask threshold to the ``1 - fpr`` quantile of normal initial-map pixels."""
        dev = _device_of(self.denoiser.unet)
        gen = torch.Generator(device=dev).manual_seed(self.seed)  # streams="batch": one for all
        values = []
        for xb in normal_batches:
            _check_images(xb)
            xb = xb.to(dev, torch.float32)
            noise = gen if self.streams == "batch" else _noise_source(xb, self.seed, self.streams)
            values.append(self.initial_map(xb, noise)[1].flatten().cpu())
        if not values:
            raise DataError("autoddpm fit() got no normal images to calibrate the mask threshold")
        self.threshold = fpr_threshold(torch.cat(values), self.fpr)
        return self

    def _threshold(self, init: torch.Tensor) -> torch.Tensor | float:
        """The calibrated threshold, or without one each image's own ``1 - fpr`` quantile of
        its initial map ``[B,H,W]`` (``[B,1,1]``; the reference code's fallback, its fixed 0.13
        being a value for its own MRI input scaling, meaningless for [-1,1] RGB LPIPS)."""
        if self.threshold is not None:
            return float(self.threshold)
        warnings.warn("AutoDDPM mask threshold not calibrated (call fit() on normal images); "
                      f"masking each image's top {100 * self.fpr:g} % of pixels instead",
                      stacklevel=3)
        return torch.quantile(init.flatten(1).float(), 1.0 - self.fpr, dim=1)[:, None, None]

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> ScoreBatch:
        _check_images(x)
        dev = _device_of(self.denoiser.unet)
        x = x.to(dev, torch.float32)
        gen = _noise_source(x, self.seed, self.streams)
        recon, init = self.initial_map(x, gen)
        # Bercea et al. 2023: mask (calibrated threshold, dilated), stitch, re-sample
        mask = dilate(init > self._threshold(init), self.dilation)
        stitched = torch.where(mask[:, None], recon, x)
        out = self.denoiser.inpaint(x, stitched, mask, self.t_inpaint, self.steps_inpaint,
                                    self.resample, gen).clamp(-1.0, 1.0)
        res = pixel_residual(x, out, "l1")
        maps = res * (mask.to(res.dtype) if self.final == "mask" else init)
        terms = {"initial": init.mean(dim=(1, 2)),
                 "mask_fraction": mask.float().mean(dim=(1, 2))}
        return ScoreBatch(image_score(maps, self.reduce), maps, out, terms)


__all__ = [  # the schedule maths is re-exported from gen_ad.models.schedule
    "AnoDDPMScorer", "AutoDDPMScorer", "Denoiser", "Speed", "SpeedConfig", "add_noise",
    "alpha_bar", "ddim_step", "ddpm_step", "draw_noise", "predict_x0", "prepare_unet", "renoise",
    "timestep_sequence"]
