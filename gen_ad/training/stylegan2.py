"""StyleGAN2 training (Karras et al. 2020) with ADA, on the shared loop; and its projection encoder.

Stage ``gan``, one loop step = the four phases of the reference trainer:

1. ``Gmain``: non-saturating loss ``softplus(-D(aug(G(z))))`` with style mixing (0.9).
2. ``Greg`` (every ``pl_interval`` = 4 steps): path-length penalty on ``batch / pl_batch_shrink``
   images, ``(|J^T y| - a)^2`` with ``a`` the running mean (decay 0.01), times ``pl_weight`` (2) and
   the interval (lazy regularisation, Karras et al. 2020, Sec. 3.1; path length, Sec. 3.2).
3. ``Dmain``: ``softplus(D(aug(G(z)))) + softplus(-D(aug(x)))``; ADA statistics ``sign(D(x))``.
4. ``Dreg`` (every ``r1_interval`` = 16 steps): R1 ``gamma/2 |grad_x D(aug(x))|^2`` (Mescheder et
   al. 2018, Sec. 4.1) times the interval; ``gamma`` defaults to ADA's heuristic
   ``0.0002 * res^2 / batch``.

Adam (lr 0.0025, betas (0, 0.99), eps 1e-8) with the lazy-regularisation correction
``c = interval / (interval + 1)``: ``lr * c``, ``betas ** c``. The EMA of G uses a half-life of
``ema_kimg`` (default ``batch * 10 / 32``) thousand images, ramped up as
``min(ema, 0.05 * images)``.
ADA's ``p``, its statistics and the path-length mean are saved through :meth:`state_dict`.

Stage ``encoder``: G (EMA weights) and D are loaded from ``gan_run`` (a resume restores them from
its own checkpoint instead) and frozen; the
:class:`~gen_ad.models.stylegan2.LatentEncoder` ``E`` learns ``image -> w+`` from generated images
(known ``w+``) and the run's real normal images (:func:`~gen_ad.inversion.projector.encoder_loss`);
it initialises the ``stylegan2-enc`` scorer's projection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from gen_ad.config import DataConfig, TrainConfig, check
from gen_ad.models.stylegan2 import (
    CHANNEL_BASE,
    Discriminator,
    Generator,
    LatentEncoder,
    block_resolutions,
    default_init_res,
)
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.training.augment import COLOUR, GEOMETRIC, AdaptiveAugment, AugmentSpec
from gen_ad.training.family import Family, Logs, StepContext, register_family
from gen_ad.training.stages import freeze_gan_stage, unwrap_model

#: An image transform ``[B,3,H,W] -> [B,3,H,W]`` (ADA's augmentation), differentiable.
Augment = Callable[[torch.Tensor], torch.Tensor]
#: ``model.*`` keys of the encoder stage's own network (E), which may differ from the gan run's;
#: every other ``model.*`` key and ``data.size`` must equal its values.
ENCODER_KEYS = ("model.encoder_channel_base", "model.encoder_channel_max")


@dataclass
class StyleGAN2ModelConfig:
    """Networks (:mod:`gen_ad.models.stylegan2`); the resolution is ``data.size``.

    Attributes:
        preset: ``E`` (channel_base 16384) or ``F`` (32768), with ``channel_max`` 512.
        channel_base: overrides the preset's (tiny test nets use e.g. 256).
        channel_max: most feature maps in any layer.
        z_dim / w_dim / mapping_layers / mapping_lr_mul: 512 / 512 / 8 / 0.01.
        init_res: resolution of the generator's constant (default: 4 for powers of two, 3 for 96).
        num_fp16_res / conv_clamp / lowp_dtype: reduced precision of the highest resolutions on
            CUDA (4 blocks, clamp 256, float16).
        mbstd_group / mbstd_channels: minibatch standard deviation (4, 1).
        encoder_channel_base / encoder_channel_max: width of the projection encoder.
    """

    preset: Literal["E", "F"] = "E"
    channel_base: int | None = None
    channel_max: int = 512
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    init_res: int | None = None
    num_fp16_res: int = 4
    conv_clamp: float | None = 256.0
    lowp_dtype: Literal["float16", "bfloat16"] = "float16"
    mbstd_group: int = 4
    mbstd_channels: int = 1
    encoder_channel_base: int = 8192
    encoder_channel_max: int = 256

    def validate(self, prefix: str) -> None:
        for k in ("channel_max", "z_dim", "w_dim", "mapping_layers", "mbstd_group",
                  "encoder_channel_base", "encoder_channel_max"):
            check(getattr(self, k) > 0, f"{prefix}.{k}", "must be positive")
        check(self.channel_base is None or self.channel_base > 0, f"{prefix}.channel_base",
              "must be positive")
        check(self.mapping_lr_mul > 0, f"{prefix}.mapping_lr_mul", "must be positive")
        check(self.num_fp16_res >= 0, f"{prefix}.num_fp16_res", "must be >= 0")
        check(self.mbstd_channels >= 0, f"{prefix}.mbstd_channels", "must be >= 0")
        check(self.conv_clamp is None or self.conv_clamp > 0, f"{prefix}.conv_clamp",
              "must be positive (or null)")

    @property
    def base(self) -> int:
        return self.channel_base if self.channel_base is not None else CHANNEL_BASE[self.preset]


@dataclass
class StyleGAN2LossConfig:
    """Losses, regularisers, optimiser and EMA.

    Attributes:
        r1_gamma: R1 weight; ``null`` = ``0.0002 * data.size**2 / train.batch_size``.
        r1_interval / pl_interval: lazy regularisation intervals (16 / 4).
        pl_weight / pl_batch_shrink / pl_decay: path length (2 / 2 / 0.01).
        style_mixing: probability of mixing two latents (0.9).
        lr / betas / eps: Adam for G and D (0.0025, [0, 0.99], 1e-8) before the lazy correction.
        ema_kimg: EMA half-life in thousand images; ``null`` = ``train.batch_size * 10 / 32``.
        ema_rampup: ramp-up fraction (0.05; ``null`` disables).
    """

    r1_gamma: float | None = None
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing: float = 0.9
    lr: float = 0.0025
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-8
    ema_kimg: float | None = None
    ema_rampup: float | None = 0.05

    def validate(self, prefix: str) -> None:
        check(self.r1_gamma is None or self.r1_gamma >= 0, f"{prefix}.r1_gamma", "must be >= 0")
        for k in ("r1_interval", "pl_interval", "pl_batch_shrink"):
            check(getattr(self, k) >= 1, f"{prefix}.{k}", "must be >= 1")
        check(self.pl_weight >= 0, f"{prefix}.pl_weight", "must be >= 0")
        check(0 < self.pl_decay <= 1, f"{prefix}.pl_decay", "must be in (0, 1]")
        check(0 <= self.style_mixing <= 1, f"{prefix}.style_mixing", "must be in [0, 1]")
        check(self.lr > 0 and self.eps > 0, f"{prefix}.lr", "lr and eps must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.ema_kimg is None or self.ema_kimg > 0, f"{prefix}.ema_kimg", "must be > 0")
        check(self.ema_rampup is None or self.ema_rampup > 0, f"{prefix}.ema_rampup",
              "must be > 0 (or null)")


@dataclass
class AugmentConfig:
    """Adaptive discriminator augmentation.

    Attributes:
        ada: adapt ``p`` (else ``p`` stays fixed at ``p``).
        p: initial (or fixed) augmentation probability.
        target: ``r_t`` target (0.6). interval: D steps between adjustments (4).
        speed_kimg: thousand images for ``p`` to go 0 -> 1 (500).
        transforms: enabled transforms (default all: ``xflip rotate90 xint scale rotate aniso
            xfrac brightness contrast lumaflip hue saturation``).
    """

    ada: bool = True
    p: float = 0.0
    target: float = 0.6
    interval: int = 4
    speed_kimg: float = 500.0
    transforms: list[str] = field(default_factory=lambda: list(GEOMETRIC + COLOUR))

    def validate(self, prefix: str) -> None:
        check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        check(0 < self.target < 1, f"{prefix}.target", "must be in (0, 1)")
        check(self.interval >= 1, f"{prefix}.interval", "must be >= 1")
        check(self.speed_kimg > 0, f"{prefix}.speed_kimg", "must be > 0")
        bad = [t for t in self.transforms if t not in GEOMETRIC + COLOUR]
        check(not bad, f"{prefix}.transforms",
              f"unknown transform(s) {bad} (known: {', '.join(GEOMETRIC + COLOUR)})")

    def spec(self) -> AugmentSpec:
        return AugmentSpec(**{k: float(k in self.transforms) for k in GEOMETRIC + COLOUR})


@dataclass
class EncoderConfig:
    """Stage ``encoder`` (projection encoder on a frozen GAN).

    Attributes:
        lr / betas: Adam learning rate and betas of E (``1e-3``, ``[0.9, 0.99]``).
        w_weight: weight of the ``w+`` MSE on generated images.
        lpips: ``vgg`` (LPIPS term; needs the VGG16 weights offline) or ``none``.
        lpips_weight: weight of the LPIPS term. lpips_weights: explicit VGG16 weight file.
    """

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    w_weight: float = 1.0
    lpips: Literal["vgg", "none"] = "vgg"
    lpips_weight: float = 1.0
    lpips_weights: str | None = None

    def validate(self, prefix: str) -> None:
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.w_weight >= 0 and self.lpips_weight >= 0, f"{prefix}.w_weight",
              "weights must be >= 0")


@dataclass
class StyleGAN2ScorerOptions:
    """Scorer options of a ``stylegan2`` run (:class:`~gen_ad.inversion.projector.StyleGAN2Scorer`).

    Attributes:
        steps: projection steps (default 1000 from the mean ``w``, 200 from the encoder).
        latent: ``w`` or ``w+`` (default ``w``; ``w+`` with the encoder).
        lpips_weight / pixel_weight / feature_weight: weights of the score terms.
        lpips_weights: VGG16 LPIPS weight file. lpips_random_init: random LPIPS trunk (tests;
            labelled in reports). lpips_net: a ready LPIPS module (programmatic use).
        seed: projection noise seed.
        lr ... lpips_size: projection settings (default: the reference projector's, see
            :func:`~gen_ad.inversion.projector.project`).
    """

    steps: int | None = None
    latent: Literal["w", "w+"] | None = None
    lpips_weight: float = 1.0
    pixel_weight: float = 1.0
    feature_weight: float = 0.0
    lpips_weights: str | None = None
    lpips_random_init: bool = False
    lpips_net: Any = None
    seed: int = 0
    lr: float | None = None
    lr_rampdown: float | None = None
    lr_rampup: float | None = None
    initial_noise_factor: float | None = None
    noise_ramp: float | None = None
    noise_reg_weight: float | None = None
    mse_weight: float | None = None
    optimize_noise: bool | None = None
    lpips_size: int | None = None

    def validate(self, prefix: str) -> None:
        check(self.steps is None or self.steps >= 0, f"{prefix}.steps", "must be >= 0")
        for k in ("lpips_weight", "pixel_weight", "feature_weight"):
            check(getattr(self, k) >= 0, f"{prefix}.{k}", "must be >= 0")
        check(self.lr is None or self.lr > 0, f"{prefix}.lr", "must be > 0")

    def projector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~gen_ad.inversion.projector.StyleGAN2Scorer`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # no copy of lpips_net
        return {k: v for k, v in values.items()
                if v is not None or k in ("steps", "latent", "lpips_weights")}


@dataclass
class StyleGAN2SpeedConfig:
    """How the training step runs (the losses and weights are the same either way).

    Attributes:
        compile_train: ``torch.compile`` the synthesis network and the discriminator for the main
            phases (``Gmain``, ``Dmain``: most of a step's work). The lazy-regularisation phases
            (path length, R1) differentiate twice, which compiled graphs do not support, so they
            run eager on the same weights. Noise maps are drawn outside the compiled graph from
            the step's generator in the eager order (same random stream, exact resume).
            Single-process runs only: a multi-process (DDP) run trains eager and warns. Off by
            default: the first step pays the compilation (75 s on 2 CPU cores for 64 px config F).
    """

    compile_train: bool = False


@dataclass
class StyleGAN2Config:
    """Top-level config of the ``stylegan2`` family.

    Attributes:
        out: run folder. stage: ``gan`` or ``encoder``. gan_run: run folder of the gan stage
            (stage ``encoder``). data / train: shared sections. model / loss / augment / encoder:
            family sections. speed: how the step runs (:class:`StyleGAN2SpeedConfig`).
    """

    out: str = "checkpoints/stylegan2"
    stage: Literal["gan", "encoder"] = "gan"
    gan_run: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: StyleGAN2ModelConfig = field(default_factory=StyleGAN2ModelConfig)
    loss: StyleGAN2LossConfig = field(default_factory=StyleGAN2LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    speed: StyleGAN2SpeedConfig = field(default_factory=StyleGAN2SpeedConfig)

    def validate(self, prefix: str) -> None:
        size = self.data.size
        init = self.model.init_res or default_init_res(size)
        try:
            block_resolutions(size, init)
        except ValueError as e:
            check(False, "data.size", f"{e} (use 64, 96, 128, 256 or 512, or set model.init_res)")
        check(self.stage != "encoder" or bool(self.gan_run), "gan_run",
              "stage 'encoder' needs gan_run: the run folder of a finished 'gan' stage")


def default_r1_gamma(resolution: int, batch_size: int) -> float:
    """ADA's heuristic ``0.0002 * resolution**2 / batch_size``."""
    return 0.0002 * resolution ** 2 / batch_size


def r1_penalty(D: nn.Module, real: torch.Tensor,
               augment: Augment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample R1 ``|grad_x D(aug(x))|^2`` ``[B]`` (differentiable) and the logits ``[B,1]``.

    R1 of Mescheder et al. 2018 (Sec. 4.1) is ``gamma/2 E_x |grad_x D(x)|^2`` on real data;
    the caller applies ``gamma/2`` and the lazy interval (Karras et al. 2020, Sec. 3.1).

    Args:
        D: discriminator ``[B,3,H,W] -> [B,1]``.
        real: ``[B,3,H,W]`` real images in ``[-1,1]`` (detached here).
        augment: ADA's augmentation, differentiated through (``None``: none).
    """
    x = real.detach().requires_grad_(True)
    logits = D(augment(x) if augment is not None else x)
    (grad,) = torch.autograd.grad(logits.sum(), [x], create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]), logits


def path_lengths(img: torch.Tensor, ws: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``[B]`` path lengths ``sqrt(mean_layers |J_w^T y|^2)`` with ``y ~ N(0, I) / sqrt(HW)``.

    The path length regulariser of Karras et al. 2020 (StyleGAN2, Sec. 3.2) penalises
    ``E_{w,y} (|J_w^T y|_2 - a)^2``; ``J_w^T y = grad_w (g(w) . y)`` by back-propagation.

    Args:
        img: ``[B,3,H,W]`` images ``g(w)`` (in the graph of ``ws``).
        ws: ``[B,num_ws,w_dim]`` latents that made ``img``.
        generator: draws ``y``.
    """
    y = torch.randn(img.shape, generator=generator, device=img.device) / math.sqrt(
        img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * y).sum(), [ws], create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


@register_family
class StyleGAN2Family(Family):
    """StyleGAN2 + ADA (stage ``gan``) and the projection encoder (stage ``encoder``)."""

    name = "stylegan2"
    config_cls = StyleGAN2Config
    scorer_options_cls = StyleGAN2ScorerOptions

    def __init__(self, cfg: StyleGAN2Config) -> None:
        super().__init__(cfg)
        a = cfg.augment
        self.ada = AdaptiveAugment(target=a.target, interval=a.interval,
                                   speed_kimg=a.speed_kimg, p=a.p, spec=a.spec())
        self.pl_mean = torch.zeros([])
        self._compiled: dict[str, nn.Module] | None = None  # built at the first compiled step
        self._lpips: nn.Module | None = None  # the encoder stage's LPIPS, built at its first use

    # ------------------------------------------------------------------------- building

    @property
    def r1_gamma(self) -> float:
        g = self.cfg.loss.r1_gamma
        return default_r1_gamma(self.cfg.data.size, self.cfg.train.batch_size) if g is None else g

    def build_models(self) -> dict[str, nn.Module]:
        """``G`` and ``D``; stage encoder adds ``E`` (G and D frozen)."""
        m, r = self.cfg.model, self.cfg.data.size
        common = {"resolution": r, "channel_base": m.base, "channel_max": m.channel_max,
                  "init_res": m.init_res, "num_fp16_res": m.num_fp16_res,
                  "conv_clamp": m.conv_clamp, "lowp_dtype": m.lowp_dtype}
        G = Generator(z_dim=m.z_dim, w_dim=m.w_dim, mapping_layers=m.mapping_layers,
                      mapping_lr_mul=m.mapping_lr_mul, **common)
        D = Discriminator(mbstd_group=m.mbstd_group, mbstd_channels=m.mbstd_channels, **common)
        models: dict[str, nn.Module] = {"G": G, "D": D}
        if self.cfg.stage == "encoder":
            for k in ("G", "D"):
                models[k].requires_grad_(False).eval()
            models["E"] = LatentEncoder(resolution=r, num_ws=G.num_ws, w_dim=m.w_dim,
                                        channel_base=m.encoder_channel_base,
                                        channel_max=m.encoder_channel_max, init_res=G.init_res)
        return models

    def build_optimizers(self, models: Mapping[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """Adam for G and D with the correction for lazy regularisation (Karras et al. 2020,
        StyleGAN2, Sec. 3.1) of the reference code (``mb_ratio``): with a regulariser every ``k``
        steps, lr times ``c = k / (k + 1)`` and betas ``beta ** c``; stage encoder: Adam for E
        (``encoder.lr``, ``encoder.betas``)."""
        L = self.cfg.loss
        if self.cfg.stage == "encoder":
            e = self.cfg.encoder
            return {"E": torch.optim.Adam(models["E"].parameters(), lr=e.lr,
                                          betas=(e.betas[0], e.betas[1]))}
        out: dict[str, torch.optim.Optimizer] = {}
        for name, interval, on in (("G", L.pl_interval, L.pl_weight > 0),
                                   ("D", L.r1_interval, self.r1_gamma > 0)):
            c = interval / (interval + 1) if on else 1.0
            out[name] = torch.optim.Adam(models[name].parameters(), lr=L.lr * c,
                                         betas=(L.betas[0] ** c, L.betas[1] ** c), eps=L.eps)
        return out

    def ema_models(self) -> list[str]:
        return ["G"] if self.cfg.stage == "gan" else []

    def ema_decay(self, step: int, kimg: float) -> float:
        """``0.5 ** (batch / ema_nimg)``, ``ema_nimg = min(ema_kimg * 1000, rampup * images)``."""
        L, b = self.cfg.loss, self.cfg.train.batch_size
        ema_nimg = (L.ema_kimg if L.ema_kimg is not None else b * 10 / 32) * 1000
        if L.ema_rampup is not None:
            ema_nimg = min(ema_nimg, kimg * 1000 * L.ema_rampup)
        return 0.5 ** (b / max(ema_nimg, 1e-8))

    def setup(self, models: Mapping[str, nn.Module], device: torch.device, *,
              resuming: bool = False) -> None:
        """Stage encoder: load G (EMA) and D from ``gan_run`` (not when resuming: the checkpoint
        restores them), freeze them, start E at w_avg."""
        self.pl_mean = self.pl_mean.to(device)
        if self.cfg.stage != "encoder":
            return
        freeze_gan_stage(models, self.cfg, "stylegan2", load=not resuming, own=ENCODER_KEYS)
        unwrap_model(models["E"]).w_avg.copy_(unwrap_model(models["G"]).mapping.w_avg)

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"pl_mean": self.pl_mean.detach().cpu().clone(), "ada": self.ada.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "pl_mean" in state:
            pm = torch.as_tensor(state["pl_mean"], dtype=torch.float32)
            self.pl_mean = pm.to(self.pl_mean.device)
        if "ada" in state:
            self.ada.load_state_dict(state["ada"])

    def deterministic_conflicts(self) -> list[str]:
        """ADA's geometric transforms differentiate ``grid_sample`` and reflection padding,
        whose CUDA backward kernels add atomically (PyTorch has no deterministic one)."""
        a = self.cfg.augment
        geometric = [t for t in a.transforms if t in GEOMETRIC]
        if self.cfg.stage != "gan" or not geometric or not (a.ada or a.p > 0):
            return []
        return [f"ADA's geometric augmentation (augment.transforms {', '.join(geometric)}) "
                "differentiates grid_sample and reflection padding, which have no "
                "deterministic CUDA backward: keep only colour transforms (augment.transforms="
                f"[{', '.join(COLOUR)}]) or turn augmentation off (augment.ada=false "
                "augment.p=0)"]

    # ------------------------------------------------------------------------- steps

    def _latents(self, ctx: StepContext, n: int,
                 num_ws: int) -> dict[str, Any]:
        """``z`` plus style-mixing arguments (the cut-off and the coin are host draws: no sync)."""
        z = ctx.randn(n, self.cfg.model.z_dim)
        z2 = ctx.randn(n, self.cfg.model.z_dim)
        cut = ctx.host_rng.randrange(1, num_ws)
        mix = ctx.host_rng.random() < self.cfg.loss.style_mixing
        return {"z": z, "mix_z": z2, "mix_cutoff": cut if mix else None}

    def _fast(self, ctx: StepContext) -> dict[str, nn.Module]:
        """Compiled views (same weights) of the unwrapped ``G.synthesis`` (``"synthesis"``) and
        ``D`` (``"D"``) when ``speed.compile_train`` holds in a single-process run; else ``{}``."""
        if not self.cfg.speed.compile_train:
            return {}
        if self._compiled is None:
            if ctx.accelerator.num_processes > 1:
                warnings.warn("speed.compile_train is ignored in multi-process (DDP) runs: "
                              "training eager", stacklevel=2)
                self._compiled = {}
            else:
                Gu, Du = unwrap_model(ctx.models["G"]), unwrap_model(ctx.models["D"])
                self._compiled = {"synthesis": torch.compile(Gu.synthesis),
                                  "D": torch.compile(Du)}
        return self._compiled

    def _generate(self, ctx: StepContext, G: nn.Module, n: int) -> torch.Tensor:
        """``[n,3,R,R]`` images of ``G`` for fresh latents (style mixing; noise from the step's
        generator), through the compiled synthesis when there is one.

        Both paths draw the noise maps with ``synthesis.draw_noise`` from the step's generator
        (the compiled graph cannot take a generator), so they consume the same random stream."""
        Gu = unwrap_model(G)
        latents = self._latents(ctx, n, Gu.num_ws)
        synthesis = self._fast(ctx).get("synthesis")
        if synthesis is None:
            return G(**latents, generator=ctx.generator)
        ws = Gu.mapping_ws(**latents).contiguous()  # one layout with or without style mixing
        return synthesis(ws, noise=Gu.synthesis.draw_noise(n, ctx.generator, ctx.device))

    def _aug(self, ctx: StepContext) -> Augment:
        return lambda x: self.ada(x, ctx.generator)

    def train_step(self, ctx: StepContext, batch: torch.Tensor) -> Logs:
        """The reference trainer's phases: ``Gmain``, ``Greg`` (lazy), ``Dmain``, ``Dreg`` (lazy);
        then ADA's adjustment. Stage encoder: one encoder phase."""
        if self.cfg.stage == "encoder":
            self.encoder_phase(ctx, batch)
            return ctx.logs
        Gu, Du = unwrap_model(ctx.models["G"]), unwrap_model(ctx.models["D"])
        Gu.train()
        Du.train()
        L, step = self.cfg.loss, ctx.step
        ctx.log("ada_p", self.ada.p)
        Du.requires_grad_(False)
        self.generator_main(ctx, batch)
        if L.pl_weight > 0 and step % L.pl_interval == 0:
            self.generator_reg(ctx, batch)
        Du.requires_grad_(True)
        self.discriminator_main(ctx, batch)
        if self.r1_gamma > 0 and step % L.r1_interval == 0:
            self.discriminator_reg(ctx, batch)
        if self.cfg.augment.ada:
            self.ada.maybe_adjust(step, self.cfg.train.batch_size)
        ctx.log("ada_rt", self.ada.rt)
        return ctx.logs

    def generator_main(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """``Gmain``: one Adam step of G on ``softplus(-D(aug(G(z))))``; logs ``loss_g``."""
        G = ctx.models["G"]
        Du = self._fast(ctx).get("D", unwrap_model(ctx.models["D"]))

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            img = self._generate(ctx, G, chunk.shape[0])
            loss = F.softplus(-Du(self.ada(img, ctx.generator)).float()).mean()
            return loss, {"loss_g": loss}

        ctx.phase("G", G, batch, loss_fn, nan_to_num=True)

    def generator_reg(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """``Greg``: path-length penalty times ``pl_weight * pl_interval``; one Adam step.

        Logs ``pl_penalty`` and ``pl_mean``."""
        L = self.cfg.loss
        G = ctx.models["G"]
        num_ws = unwrap_model(G).num_ws
        n = max(batch.shape[0] // L.pl_batch_shrink, ctx.grad_accum)

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            img, ws = G(**self._latents(ctx, chunk.shape[0], num_ws), generator=ctx.generator,
                        return_ws=True)
            lengths = path_lengths(img, ws, ctx.generator)
            # the updated mean stays in the graph for this penalty, as in the reference
            pl_mean = self.pl_mean.lerp(lengths.mean(), L.pl_decay)
            self.pl_mean = pl_mean.detach()
            penalty = (lengths - pl_mean).square().mean()
            loss = penalty * L.pl_weight * L.pl_interval + 0 * img[:, 0, 0, 0].sum()
            return loss, {"pl_penalty": penalty}

        ctx.phase("G", G, batch[:n], loss_fn, nan_to_num=True)
        self._sync_pl_mean(ctx.accelerator)
        ctx.log("pl_mean", self.pl_mean)

    def _sync_pl_mean(self, acc: Accelerator) -> None:
        """Average the path-length mean over processes after each update. The reference keeps
        one per process (it saves none); here every process holds the same value, so the one
        rank 0 saves resumes every process exactly."""
        if acc.num_processes > 1:
            self.pl_mean = acc.reduce(self.pl_mean.clone(), reduction="mean")

    def discriminator_main(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """``Dmain``: ``softplus(D(aug(G(z)))) + softplus(-D(aug(x)))``; ADA sign statistics.

        Logs ``loss_d``, ``d_real``, ``d_fake``."""
        Gu, D = unwrap_model(ctx.models["G"]), ctx.models["D"]
        D_fwd = self._fast(ctx).get("D", D)
        signs = [torch.zeros([], device=ctx.device)]

        def loss_fn(real: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            with torch.no_grad():
                fake = self._generate(ctx, Gu, real.shape[0])
            lf = D_fwd(self.ada(fake.to(real.dtype), ctx.generator)).float()
            lr = D_fwd(self.ada(real, ctx.generator)).float()
            loss = F.softplus(lf).mean() + F.softplus(-lr).mean()
            signs[0] = signs[0] + lr.detach().sign().sum()
            return loss, {"loss_d": loss, "d_real": lr.mean(), "d_fake": lf.mean()}

        ctx.phase("D", D, batch, loss_fn, nan_to_num=True)
        self._ada_signs(ctx, signs[0], batch.shape[0])

    def _ada_signs(self, ctx: StepContext, signs: torch.Tensor, n: int) -> None:
        """Add the summed ``sign(D(aug(real)))`` of ``n`` images per process to ADA's statistics
        (one host read per phase, not per micro-batch)."""
        acc = ctx.accelerator
        total = acc.reduce(signs, reduction="sum") if acc.num_processes > 1 else signs
        self.ada.accumulate(float(total), n * acc.num_processes)

    def discriminator_reg(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """``Dreg``: R1 ``gamma/2 * |grad|^2`` times ``r1_interval``, one Adam step; logs
        ``r1_penalty``. Its real logits count in ADA's statistics too, as in the reference."""
        D = ctx.models["D"]
        signs = [torch.zeros([], device=ctx.device)]

        def loss_fn(real: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            pen, logits = r1_penalty(D, real, self._aug(ctx))
            loss = (pen.mean() * (self.r1_gamma / 2) * self.cfg.loss.r1_interval
                    + 0 * logits.float().sum())
            signs[0] = signs[0] + logits.detach().float().sign().sum()
            return loss, {"r1_penalty": pen.mean()}

        ctx.phase("D", D, batch, loss_fn, nan_to_num=True)
        if self.cfg.augment.ada:
            self._ada_signs(ctx, signs[0], batch.shape[0])

    def encoder_phase(self, ctx: StepContext, batch: torch.Tensor) -> None:
        """Stage encoder: one Adam step of E on :func:`~gen_ad.inversion.projector.encoder_loss`."""
        from gen_ad.inversion.projector import encoder_loss

        E = ctx.models["E"]
        Gu = unwrap_model(ctx.models["G"]).eval()
        E.train()

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            return encoder_loss(E, Gu, chunk, generator=ctx.generator,
                                lpips_net=self._encoder_lpips(ctx.device),
                                w_weight=self.cfg.encoder.w_weight,
                                lpips_weight=self.cfg.encoder.lpips_weight,
                                mix_prob=self.cfg.loss.style_mixing,
                                host_rng=ctx.host_rng)

        ctx.phase("E", E, batch, loss_fn, nan_to_num=True)

    def _encoder_lpips(self, device: torch.device) -> nn.Module | None:
        if self.cfg.encoder.lpips == "none" or self.cfg.encoder.lpips_weight == 0:
            return None
        if self._lpips is None:
            from gen_ad.inversion.lpips_net import build_lpips

            self._lpips = build_lpips("vgg", weights=self.cfg.encoder.lpips_weights).to(device)
        return self._lpips

    # ------------------------------------------------------------------------- inference

    def sample(self, models: Mapping[str, nn.Module], n: int,
               generator: torch.Generator) -> torch.Tensor:
        G = models["G"]
        dev = next(G.parameters()).device
        z = torch.randn(n, self.cfg.model.z_dim, generator=generator, device=dev)
        return G(z, generator=generator)

    def scorers(self, models: Mapping[str, nn.Module], **kwargs: Any) -> dict[str, AnomalyScorer]:
        """``stylegan2`` (projection from the mean ``w``) and, when the run has an encoder,
        ``stylegan2-enc`` (encoder-initialised). ``kwargs`` go to
        :class:`~gen_ad.inversion.projector.StyleGAN2Scorer` (``steps``, ``latent``,
        ``lpips_weights``, ``lpips_random_init``, ``feature_weight``, ...)."""
        from gen_ad.inversion.lpips_net import build_lpips
        from gen_ad.inversion.projector import StyleGAN2Scorer

        kw = self.scorer_options(kwargs).projector_kwargs()
        if kw.get("lpips_net") is None:
            kw["lpips_net"] = build_lpips("vgg", weights=kw.pop("lpips_weights", None),
                                          random_init=kw.pop("lpips_random_init", False))
        out: dict[str, AnomalyScorer] = {
            "stylegan2": StyleGAN2Scorer(models["G"], D=models.get("D"), **kw)}
        if "E" in models:
            out["stylegan2-enc"] = StyleGAN2Scorer(models["G"], D=models.get("D"),
                                                   encoder=models["E"], **kw)
        return out


__all__ = ["StyleGAN2Config", "StyleGAN2Family", "StyleGAN2ScorerOptions", "r1_penalty",
           "path_lengths", "default_r1_gamma"]
