"""StyleGAN2 projection (inversion) of a batch of images, optionally initialised by an encoder.

:func:`project` follows the reference projector of StyleGAN2(-ADA), batched: start from the mean
``w`` (of 10k mapped ``z``) or from an encoder's ``w+``; Adam (lr 0.1) with a cosine ramp-down over
the last 25% of the steps and a linear ramp-up over the first 5%; Gaussian noise on ``w`` of scale
``w_std * 0.05 * max(0, 1 - t/0.75)**2``; the generator's noise maps optimised too, with the
multi-scale autocorrelation regulariser (weight 1e5) and re-normalised to zero mean / unit
variance after every step; loss = LPIPS (VGG16) + optional pixel MSE. Each image's loss is summed,
so every image follows its own trajectory (Adam is element-wise): a batch gives the same result as
projecting its images one by one, only faster (the per-step ``w`` noise is one draw shared by the
batch, so it does not depend on the batch either).

:class:`StyleGAN2Scorer` turns projections into anomaly scores and maps (``stylegan2`` for plain
projection, ``stylegan2-enc`` for encoder-initialised projection). :func:`encoder_loss` and
:func:`train_projection_encoder` train the :class:`~gen_ad.models.stylegan2.LatentEncoder` on
generated images (known ``w``) and real normal images.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import nn

from gen_ad.errors import DataError
from gen_ad.models.stylegan2 import Discriminator, Generator, LatentEncoder
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.residual import lpips_map, pixel_residual


@dataclass
class ProjectionResult:
    """Outcome of :func:`project` for ``B`` images.

    Attributes:
        ws: ``[B,num_ws,w_dim]`` optimised latents (``w`` mode: all layers equal).
        noise: optimised noise maps, one ``[B,1,r,r]`` per noise layer.
        recon: ``[B,3,H,W]`` reconstructions in ``[-1,1]``.
        lpips: ``[B]`` final LPIPS distance (``0`` when no LPIPS net was given).
        mse: ``[B]`` final pixel MSE.
    """

    ws: torch.Tensor
    noise: list[torch.Tensor]
    recon: torch.Tensor
    lpips: torch.Tensor
    mse: torch.Tensor


@torch.no_grad()
def w_stats(G: Generator, n: int = 10_000, seed: int = 123,
            batch_size: int = 2_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[w_dim]`` and scalar std of ``w`` over ``n`` mapped ``z ~ N(0, I)`` (seeded)."""
    dev = next(G.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    ws = [G.mapping(torch.randn(min(batch_size, n - i), G.z_dim, generator=gen, device=dev))
          for i in range(0, n, batch_size)]
    w = torch.cat(ws)
    avg = w.mean(dim=0)
    std = ((w - avg).square().sum() / n).sqrt()
    return avg, std


def noise_regularizer(noise: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image multi-scale autocorrelation penalty of noise maps ``[B,1,r,r]`` -> ``[B]``."""
    total = noise[0].new_zeros(noise[0].shape[0])
    for n in noise:
        while True:
            total = total + (n * torch.roll(n, 1, dims=3)).mean(dim=[1, 2, 3]).square()
            total = total + (n * torch.roll(n, 1, dims=2)).mean(dim=[1, 2, 3]).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return total


def _lr_at(t: float, lr: float, rampdown: float, rampup: float) -> float:
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return lr * ramp * (min(1.0, t / rampup) if rampup > 0 else 1.0)


def _distance(net: nn.Module | None, a: torch.Tensor, b: torch.Tensor,
              size: int) -> torch.Tensor:
    """``[B]`` LPIPS between ``a`` and ``b`` (images above ``size`` px are area-resized first)."""
    if net is None:
        return a.new_zeros(a.shape[0])
    if a.shape[-1] > size:
        a = F.interpolate(a, size=(size, size), mode="area")
        b = F.interpolate(b, size=(size, size), mode="area")
    return net(a, b).reshape(a.shape[0], -1).mean(dim=1)


def _start_latent(G: Generator, b: int, latent: str, init_ws: torch.Tensor | None,
                  w_avg: torch.Tensor) -> torch.Tensor:
    """Starting latent, a fresh leaf: ``[B,1,w_dim]`` for ``w``, ``[B,num_ws,w_dim]`` for ``w+``.

    From ``init_ws`` ``[B,num_ws,w_dim]`` (``w`` mode averages its layers) or the mean ``w``.
    """
    start = einops.repeat(w_avg, "d -> b 1 d", b=b) if init_ws is None else init_ws.float()
    if latent == "w":
        start = start.mean(dim=1, keepdim=True)
    else:
        start = start.expand(b, G.num_ws, -1)
    return start.detach().clone()


def _noise_inputs(G: Generator, b: int, trainable: bool) -> list[torch.Tensor]:
    """Per-image copies ``[B,1,r,r]`` of the generator's constant noise maps."""
    consts = [layer.noise_const for blk in G.synthesis.blocks for layer in blk.layers()]
    return [einops.repeat(c, "h w -> b 1 h w", b=b).clone().requires_grad_(trainable)
            for c in consts]


def _renormalise_(noise: list[torch.Tensor]) -> None:
    """Give each noise map zero mean and unit variance per image, in place (as the reference)."""
    with torch.no_grad():
        for n in noise:
            n -= n.mean(dim=[1, 2, 3], keepdim=True)
            n *= n.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()


def project(G: Generator, target: torch.Tensor, *, lpips_net: nn.Module | None,
            steps: int = 1000, latent: str = "w", init_ws: torch.Tensor | None = None,
            lr: float = 0.1, lr_rampdown: float = 0.25, lr_rampup: float = 0.05,
            initial_noise_factor: float = 0.05, noise_ramp: float = 0.75,
            noise_reg_weight: float = 1e5, mse_weight: float = 0.0, optimize_noise: bool = True,
            w_avg: torch.Tensor | None = None, w_std: torch.Tensor | None = None,
            generator: torch.Generator | None = None, lpips_size: int = 256,
            ) -> ProjectionResult:
    """Project a batch of images into the generator's latent space.

    Args:
        G: the (frozen, eval-mode) generator.
        target: ``[B,3,R,R]`` images in ``[-1,1]`` at the generator's resolution.
        lpips_net: non-spatial LPIPS (:func:`~gen_ad.inversion.lpips_net.build_lpips`), or
            ``None`` for a pixel-only loss (then ``mse_weight`` must be > 0).
        steps: optimisation steps (1000 in the reference; 0 returns the initialisation).
        latent: ``w`` (one vector for all layers, as the reference) or ``w+`` (one per layer).
        init_ws: ``[B,num_ws,w_dim]`` start (e.g. from an encoder; ``w`` mode averages layers);
            default the mean ``w``.
        lr / lr_rampdown / lr_rampup: Adam learning rate and its ramps (fractions of ``steps``).
        initial_noise_factor / noise_ramp: noise on ``w`` (times ``w_std``) and its decay length;
            one draw per step shared by the batch, so an image's projection does not depend on
            the batch it is in.
        noise_reg_weight: weight of :func:`noise_regularizer`.
        mse_weight: weight of the pixel MSE term.
        optimize_noise: optimise the noise maps (else use the generator's constant noise).
        w_avg / w_std: precomputed :func:`w_stats` (computed when missing).
        generator: source of the ``w`` noise.
        lpips_size: LPIPS runs at most at this resolution (256, as the reference).
    Returns:
        A :class:`ProjectionResult`.
    """
    if target.ndim != 4 or target.shape[1] != 3 or target.shape[-1] != G.resolution:
        raise DataError(f"projection needs [B,3,{G.resolution},{G.resolution}] images, got "
                        f"{tuple(target.shape)}")
    if latent not in ("w", "w+"):
        raise ValueError(f"latent must be 'w' or 'w+', got {latent!r}")
    if lpips_net is None and mse_weight <= 0:
        raise ValueError("without an LPIPS net, mse_weight must be > 0")
    if w_avg is None or w_std is None:
        w_avg, w_std = w_stats(G)
    b, dev = target.shape[0], target.device
    target = target.float()
    w_opt = _start_latent(G, b, latent, init_ws, w_avg).requires_grad_(True)
    noise = _noise_inputs(G, b, optimize_noise)
    opt = torch.optim.Adam([w_opt] + (noise if optimize_noise else []), lr=lr, betas=(0.9, 0.999))
    with torch.enable_grad():
        for step in range(steps):
            t = step / steps
            for group in opt.param_groups:
                group["lr"] = _lr_at(t, lr, lr_rampdown, lr_rampup)
            scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2
            w_noise = torch.randn(1, 1, w_opt.shape[-1], generator=generator, device=dev) * scale
            synth = G.synthesis((w_opt + w_noise).expand(b, G.num_ws, -1), noise=noise)
            loss = _distance(lpips_net, synth, target, lpips_size)
            if mse_weight > 0:
                loss = loss + mse_weight * (synth - target).square().mean(dim=[1, 2, 3])
            if optimize_noise:
                loss = loss + noise_reg_weight * noise_regularizer(noise)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if optimize_noise:
                _renormalise_(noise)
    with torch.no_grad():
        ws = w_opt.detach().expand(b, G.num_ws, -1).clone()
        noise_final = [n.detach() for n in noise]
        # the distances are of the image returned (clamped to the image range), as the
        # scorer's pixel term and maps are: the raw synthesis can overshoot [-1, 1]
        recon = G.synthesis(ws, noise=noise_final).clamp(-1, 1)
        dist = _distance(lpips_net, recon, target, lpips_size)
        mse = (recon - target).square().mean(dim=[1, 2, 3])
    return ProjectionResult(ws, noise_final, recon, dist, mse)


# ----------------------------------------------------------------------------- encoder


def encoder_loss(E: nn.Module, G: Generator, real: torch.Tensor, *,
                 generator: torch.Generator | None, lpips_net: nn.Module | None = None,
                 w_weight: float = 1.0, lpips_weight: float = 1.0,
                 mix_prob: float = 0.9, host_rng: random.Random | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of the projection encoder on one batch.

    Generated half: ``w+`` from random ``z`` (with style mixing, so ``w+`` varies by layer) and its
    image; the encoder must recover ``w+`` (MSE) and the image. Real half: normal images must be
    reconstructed through the frozen generator. Image terms are pixel MSE + ``lpips_weight`` x
    LPIPS (when a net is given).

    Args:
        E: the encoder (trainable). G: the frozen generator (eval mode).
        real: ``[b,3,R,R]`` normal images in ``[-1,1]``.
        generator: source of ``z``, mixing and noise.
        host_rng: a Python RNG for the style-mixing cut-off and coin (no device sync in a
            training step); default: ``generator``.
    Returns:
        ``(loss, logs)`` with logs ``loss_e``, ``w_mse``, ``img_mse``, ``real_mse``.
    """
    b, dev = real.shape[0], real.device
    with torch.no_grad():
        z = torch.randn(b, G.z_dim, generator=generator, device=dev)
        z2 = torch.randn(b, G.z_dim, generator=generator, device=dev)
        if host_rng is not None:
            cut = host_rng.randrange(1, G.num_ws)
            mix = host_rng.random() < mix_prob
        else:
            cut = int(torch.randint(1, G.num_ws, (1,), generator=generator, device=dev))
            mix = float(torch.rand(1, generator=generator, device=dev)) < mix_prob
        ws = G.mapping_ws(z, mix_z=z2, mix_cutoff=cut if mix else None, update_w_avg=False)
        fake = G.synthesis(ws, noise_mode="random", generator=generator)
    pred = E(torch.cat([fake, real.float()]))
    recon = G.synthesis(pred, noise_mode="const")
    target = torch.cat([fake, real.float()])
    w_mse = (pred[:b] - ws).square().mean()
    img = (recon - target).square().mean(dim=[1, 2, 3])
    loss = w_weight * w_mse + img.mean()
    if lpips_net is not None and lpips_weight > 0:
        loss = loss + lpips_weight * _distance(lpips_net, recon, target, 256).mean()
    logs = {"loss_e": loss.detach(), "w_mse": w_mse.detach(),
            "img_mse": img[:b].mean().detach(), "real_mse": img[b:].mean().detach()}
    return loss, logs


def train_projection_encoder(G: Generator, images: torch.Tensor | Iterable[torch.Tensor], *,
                             steps: int, batch_size: int = 16, lr: float = 1e-3,
                             lpips_net: nn.Module | None = None, seed: int = 0,
                             encoder: LatentEncoder | None = None, **loss_kw: Any,
                             ) -> LatentEncoder:
    """Train a :class:`LatentEncoder` for ``G`` (a simple loop for benchmarks and notebooks; runs
    use the family's ``stage: encoder`` on the shared training loop).

    Args:
        G: frozen generator (eval mode).
        images: ``[N,3,R,R]`` normal images in ``[-1,1]`` (cycled) or an iterable of batches.
        steps: Adam steps.
        batch_size: real (and as many generated) images per step when ``images`` is a tensor.
        lr: Adam learning rate.
        lpips_net: optional LPIPS for the image terms.
        seed: seeds the initialisation and every random draw.
        encoder: continue training this encoder instead of a new one.
        loss_kw: passed to :func:`encoder_loss`.
    Returns:
        The trained encoder in eval mode.
    """
    dev = next(G.parameters()).device
    torch.manual_seed(seed)
    if encoder is None:
        encoder = LatentEncoder(resolution=G.resolution, num_ws=G.num_ws, w_dim=G.w_dim,
                                init_res=G.init_res)
        encoder.w_avg.copy_(G.mapping.w_avg)
    E = encoder.to(dev).train()
    opt = torch.optim.Adam(E.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator(device=dev).manual_seed(seed)
    batches = _cycle(images, batch_size)
    for _ in range(steps):
        loss, _logs = encoder_loss(E, G, next(batches).to(dev), generator=gen,
                                   lpips_net=lpips_net, **loss_kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return E.eval()


def _cycle(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int):  # noqa: ANN202
    while True:
        if isinstance(images, torch.Tensor):
            for i in range(0, images.shape[0] - batch_size + 1, max(batch_size, 1)):
                yield images[i:i + batch_size]
            if images.shape[0] < batch_size:
                yield images
        else:
            yield from images


# ----------------------------------------------------------------------------- scorer


class StyleGAN2Scorer(AnomalyScorer):
    """Anomaly score from the projection residual.

    Score ``= lpips_weight * LPIPS + pixel_weight * mean|x - G(w*)|`` (+ ``feature_weight`` x the
    mean squared difference of discriminator features, when a discriminator is given); map ``=``
    the same weights on the spatial LPIPS map and the per-pixel L1 residual (``[B,H,W]``).

    Args:
        G: frozen generator. D: optional discriminator (feature term).
        lpips_net: non-spatial LPIPS net; ``None`` builds VGG16-LPIPS offline
            (:func:`~gen_ad.inversion.lpips_net.build_lpips`, ``lpips_weights`` path /
            ``lpips_random_init`` for tests).
        encoder: :class:`LatentEncoder` initialising the projection (``stylegan2-enc``).
        steps / latent / project_kw: projection settings (see :func:`project`).
        lpips_weight / pixel_weight / feature_weight: score and map weights.
        seed: seeds the ``w`` noise of each :meth:`score` call.
    """

    def __init__(self, G: Generator, *, D: Discriminator | None = None,
                 lpips_net: nn.Module | None = None, encoder: nn.Module | None = None,
                 steps: int | None = None, latent: str | None = None,
                 lpips_weight: float = 1.0, pixel_weight: float = 1.0,
                 feature_weight: float = 0.0, lpips_weights: str | None = None,
                 lpips_random_init: bool = False, seed: int = 0, **project_kw: Any) -> None:
        from gen_ad.inversion.lpips_net import build_lpips

        self.G, self.D, self.encoder = G, D, encoder
        self.name = "stylegan2-enc" if encoder is not None else "stylegan2"
        self.steps = steps if steps is not None else (200 if encoder is not None else 1000)
        self.latent = latent or ("w+" if encoder is not None else "w")
        self.weights = (lpips_weight, pixel_weight, feature_weight)
        self.lpips = lpips_net if lpips_net is not None else build_lpips(
            "vgg", weights=lpips_weights, random_init=lpips_random_init)
        self.lpips_spatial = copy.copy(self.lpips)  # shares the weights
        self.lpips_spatial.spatial = True
        self.seed, self.project_kw = seed, project_kw
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _device(self) -> torch.device:
        return next(self.G.parameters()).device

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> ProjectionResult:
        """Project ``x`` ``[B,3,R,R]`` (moved to the generator's device)."""
        dev = self._device()
        self.lpips.to(dev)
        if self._stats is None:
            self._stats = w_stats(self.G)
        x = x.to(dev).float()
        init = self.encoder(x) if self.encoder is not None else None
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        return project(self.G, x, lpips_net=self.lpips, steps=self.steps, latent=self.latent,
                       init_ws=init, w_avg=self._stats[0], w_std=self._stats[1], generator=gen,
                       **self.project_kw)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> ScoreBatch:
        res = self.reconstruct(x)
        x = x.to(res.recon.device).float()
        wl, wp, wf = self.weights
        pix_map = pixel_residual(x, res.recon, "l1")
        lp_map = lpips_map(x, res.recon, self.lpips_spatial)
        terms = {"lpips": res.lpips, "pixel": pix_map.mean(dim=[1, 2])}
        scores = wl * terms["lpips"] + wp * terms["pixel"]
        if self.D is not None and wf > 0:
            feat = (self.D.features(x, mbstd_group=1)  # per image: no batch-mate dependence
                    - self.D.features(res.recon, mbstd_group=1)).square().mean(dim=1)
            terms["feature"] = feat
            scores = scores + wf * feat
        maps = (wl * lp_map + wp * pix_map).clamp_min(0)
        return ScoreBatch(scores=scores, maps=maps, recon=res.recon, terms=terms)
