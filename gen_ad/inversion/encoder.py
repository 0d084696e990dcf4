"""f-AnoGAN inversion and scoring: izi_f encoder mapping and AnoGAN's iterative mapping.

For a query ``x`` the reconstruction is ``G(z)`` with ``z = E(x)`` (izi_f, one forward pass),
``z`` refined from ``E(x)`` by Adam on the izi_f loss (``izif+iterative``), or ``z`` searched
from a random start as AnoGAN does (``iterative``). The izi_f score of Schlegl et al. (2019)::

    score(x) = mean_pixels (x - G(z))^2  +  kappa * mean_features (f(x) - f(G(z)))^2
             =        residual          +            feature

with ``f`` the critic's features before its last layer. The ``iterative`` mode is AnoGAN
(Schlegl et al. 2017, eqs. 3-5 and 8-10): Adam on ``z`` for 500 steps minimising
``(1 - lam) * sum |x - G(z)| + lam * sum |f(x) - f(G(z))|`` with ``lam = 0.1``, and the score is
that same loss at the final ``z``. Both terms are returned in ``ScoreBatch.terms`` (weighted, so
they sum to the score). The map is the per-pixel residual averaged over channels: squared
(``map_reduce="l2"``, default; its image mean is exactly the izi_f ``residual`` term) or absolute
(``"l1"``), optionally Gaussian-smoothed. A random start is drawn from the image's own stream
(:class:`~gen_ad.inversion.noise.ImageStreams`), so a score does not depend on the batch.
"""

from __future__ import annotations

from typing import Literal

import einops
import torch
from torch import nn

from gen_ad.errors import ConfigError, DataError
from gen_ad.inversion.noise import ImageStreams
from gen_ad.models.wgan import Prior
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.residual import pixel_residual, smooth

Mode = Literal["izif", "iterative", "izif+iterative"]
_MODES = ("izif", "iterative", "izif+iterative")


