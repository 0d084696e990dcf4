"""f-AnoGAN training: WGAN-GP (stage ``gan``) then the izi_f encoder (stage ``encoder``).

Stage ``gan`` (Schlegl et al. 2019, after Gulrajani et al. 2017): each loop step is one generator
update preceded by ``n_critic`` (5) critic updates. Like the reference code, every critic update
sees *different* real images: the loop's batch is split into ``n_critic`` sub-batches
(``gan.critic_batches="split"``, so ``train.batch_size = n_critic * b``; f-AnoGAN's batch 32 is
``train.batch_size: 160``). ``critic_batches="reuse"`` runs all critic updates on the whole batch.
Critic loss ``E[D(G(z))] - E[D(x)] + gp_weight * GP`` with the gradient penalty on random
interpolates (:func:`gradient_penalty`); generator loss ``-E[D(G(z))]``; Adam for both.

Stage ``encoder``: G and D are loaded from the ``model/`` export of ``gan_run`` and frozen
(``requires_grad=False``, eval mode; they are saved with this run so it is self-contained: a
resume restores them from its own checkpoint without reading ``gan_run``).
Only E trains, on ``MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))`` with ``f`` the critic's
features before its last layer.

All randomness of a step (``z``, interpolation weights) comes from ``ctx.generator``, so both stages
resume exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import einops
import torch
from torch import nn

from gen_ad.config import DataConfig, TrainConfig, check
from gen_ad.errors import ConfigError
from gen_ad.inversion.encoder import FAnoGANScorer, izif_terms
from gen_ad.models.wgan import Critic, Encoder, Generator, sample_latent
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.training.family import Family, Logs, StepContext, register_family
from gen_ad.training.stages import freeze_gan_stage, unwrap_model

#: ``model.*`` keys of the encoder stage's own network (E) and of the gan stage's EMA, which may
#: differ from the gan run's; every other ``model.*`` key and ``data.size`` must equal its values.
ENCODER_KEYS = ("model.encoder_norm", "model.encoder_output", "model.ema")


@dataclass
class WGANModelConfig:
    """Networks (see :mod:`gen_ad.models.wgan`); the resolution is ``data.size``.

    Attributes:
        latent_dim: size of ``z`` (128 in f-AnoGAN).
        base_dim: network width ``d`` (64 in the reference; the 4x4 stage has ``8d`` channels).
        prior: distribution ``z`` is sampled from when training G: ``normal`` (``N(0, I)``, the
            reference default) or ``uniform`` (``U(-1, 1)``).
        critic_norm: ``layer`` (reference) or ``none``.
        encoder_norm: ``layer`` (like the critic), ``batch`` (the reference code) or ``none``.
        encoder_output: ``tanh`` (bounded codes: the f-AnoGAN paper version, the reference
            code's default ``tanh_fc``) or ``linear`` (its appendix variant).
        ema: keep an EMA of G (f-AnoGAN has none; decay ``train.ema_decay``).
    """

    latent_dim: int = 128
    base_dim: int = 64
    prior: Literal["normal", "uniform"] = "normal"
    critic_norm: Literal["layer", "none"] = "layer"
    encoder_norm: Literal["layer", "batch", "none"] = "layer"
    encoder_output: Literal["tanh", "linear"] = "tanh"
    ema: bool = False

    def validate(self, prefix: str) -> None:
        check(self.latent_dim > 0, f"{prefix}.latent_dim", "must be positive")
        check(self.base_dim > 0, f"{prefix}.base_dim", "must be positive")


@dataclass
class GANLossConfig:
    """WGAN-GP settings of stage ``gan``.

    Attributes:
        n_critic: critic updates per generator update (5).
        gp_weight: gradient-penalty weight lambda (10).
        lr_g / lr_d: Adam learning rates (2e-4 by default; the f-AnoGAN reference code,
            wgangp_64x64.py, and the WGAN-GP code use 1e-4).
        betas: Adam betas (``[0.0, 0.9]`` as in WGAN-GP).
        critic_batches: ``split`` (each critic update gets its own ``batch_size / n_critic`` real
            images, as in the reference) or ``reuse`` (every critic update uses the whole batch).
    """

    n_critic: int = 5
    gp_weight: float = 10.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    critic_batches: Literal["split", "reuse"] = "split"

    def validate(self, prefix: str) -> None:
        check(self.n_critic >= 1, f"{prefix}.n_critic", "must be >= 1")
        check(self.gp_weight >= 0, f"{prefix}.gp_weight", "must be >= 0")
        check(self.lr_g > 0 and self.lr_d > 0, f"{prefix}.lr_g", "learning rates must be > 0")
        _check_betas(self.betas, f"{prefix}.betas")


@dataclass
class EncoderStageConfig:
    """izi_f encoder training (stage ``encoder``); its batch is ``train.batch_size`` (128 in
    f-AnoGAN).

    Attributes:
        kappa: weight of the critic-feature term (1).
        lr: Adam learning rate (2e-4 by default; the reference code, z_encoding_izif.py, used
            RMSProp 5e-5 with batch 64).
        betas: Adam betas.
    """

    kappa: float = 1.0
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self, prefix: str) -> None:
        check(self.kappa >= 0, f"{prefix}.kappa", "must be >= 0")
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check_betas(self.betas, f"{prefix}.betas")


def _check_betas(betas: list[float], key: str) -> None:
    check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), key,
          f"must be two numbers in [0, 1), got {betas}")


@dataclass
class FAnoGANScorerOptions:
    """Scorer options of a ``wgan`` run (:class:`~gen_ad.inversion.encoder.FAnoGANScorer`).

    Attributes:
        mode: ``izif`` (encoder), ``iterative`` (latent search) or ``izif+iterative``; default
            ``izif`` with an encoder, ``iterative`` (the ``anogan`` scorer) without.
        steps / lr / lam: latent-search steps, learning rate and feature weight (``None``:
            AnoGAN's 500 steps and lambda 0.1 for ``iterative``; 100 and 1 for
            ``izif+iterative``).
        kappa: weight of the critic-feature term (default ``encoder.kappa``).
        prior: latent prior of the search start (default ``model.prior``).
        seed: seed of the search start.
        map_reduce: ``l2`` or ``l1`` residual map. smooth_sigma: Gaussian smoothing of the map.
    """

    mode: Literal["izif", "iterative", "izif+iterative"] | None = None
    steps: int | None = None
    lr: float = 0.05
    lam: float | None = None
    kappa: float | None = None
    prior: Literal["normal", "uniform"] | None = None
    seed: int = 0
    map_reduce: Literal["l1", "l2"] = "l2"
    smooth_sigma: float = 0.0

    def validate(self, prefix: str) -> None:
        check(self.steps is None or self.steps >= 1, f"{prefix}.steps",
              f"must be >= 1, got {self.steps}")
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        check(self.kappa is None or self.kappa >= 0, f"{prefix}.kappa", "must be >= 0")
        check(self.smooth_sigma >= 0, f"{prefix}.smooth_sigma", "must be >= 0")


@dataclass
class WGANConfig:
    """Top-level config of the ``wgan`` family (f-AnoGAN).

    Attributes:
        out: run folder.
        stage: ``gan`` (WGAN-GP) or ``encoder`` (izi_f encoder on a frozen GAN).
        gan_run: run folder of the ``gan`` stage (required for ``stage: encoder``).
        data / train: shared sections; ``train.batch_size`` defaults to 40 here (5 critic
            batches of 8: the shared default 32 does not split into ``gan.n_critic`` = 5).
        model / gan / encoder: family sections.
    """

    out: str = "checkpoints/wgan"
    stage: Literal["gan", "encoder"] = "gan"
    gan_run: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=40))
    model: WGANModelConfig = field(default_factory=WGANModelConfig)
    gan: GANLossConfig = field(default_factory=GANLossConfig)
    encoder: EncoderStageConfig = field(default_factory=EncoderStageConfig)

    def validate(self, prefix: str) -> None:
        size = self.data.size
        check(size >= 8 and size & (size - 1) == 0, "data.size",
              f"the f-AnoGAN networks need a power of two >= 8 (e.g. 64, 128), got {size}")
        check(self.stage != "encoder" or bool(self.gan_run), "gan_run",
              "stage 'encoder' needs gan_run: the run folder of a finished 'gan' stage")
        if self.stage == "gan" and self.gan.critic_batches == "split":
            k = self.gan.n_critic * self.train.grad_accum
            check(self.train.batch_size % k == 0, "train.batch_size",
                  f"must be divisible by gan.n_critic * train.grad_accum = {k} with "
                  f"gan.critic_batches 'split' (each critic update takes batch_size / n_critic "
                  f"images), got {self.train.batch_size}")
        check(not self.model.ema or self.train.ema_decay > 0, "train.ema_decay",
              "must be > 0 when model.ema is true")


# ----------------------------------------------------------------------------- losses


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``mean_i (||grad_x D(x_i)||_2 - 1)^2`` on random interpolates
    (Gulrajani et al. 2017, Sec. 4 and Algorithm 1; the critic loss adds it times lambda).

    ``x_i = real_i + a_i (fake_i - real_i)`` with one ``a_i ~ U[0, 1)`` per sample, drawn from
    ``generator``. Differentiable w.r.t. the critic's parameters (``create_graph=True``).

    Args:
        critic: module mapping ``[B,C,H,W] -> [B]``.
        real: ``[B,C,H,W]`` real images.
        fake: ``[B,C,H,W]`` generated images (detached).
        generator: random generator for the interpolation weights.
    Returns:
        Scalar tensor.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device,
                       dtype=real.dtype)
    x = (real.detach() + alpha * (fake.detach() - real.detach())).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), [x], create_graph=True)
    slopes = einops.rearrange(grad, "b c h w -> b (c h w)").float().norm(dim=1)
    return (slopes - 1.0).square().mean()


def izif_loss(x: torch.Tensor, encoder: nn.Module, generator: nn.Module, critic: nn.Module,
              kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """izi_f training loss ``MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))`` (Schlegl et al.
    2019, f-AnoGAN, izi_f encoder training), the batch mean of the per-image terms of
    :func:`~gen_ad.inversion.encoder.izif_terms` (the scorer's, so training and scoring agree).

    Args:
        x: ``[B,3,H,W]`` images in ``[-1,1]``.
        encoder / generator: ``E`` (trained) and ``G`` (frozen).
        critic: frozen critic with ``features(x) -> [B,F]``.
        kappa: weight of the feature term.
    Returns:
        ``(loss, image_mse, feature_mse)`` scalars (``feature_mse`` without ``kappa``).
    """
    residual, feature = izif_terms(x, generator(encoder(x)), critic, kappa=1.0)
    img, fts = residual.mean(), feature.mean()
    return img + kappa * fts, img, fts


# ----------------------------------------------------------------------------- family


@register_family
class WGANFamily(Family):
    """f-AnoGAN: WGAN-GP generator/critic and the izi_f encoder (see the module docstring)."""

    name = "wgan"
    config_cls = WGANConfig
    scorer_options_cls = FAnoGANScorerOptions

    def build_models(self) -> dict[str, nn.Module]:
        """``G`` and ``D`` (stage gan); ``G``, ``D`` (frozen) and ``E`` (stage encoder)."""
        c, r = self.cfg.model, self.cfg.data.size
        models: dict[str, nn.Module] = {
            "G": Generator(latent_dim=c.latent_dim, resolution=r, channels=3,
                           base_dim=c.base_dim),
            "D": Critic(resolution=r, channels=3, base_dim=c.base_dim, norm=c.critic_norm),
        }
        if self.cfg.stage == "encoder":
            for k in ("G", "D"):
                models[k].requires_grad_(False).eval()
            models["E"] = Encoder(latent_dim=c.latent_dim, resolution=r, channels=3,
                                  base_dim=c.base_dim, norm=c.encoder_norm,
                                  output=c.encoder_output)
        return models

    def build_optimizers(self, models: Mapping[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        if self.cfg.stage == "encoder":
            e = self.cfg.encoder
            return {"E": torch.optim.Adam(models["E"].parameters(), lr=e.lr, betas=tuple(e.betas))}
        g = self.cfg.gan
        return {
            "G": torch.optim.Adam(models["G"].parameters(), lr=g.lr_g, betas=tuple(g.betas)),
            "D": torch.optim.Adam(models["D"].parameters(), lr=g.lr_d, betas=tuple(g.betas)),
        }

    def ema_models(self) -> list[str]:
        return ["G"] if self.cfg.model.ema and self.cfg.stage == "gan" else []

    def setup(self, models: Mapping[str, nn.Module], device: torch.device, *,
              resuming: bool = False) -> None:
        """Stage encoder: load G and D from ``gan_run`` (not when resuming) and freeze them."""
        if self.cfg.stage == "encoder":
            freeze_gan_stage(models, self.cfg, "wgan", load=not resuming, own=ENCODER_KEYS)

    # ------------------------------------------------------------------------- steps

    def train_step(self, ctx: StepContext, batch: torch.Tensor) -> Logs:
        """Stage gan: ``n_critic`` critic phases, then one generator phase. Stage encoder: one
        encoder phase."""
        if self.cfg.stage == "encoder":
            self.encoder_phase(ctx, batch)
            return ctx.logs
        g = self.cfg.gan
        if g.critic_batches == "split" and batch.shape[0] % (g.n_critic * ctx.grad_accum):
            raise ConfigError(  # torch.chunk would give fewer or unequal critic batches
                f"config key 'train.batch_size': the per-process batch of {batch.shape[0]} "
                f"images does not split into gan.n_critic={g.n_critic} critic batches of "
                f"train.grad_accum={ctx.grad_accum} equal micro-batches; use a batch size "
                f"divisible by processes x {g.n_critic * ctx.grad_accum}")
        subs = batch.chunk(g.n_critic) if g.critic_batches == "split" else [batch] * g.n_critic
        for real in subs:
            self.critic_phase(ctx, real)
        self.generator_phase(ctx, subs[0].shape[0])
        return ctx.logs

    def _latent(self, ctx: StepContext, n: int) -> torch.Tensor:
        return sample_latent(n, self.cfg.model.latent_dim, self.cfg.model.prior, ctx.generator,
                             ctx.device)

    def critic_phase(self, ctx: StepContext, real: torch.Tensor) -> None:
        """One Adam step of D on ``real`` ``[b,3,H,W]`` and as many fresh fakes.

        Logs ``loss_d`` (critic loss incl. penalty), ``w_dist`` (``E[D(x)] - E[D(G(z))]``, the
        Wasserstein estimate) and ``gp`` (the last critic phase's values stay).
        """
        G, D = ctx.models["G"], ctx.models["D"]
        G.train()
        D.train()

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            z = self._latent(ctx, chunk.shape[0])
            with torch.no_grad():
                fake = G(z)
            w = D(chunk).float().mean() - D(fake).float().mean()
            gp = gradient_penalty(D, chunk, fake.to(chunk.dtype), ctx.generator)
            loss = -w + self.cfg.gan.gp_weight * gp
            return loss, {"loss_d": loss, "w_dist": w, "gp": gp}

        ctx.phase("D", D, real, loss_fn)

    def generator_phase(self, ctx: StepContext, n: int) -> None:
        """One Adam step of G on ``n`` fakes with loss ``-E[D(G(z))]``; logs ``loss_g``."""
        G, D = ctx.models["G"], ctx.models["D"]
        G.train()

        def loss_fn(z: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            loss = -D(G(z)).float().mean()
            return loss, {"loss_g": loss}

        # D got gradients through G's loss: they are cleared with G's
        ctx.phase("G", G, self._latent(ctx, n), loss_fn, also_zero=("D",))

    def encoder_phase(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """One Adam step of E on the izi_f loss; logs ``loss_e``, ``mse_img``, ``mse_feat``."""
        E = ctx.models["E"]
        G, D = unwrap_model(ctx.models["G"]), unwrap_model(ctx.models["D"])
        G.eval()
        D.eval()
        E.train()

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            loss, img, fts = izif_loss(chunk, E, G, D, self.cfg.encoder.kappa)
            return loss, {"loss_e": loss, "mse_img": img, "mse_feat": fts}

        ctx.phase("E", E, batch, loss_fn)

    # ------------------------------------------------------------------------- inference

    def sample(self, models: Mapping[str, nn.Module], n: int,
               generator: torch.Generator) -> torch.Tensor:
        G = models["G"]
        dev = next(G.parameters()).device
        z = sample_latent(n, self.cfg.model.latent_dim, self.cfg.model.prior, generator, dev)
        return G(z)

    def scorers(self, models: Mapping[str, nn.Module], **kwargs: Any) -> dict[str, AnomalyScorer]:
        """``fanogan`` (izi_f; needs the encoder stage) or, for a gan-stage run, ``anogan``
        (iterative latent optimisation from a random start). ``kwargs`` go to
        :class:`~gen_ad.inversion.encoder.FAnoGANScorer` as :class:`FAnoGANScorerOptions`
        (e.g. ``mode``, ``steps``, ``smooth_sigma``)."""
        o = self.scorer_options(kwargs)
        kw: dict[str, Any] = {k: v for k, v in asdict(o).items() if k not in ("kappa", "prior")}
        kw["kappa"] = self.cfg.encoder.kappa if o.kappa is None else o.kappa
        kw["prior"] = self.cfg.model.prior if o.prior is None else o.prior
        if "E" in models:
            kw["mode"] = o.mode or "izif"
            return {"fanogan": FAnoGANScorer(generator=models["G"], critic=models["D"],
                                             encoder=models["E"], **kw)}
        kw["mode"] = o.mode or "iterative"  # izif modes raise: there is no encoder
        scorer = FAnoGANScorer(generator=models["G"], critic=models["D"], encoder=None, **kw)
        scorer.name = "anogan"
        return {"anogan": scorer}


__all__ = ["FAnoGANScorerOptions", "WGANConfig", "WGANFamily", "gradient_penalty", "izif_loss"]
