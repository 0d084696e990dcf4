"""DDPM training (epsilon prediction) with Gaussian or simplex noise, and its two scorers.

One step (Ho et al. 2020, Algorithm 1 and ``L_simple``, Eq. 14): draw ``t ~ U{0..T-1}`` and noise
``eps`` (Gaussian, or AnoDDPM's normalised fractal simplex noise, Wyatt et al. 2022), form
``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`` (:func:`gen_ad.models.schedule.add_noise`, the
schedule maths reconstruction uses too) and minimise ``MSE(unet(x_t, t), eps)``. Adam (max lr
1e-4 as AutoDDPM, Bercea et al. 2023) with linear warm-up then cosine decay to 0 at
``train.max_steps`` (stepped here, after the optimiser), gradient-norm clipping, and an EMA of the
UNet kept by the loop. All randomness of a step comes from ``ctx.generator``.

The config sections of the network (:class:`UNetConfig`, ``model.*``) and of the schedule
(:class:`ScheduleConfig`, ``schedule.*``) live here, beside the rest of the DDPM config; the
network and the schedule themselves are :mod:`gen_ad.models.unet` and
:mod:`gen_ad.models.schedule`, which know nothing of configs.

Sampling (FID, sample grids) runs DDIM (eta 0, ``sample.steps`` steps) from the EMA UNet starting
from the training noise kind. A trained run offers two scorers, ``anoddpm`` and ``autoddpm``
(:mod:`gen_ad.inversion.diffusion`); both use the training noise kind, since the UNet predicts the
noise it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)
from torch import nn

from gen_ad.config import DataConfig, TrainConfig, check, from_dict
from gen_ad.errors import ConfigError
from gen_ad.inversion.diffusion import (
    AnoDDPMScorer,
    AutoDDPMScorer,
    Denoiser,
    SpeedConfig,
    draw_noise,
)
from gen_ad.inversion.simplex import SimplexConfig
from gen_ad.models.schedule import Scheduler, add_noise, build_scheduler, timestep_sequence
from gen_ad.models.unet import UNetSpecError, build_unet, check_unet, unet_kwargs
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.training.family import Family, Logs, StepContext, register_family


@dataclass
class UNetConfig:
    """The noise-prediction UNet (``model.*``): a preset name plus optional overrides
    (:func:`gen_ad.models.unet.build_unet` builds it from these values alone).

    Attributes:
        name: preset (``tiny``, ``small``, ``autoddpm``, ``anoddpm``).
        block_out_channels: channels per level (``None``: the preset's).
        layers_per_block: residual blocks per level (``None``: the preset's).
        attention_levels: single-head self-attention per level (``None``: the preset's).
        norm_num_groups: GroupNorm groups (``None``: the preset's); must divide every width.
        mid_attention: self-attention in the middle block.
        dropout: dropout in the residual blocks.
    """

    name: str = "autoddpm"
    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    attention_levels: list[bool] | None = None
    norm_num_groups: int | None = None
    mid_attention: bool = True
    dropout: float = 0.0

    def validate(self, prefix: str) -> None:
        try:
            check_unet(**asdict(self))
        except UNetSpecError as e:
            raise ConfigError(f"config key '{prefix}.{e.field}': {e.reason}") from e


@dataclass
class ScheduleConfig:
    """The diffusion noise schedule (``schedule.*``; weightless, rebuilt from these values by
    :func:`scheduler_from_config` for training and reconstruction alike).

    Attributes:
        num_train_timesteps: T.
        beta_schedule: diffusers' schedule name (``linear`` as in DDPM/AnoDDPM/AutoDDPM,
            ``scaled_linear`` or ``squaredcos_cap_v2``).
        beta_start / beta_end: linear schedule end points.
        clip_sample: clip the predicted ``x_0`` to ``[-1,1]`` in reverse steps.
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True

    def validate(self, prefix: str) -> None:
        check(self.num_train_timesteps >= 2, f"{prefix}.num_train_timesteps", "must be >= 2")
        check(0.0 < self.beta_start < self.beta_end < 1.0, f"{prefix}.beta_start",
              "need 0 < beta_start < beta_end < 1")


def scheduler_from_config(cfg: ScheduleConfig, kind: Literal["ddpm", "ddim"] = "ddpm",
                          ) -> Scheduler:
    """:func:`gen_ad.models.schedule.build_scheduler` from a :class:`ScheduleConfig`."""
    return build_scheduler(kind, **asdict(cfg))


@dataclass
class NoiseConfig:
    """Noise of the forward process (training and reconstruction).

    Attributes:
        kind: ``gaussian`` (DDPM, AutoDDPM) or ``simplex`` (AnoDDPM).
        simplex: octaves / persistence / frequency of the simplex noise.
    """

    kind: Literal["gaussian", "simplex"] = "gaussian"
    simplex: SimplexConfig = field(default_factory=SimplexConfig)


@dataclass
class OptimConfig:
    """Adam with warm-up then cosine (or constant) learning rate.

    Attributes:
        lr: peak learning rate (AutoDDPM: 1e-4).
        betas: Adam betas.
        weight_decay: L2 weight decay.
        warmup_steps: linear warm-up steps.
        schedule: ``cosine`` (decays to 0 at ``train.max_steps``) or ``constant``.
        grad_clip: clip the global gradient norm (0 = off).
    """

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 500
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0

    def validate(self, prefix: str) -> None:
        check(self.lr > 0, f"{prefix}.lr", "must be positive")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
              f"{prefix}.betas", "must be two numbers in [0, 1)")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 = off)")


@dataclass
class SampleConfig:
    """Generation for sample grids and FID: DDIM (eta 0).

    Attributes:
        steps: DDIM steps from ``T - 1`` to 0.
    """

    steps: int = 50

    def validate(self, prefix: str) -> None:
        check(self.steps >= 1, f"{prefix}.steps", "must be >= 1")


@dataclass
class AnoDDPMConfig:
    """AnoDDPM scorer defaults (see :class:`~gen_ad.inversion.diffusion.AnoDDPMScorer`)."""

    t: int = 200
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int | None = None
    residual: Literal["l1", "l2"] = "l1"
    reduce: Literal["mean", "max", "topk"] = "mean"
    seed: int = 0
    streams: Literal["image", "batch"] = "image"

    def validate(self, prefix: str) -> None:
        check(self.t >= 0, f"{prefix}.t", "must be >= 0")
        check(self.steps is None or self.steps >= 1, f"{prefix}.steps", "must be >= 1")


@dataclass
class AutoDDPMConfig:
    """AutoDDPM scorer defaults (see :class:`~gen_ad.inversion.diffusion.AutoDDPMScorer`).

    ``lpips_net`` defaults to ``squeeze`` as in AutoDDPM's reference code (its torchvision
    weights ``squeezenet1_1-b8a52dc0.pth`` must be in the torch hub cache or ``lpips_weights``).
    """

    t_recon: int = 200
    t_inpaint: int = 50
    resample: int = 5
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps_recon: int | None = None
    steps_inpaint: int | None = None
    fpr: float = 0.05
    threshold: float | None = None
    dilation: int = 3
    normalize_residual: bool = True
    final: Literal["mask", "weighted"] = "mask"
    reduce: Literal["mean", "max", "topk"] = "mean"
    lpips_net: Literal["vgg", "alex", "squeeze"] = "squeeze"
    lpips_weights: str | None = None
    seed: int = 0
    streams: Literal["image", "batch"] = "image"

    def validate(self, prefix: str) -> None:
        check(self.t_recon >= 0, f"{prefix}.t_recon", "must be >= 0")
        check(self.t_inpaint >= 0, f"{prefix}.t_inpaint", "must be >= 0")
        check(self.resample >= 1, f"{prefix}.resample", "must be >= 1")
        check(0.0 < self.fpr < 1.0, f"{prefix}.fpr", "must be in (0, 1)")
        check(self.dilation >= 1 and self.dilation % 2 == 1, f"{prefix}.dilation",
              "must be a positive odd integer")
        for k in ("steps_recon", "steps_inpaint"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{prefix}.{k}", "must be >= 1")


@dataclass
class DDPMScorerOptions:
    """Scorer options of a ``ddpm`` run (``anoddpm`` and ``autoddpm``).

    Attributes:
        seed / sampler: for both scorers (default: the config sections' values).
        steps: model evaluations of AnoDDPM and of AutoDDPM's first reconstruction.
        lpips: a ready spatial LPIPS module (programmatic use). lpips_random_init: random LPIPS
            trunk (tests; labelled in reports).
        anoddpm / autoddpm: overrides of fields of the config sections of the same name
            (an unknown field is a config error).
    """

    seed: int | None = None
    steps: int | None = None
    sampler: Literal["ddpm", "ddim"] | None = None
    lpips: Any = None
    lpips_random_init: bool = False
    anoddpm: dict[str, Any] = field(default_factory=dict)
    autoddpm: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        check(self.steps is None or self.steps >= 1, f"{prefix}.steps", "must be >= 1")


@dataclass
class DDPMConfig:
    """Top-level DDPM config (``configs/ddpm/*.yaml``)."""

    out: str = "checkpoints/ddpm"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    anoddpm: AnoDDPMConfig = field(default_factory=AnoDDPMConfig)
    autoddpm: AutoDDPMConfig = field(default_factory=AutoDDPMConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, prefix: str) -> None:
        try:
            unet_kwargs(sample_size=self.data.size, **asdict(self.model))
        except UNetSpecError as e:
            raise ConfigError(f"config key 'data.size': {e.reason}") from e
        n_t = self.schedule.num_train_timesteps
        for key, v in (("anoddpm.t", self.anoddpm.t), ("autoddpm.t_recon", self.autoddpm.t_recon),
                       ("autoddpm.t_inpaint", self.autoddpm.t_inpaint)):
            check(v < n_t, key, f"must be < schedule.num_train_timesteps ({n_t}), got {v}")


@register_family
class DDPMFamily(Family):
    """Denoising diffusion (epsilon prediction) on the shared loop."""

    name = "ddpm"
    config_cls = DDPMConfig
    scorer_options_cls = DDPMScorerOptions

    def __init__(self, cfg: DDPMConfig) -> None:
        super().__init__(cfg)
        self.scheduler = scheduler_from_config(cfg.schedule, "ddpm")

    def build_models(self) -> dict[str, nn.Module]:
        """The UNet; channels-last when ``speed`` says so for the device training will use
        (``train.cpu`` or no CUDA: CPU), compiled in place when ``speed.compile_train``."""
        unet = build_unet(sample_size=self.cfg.data.size, **asdict(self.cfg.model))
        cuda = torch.cuda.is_available() and not self.cfg.train.cpu
        if self.cfg.speed.resolve(torch.device("cuda" if cuda else "cpu")).channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.cfg.speed.compile_train:
            unet.compile()  # in place: state-dict keys, EMA and checkpoints unchanged
        return {"unet": unet}

    def build_optimizers(self, models: Mapping[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        o = self.cfg.optim
        return {"unet": torch.optim.Adam(models["unet"].parameters(), lr=o.lr,
                                         betas=(o.betas[0], o.betas[1]),
                                         weight_decay=o.weight_decay)}

    def build_schedulers(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
        o, opt = self.cfg.optim, optimizers["unet"]
        warm = min(o.warmup_steps, max(self.cfg.train.max_steps - 1, 0))
        if o.schedule == "cosine":
            return {"unet": get_cosine_schedule_with_warmup(opt, warm, self.cfg.train.max_steps)}
        return {"unet": get_constant_schedule_with_warmup(opt, warm)}

    def ema_models(self) -> list[str]:
        return ["unet"] if self.cfg.train.ema_decay > 0 else []

    def noise_like(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training noise shaped like ``x`` from ``generator``."""
        return draw_noise(self.cfg.noise.kind, x, generator, self.cfg.noise.simplex)

    def loss(self, unet: nn.Module, x0: torch.Tensor, generator: torch.Generator,
             ctx: StepContext | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE (Ho et al. 2020, Eq. 14) for a batch ``x0`` ``[b,3,H,W]`` in
        ``[-1,1]`` at timesteps ``t ~ U{0..T-1}``; returns a float32 scalar."""
        n_t = self.cfg.schedule.num_train_timesteps
        t = torch.randint(0, n_t, (x0.shape[0],), generator=generator, device=generator.device)
        t = t.to(x0.device)
        eps = self.noise_like(x0, generator)
        x_t = add_noise(self.scheduler, x0, t, eps)
        with ctx.autocast() if ctx is not None else nullcontext():
            pred = unet(x_t, t).sample
        return F.mse_loss(pred.float(), eps.float())

    def train_step(self, ctx: StepContext, batch: torch.Tensor) -> Logs:
        """One phase: epsilon-prediction MSE over the micro-batches, gradient-norm clipping
        (logged as ``grad_norm``), Adam step, LR schedule step; logs ``loss``."""
        unet = ctx.models["unet"]
        unet.train()

        def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, Logs]:
            loss = self.loss(unet, chunk, ctx.generator, ctx)
            return loss, {"loss": loss}

        ctx.phase("unet", unet, batch, loss_fn, clip_grad=self.cfg.optim.grad_clip,
                  step_scheduler=True)
        return ctx.logs

    def sample(self, models: Mapping[str, nn.Module], n: int,
               generator: torch.Generator) -> torch.Tensor:
        """``n`` samples ``[n,3,H,W]`` (in ``[-1,1]`` when ``schedule.clip_sample``): DDIM, eta 0
        (Song et al. 2021, Eq. 12), ``sample.steps`` steps from ``T - 1``, starting from the
        training noise kind drawn from ``generator``; the reverse loop is reconstruction's
        :class:`~gen_ad.inversion.diffusion.Denoiser` (one implementation of the reverse
        process), on the schedule maths of :mod:`gen_ad.models.schedule`."""
        unet = models["unet"]
        p = next(unet.parameters())
        size = self.cfg.data.size
        x = draw_noise(self.cfg.noise.kind, torch.empty(n, 3, size, size, device=p.device),
                       generator, self.cfg.noise.simplex)
        den = Denoiser(unet, self.scheduler, self.cfg.noise.kind, self.cfg.noise.simplex, "ddim",
                       self.cfg.schedule.clip_sample)
        n_t = self.cfg.schedule.num_train_timesteps
        return den.denoise(x, timestep_sequence(n_t - 1, self.cfg.sample.steps), generator)

    def scorers(self, models: Mapping[str, nn.Module], **kwargs: Any) -> dict[str, AnomalyScorer]:
        """``anoddpm`` and ``autoddpm`` scorers for the (EMA) UNet.

        Keyword args (all optional): ``seed``, ``steps`` (model evaluations of AnoDDPM and of
        AutoDDPM's first reconstruction), ``sampler`` (``ddpm``/``ddim`` for both), ``lpips``
        (a ready spatial LPIPS module), ``lpips_random_init`` (tests), and ``anoddpm`` /
        ``autoddpm``: dicts overriding fields of the config sections of the same name.
        """
        o = self.scorer_options(kwargs)
        ano, auto = self._scorer_configs(o)
        noise = dict(noise=self.cfg.noise.kind, simplex=self.cfg.noise.simplex)
        unet = models["unet"]
        auto_kw = asdict(auto)
        auto_kw["lpips_random_init"] = o.lpips_random_init
        return {
            "anoddpm": AnoDDPMScorer(unet, self.scheduler, **asdict(ano), **noise,
                                     speed=self.cfg.speed),
            "autoddpm": AutoDDPMScorer(unet, self.scheduler, lpips=o.lpips,
                                       **auto_kw, **noise, speed=self.cfg.speed),
        }

    def _scorer_configs(self, o: DDPMScorerOptions) -> tuple[AnoDDPMConfig, AutoDDPMConfig]:
        """The config sections with the options applied, validated like the config itself."""
        common = {k: getattr(o, k) for k in ("seed", "sampler") if getattr(o, k) is not None}
        ano = {**asdict(self.cfg.anoddpm), **common}
        auto = {**asdict(self.cfg.autoddpm), **common}
        if o.steps is not None:
            ano["steps"], auto["steps_recon"] = o.steps, o.steps
        return (from_dict(AnoDDPMConfig, {**ano, **o.anoddpm}, prefix="scorer.anoddpm"),
                from_dict(AutoDDPMConfig, {**auto, **o.autoddpm}, prefix="scorer.autoddpm"))