def izif_terms(x: torch.Tensor, recon: torch.Tensor, critic: nn.Module,
               kappa: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image izi_f loss terms.

    Args:
        x: ``[B,C,H,W]`` images in ``[-1,1]``.
        recon: ``[B,C,H,W]`` reconstructions ``G(z)``.
        critic: module with ``features(x) -> [B,F]``.
        kappa: weight of the feature term.
    Returns:
        ``(residual, feature)``, each ``[B]``: the pixel MSE and ``kappa`` times the feature MSE.
    """
    residual = einops.reduce((x - recon).square(), "b c h w -> b", "mean")
    fx, fr = critic.features(x), critic.features(recon)
    feature = kappa * einops.reduce((fx - fr).square(), "b f -> b", "mean")
    return residual, feature


def anogan_terms(x: torch.Tensor, recon: torch.Tensor, critic: nn.Module,
                 lam: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image AnoGAN loss terms (Schlegl et al. 2017, eqs. 3-5): ``(1 - lam)`` times the
    residual ``sum |x - G(z)|`` and ``lam`` times the discrimination loss ``sum |f(x) -
    f(G(z))|`` (feature matching on the critic's last features), each ``[B]``."""
    residual = einops.reduce((x - recon).abs(), "b c h w -> b", "sum")
    fx, fr = critic.features(x), critic.features(recon)
    feature = einops.reduce((fx - fr).abs(), "b f -> b", "sum")
    return (1.0 - lam) * residual, lam * feature


class FAnoGANScorer(AnomalyScorer):
    """f-AnoGAN anomaly scorer (izi_f score, residual maps).

    Args:
        generator: trained generator ``z -> [B,3,H,W]`` (eval mode).
        critic: trained critic with ``features`` (eval mode).
        encoder: izi_f encoder ``x -> z`` (eval mode); ``None`` allows only ``mode="iterative"``.
        kappa: weight of the feature term in the score (1 in f-AnoGAN).
        mode: ``izif`` (``z = E(x)``), ``iterative`` (AnoGAN: Adam on ``z`` from a random start
            drawn from the prior, AnoGAN's loss and score) or ``izif+iterative`` (Adam on ``z``
            on the izi_f loss, starting from ``E(x)``; izi_f score).
        steps: Adam steps of the iterative modes (``None``: 500 for ``iterative`` as AnoGAN,
            100 for ``izif+iterative``).
        lr: Adam learning rate on ``z``.
        lam: feature weight: AnoGAN's lambda in ``iterative`` (``None``: 0.1), or the weight in
            ``residual + lam * feature`` of the ``izif+iterative`` search (``None``: 1).
        prior: latent prior of the random start (``normal`` or ``uniform``; the latter also keeps
            ``z`` clamped to ``[-1, 1]``).
        seed: seed of the random start (each image's start comes from its own stream keyed by
            its pixels and the seed: its score does not depend on the batch).
        map_reduce: ``l2`` (mean squared residual over channels) or ``l1`` (mean absolute).
        smooth_sigma: Gaussian smoothing of maps in pixels (0 = none).
    """

    name = "fanogan"

    def __init__(self, *, generator: nn.Module, critic: nn.Module, encoder: nn.Module | None = None,
                 kappa: float = 1.0, mode: Mode = "izif", steps: int | None = None,
                 lr: float = 0.05, lam: float | None = None, prior: Prior = "normal", seed: int = 0,
                 map_reduce: Literal["l1", "l2"] = "l2", smooth_sigma: float = 0.0) -> None:
        if mode not in _MODES:
            raise ConfigError(f"f-AnoGAN mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if encoder is None and mode != "iterative":
            raise ConfigError(f"f-AnoGAN mode '{mode}' needs a trained encoder (run the encoder "
                              "stage: stage=encoder gan_run=<gan run>), or use mode=iterative")
        anogan = mode == "iterative"
        steps = (500 if anogan else 100) if steps is None else steps
        lam = (0.1 if anogan else 1.0) if lam is None else lam
        if mode != "izif" and steps < 1:
            raise ConfigError(f"iterative f-AnoGAN needs steps >= 1, got {steps}")
        if anogan and not 0.0 <= lam <= 1.0:
            raise ConfigError(f"AnoGAN's lam weighs (1 - lam) residual + lam feature: it must "
                              f"be in [0, 1], got {lam}")
        if map_reduce not in ("l1", "l2"):
            raise ConfigError(f"map_reduce must be 'l1' or 'l2', got {map_reduce!r}")
        self.G, self.D, self.E = generator, critic, encoder
        self.kappa, self.mode, self.steps, self.lr, self.lam = kappa, mode, steps, lr, lam
        self.prior, self.seed = prior, seed
        self.map_reduce, self.smooth_sigma = map_reduce, smooth_sigma
        self.latent_dim = int(getattr(generator, "latent_dim", 128))

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "iterative":  # each image's start from its own stream
            streams = ImageStreams.for_images(x, self.seed)
            if self.prior == "uniform":
                return streams.uniform(self.latent_dim) * 2.0 - 1.0
            return streams.normal(self.latent_dim)
        assert self.E is not None
        return self.E(x)

    def _terms(self, x: torch.Tensor, recon: torch.Tensor,
               search: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The mode's ``(residual, feature)`` terms: AnoGAN's in ``iterative``, else izi_f's
        (with ``kappa`` for the score, ``lam`` for the search)."""
        if self.mode == "iterative":
            return anogan_terms(x, recon, self.D, self.lam)
        r, f = izif_terms(x, recon, self.D, 1.0 if search else self.kappa)
        return r, (self.lam * f if search else f)

    def refine(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Iterative mapping: Adam on ``z`` (batched; each image's ``z`` is independent).

        Args:
            x: ``[B,C,H,W]`` images.
            z0: ``[B,latent_dim]`` start codes.
        Returns:
            ``[B,latent_dim]`` refined codes (detached).
        """
        z = z0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                residual, feature = self._terms(x, self.G(z), search=True)
                loss = (residual + feature).sum()  # sum: per-image gradients
                (grad,) = torch.autograd.grad(loss, [z])
                z.grad = grad
                opt.step()
                if self.prior == "uniform":
                    with torch.no_grad():
                        z.clamp_(-1.0, 1.0)
        return z.detach()

    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Score a batch ``[B,3,H,W]`` in ``[-1,1]``; results on the models' device.

        Returns:
            ``ScoreBatch`` with scores ``[B]`` (= residual + feature: izi_f's, or AnoGAN's
            weighted L1 terms in ``iterative``), maps ``[B,H,W]``, recon
            ``[B,3,H,W]`` and terms ``residual`` / ``feature`` (``[B]`` each).
        """
        if x.ndim != 4 or x.shape[1] != self.G.channels:
            raise DataError(f"expected images [B,{self.G.channels},H,W], got {tuple(x.shape)}")
        if x.shape[-1] != self.G.resolution or x.shape[-2] != self.G.resolution:
            raise DataError(f"f-AnoGAN model is {self.G.resolution}x{self.G.resolution}, got "
                            f"{x.shape[-2]}x{x.shape[-1]} images")
        x = x.to(self.device, torch.float32)
        with torch.no_grad():
            z = self._start(x)
        if self.mode != "izif":
            z = self.refine(x, z)
        with torch.no_grad():
            recon = self.G(z)
            residual, feature = self._terms(x, recon, search=False)
            maps = smooth(pixel_residual(x, recon, self.map_reduce), self.smooth_sigma)
        return ScoreBatch(scores=residual + feature, maps=maps, recon=recon,
                          terms={"residual": residual, "feature": feature})
