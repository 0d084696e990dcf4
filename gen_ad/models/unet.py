"""Noise-prediction UNet (diffusers ``UNet2DModel``) and the weightless noise schedules.

Named configurations (all single-head attention: every attention layer has one head spanning
all channels of its level, as in AutoDDPM's ``num_head_channels=256`` with 256 channels):

* ``autoddpm``: AutoDDPM's UNet (Bercea et al. 2023): 3 levels ``[128, 256, 256]``, one residual
  block per level, attention at levels 2 and 3 and in the middle block, for 64x64 inputs.
* ``anoddpm``: a larger AnoDDPM-like UNet (Wyatt et al. 2022 used a guided-diffusion UNet with
  base 128 and multipliers ``[1, 1, 2, 2, 4, 4]`` at 256x256; here 4 levels
  ``[128, 256, 256, 512]``, two residual blocks per level, attention at the two lowest levels).
* ``small``: ``[64, 128, 128]``, one block per level (quick GPU experiments).
* ``tiny``: ``[32, 64]``, one block per level, attention in the lower level only (tests, demo).

The schedule is diffusers' ``DDPMScheduler``/``DDIMScheduler`` (T=1000, linear betas 1e-4..0.02
by default); training and reconstruction build it from the same config values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Literal

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from gen_ad.config import check
from gen_ad.errors import ConfigError

# name -> (block_out_channels, layers_per_block, attention_levels, norm_num_groups)
_PRESETS: Mapping[str, tuple[tuple[int, ...], int, tuple[bool, ...], int]] = MappingProxyType({
    "tiny": ((32, 64), 1, (False, True), 8),
    "small": ((64, 128, 128), 1, (False, True, True), 32),
    "autoddpm": ((128, 256, 256), 1, (False, True, True), 32),
    "anoddpm": ((128, 256, 256, 512), 2, (False, False, True, True), 32),
})


def unet_names() -> list[str]:
    """Names of the preset UNet configurations."""
    return list(_PRESETS)


@dataclass
class UNetConfig:
    """The noise-prediction UNet: a preset name plus optional overrides.

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
        check(self.name in _PRESETS, f"{prefix}.name",
              f"unknown UNet '{self.name}' (choose from {', '.join(_PRESETS)})")
        ch, _, att, groups = self.resolved()
        check(len(ch) >= 1 and all(c > 0 for c in ch), f"{prefix}.block_out_channels",
              f"must be positive widths, got {ch}")
        check(len(att) == len(ch), f"{prefix}.attention_levels",
              f"needs one entry per level ({len(ch)}), got {len(att)}")
        check(all(c % groups == 0 for c in ch), f"{prefix}.norm_num_groups",
              f"{groups} must divide every width in {ch}")
        check(self.layers_per_block is None or self.layers_per_block >= 1,
              f"{prefix}.layers_per_block", "must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", "must be in [0, 1)")

    def resolved(self) -> tuple[list[int], int, list[bool], int]:
        """``(block_out_channels, layers_per_block, attention_levels, norm_num_groups)``."""
        if self.name not in _PRESETS:
            raise ConfigError(f"unknown UNet '{self.name}' (choose from {', '.join(_PRESETS)})")
        ch, layers, att, groups = _PRESETS[self.name]
        return (list(self.block_out_channels or ch),
                self.layers_per_block or layers,
                list(self.attention_levels if self.attention_levels is not None else att),
                self.norm_num_groups or groups)


def unet_kwargs(cfg: UNetConfig, sample_size: int, channels: int = 3) -> dict[str, Any]:
    """Keyword arguments of ``UNet2DModel`` for ``cfg`` at ``sample_size`` pixels."""
    ch, layers, att, groups = cfg.resolved()
    if sample_size % (2 ** (len(ch) - 1)):
        raise ConfigError(f"image size {sample_size} is not divisible by 2^{len(ch) - 1} "
                          f"(the UNet '{cfg.name}' has {len(ch)} levels)")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in att)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att))
    return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                block_out_channels=tuple(ch), layers_per_block=layers,
                down_block_types=down, up_block_types=up,
                attention_head_dim=None,  # None = one head spanning the level's channels
                norm_num_groups=groups, dropout=cfg.dropout, add_attention=cfg.mid_attention)


def build_unet(name: str = "autoddpm", sample_size: int = 64, **overrides: Any) -> UNet2DModel:
    """Build a noise-prediction UNet.

    Args:
        name: preset name (see :func:`unet_names`).
        sample_size: image side length in pixels.
        **overrides: :class:`UNetConfig` fields (``block_out_channels``, ``layers_per_block``,
            ``attention_levels``, ``norm_num_groups``, ``mid_attention``, ``dropout``).
    Returns:
        A ``UNet2DModel`` mapping ``(x_t [B,3,H,W], t [B])`` to predicted noise ``[B,3,H,W]``
        (read ``.sample`` of its output).
    """
    cfg = UNetConfig(name=name, **overrides)
    cfg.validate("model.unet")
    return UNet2DModel(**unet_kwargs(cfg, sample_size))


@dataclass
class ScheduleConfig:
    """The diffusion noise schedule (weightless; rebuilt from these values).

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


def build_scheduler(kind: Literal["ddpm", "ddim"] = "ddpm", num_train_timesteps: int = 1000,
                    beta_schedule: str = "linear", beta_start: float = 1e-4,
                    beta_end: float = 0.02, clip_sample: bool = True,
                    ) -> DDPMScheduler | DDIMScheduler:
    """A diffusers noise scheduler (epsilon prediction, fixed small variance).

    Args:
        kind: ``ddpm`` (ancestral) or ``ddim``.
        num_train_timesteps: T.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        beta_start / beta_end: end points of the (scaled) linear schedule.
        clip_sample: clip predicted ``x_0`` to ``[-1,1]``.
    Returns:
        The scheduler (its ``alphas_cumprod``/``betas`` define the forward process).
    """
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  beta_start=beta_start, beta_end=beta_end, clip_sample=clip_sample,
                  prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    raise ConfigError(f"unknown scheduler kind '{kind}' (choose ddpm or ddim)")


def scheduler_from_config(cfg: ScheduleConfig, kind: Literal["ddpm", "ddim"] = "ddpm",
                          ) -> DDPMScheduler | DDIMScheduler:
    """:func:`build_scheduler` from a :class:`ScheduleConfig`."""
    return build_scheduler(kind, **asdict(cfg))


__all__ = ["UNetConfig", "ScheduleConfig", "build_unet", "build_scheduler",
           "scheduler_from_config", "unet_kwargs", "unet_names"]
