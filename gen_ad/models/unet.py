"""Noise-prediction UNet (diffusers ``UNet2DModel``) presets.

Named configurations (all single-head attention: every attention layer has one head spanning
all channels of its level, as in AutoDDPM's ``num_head_channels=256`` with 256 channels):

* ``autoddpm``: AutoDDPM's UNet (Bercea et al. 2023): 3 levels ``[128, 256, 256]``, one residual
  block per level, attention at levels 2 and 3 and in the middle block, for 64x64 inputs.
* ``anoddpm``: a larger AnoDDPM-like UNet (Wyatt et al. 2022 used a guided-diffusion UNet with
  base 128 and multipliers ``[1, 1, 2, 2, 4, 4]`` at 256x256; here 4 levels
  ``[128, 256, 256, 512]``, two residual blocks per level, attention at the two lowest levels).
* ``small``: ``[64, 128, 128]``, one block per level (quick GPU experiments).
* ``tiny``: ``[32, 64]``, one block per level, attention in the lower level only (tests, demo).

A UNet is rebuilt from its preset name and overrides alone (:func:`build_unet`); an impossible
setting raises :class:`UNetSpecError` (a ``ValueError`` naming the argument), which the config
layer (:class:`gen_ad.training.ddpm.UNetConfig`) turns into a config error naming the key. The
weightless noise schedule lives in :mod:`gen_ad.models.schedule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from diffusers import UNet2DModel

# name -> (block_out_channels, layers_per_block, attention_levels, norm_num_groups)
_PRESETS: Mapping[str, tuple[tuple[int, ...], int, tuple[bool, ...], int]] = MappingProxyType({
    "tiny": ((32, 64), 1, (False, True), 8),
    "small": ((64, 128, 128), 1, (False, True, True), 32),
    "autoddpm": ((128, 256, 256), 1, (False, True, True), 32),
    "anoddpm": ((128, 256, 256, 512), 2, (False, False, True, True), 32),
})


class UNetSpecError(ValueError):
    """An impossible UNet setting; ``field`` names the argument, ``reason`` says what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def unet_names() -> list[str]:
    """Names of the preset UNet configurations."""
    return list(_PRESETS)


def resolve_unet(name: str, block_out_channels: Sequence[int] | None = None,
                 layers_per_block: int | None = None,
                 attention_levels: Sequence[bool] | None = None,
                 norm_num_groups: int | None = None) -> tuple[list[int], int, list[bool], int]:
    """The preset ``name`` with its overrides applied (``None`` or empty/zero: the preset's).

    Returns:
        ``(block_out_channels, layers_per_block, attention_levels, norm_num_groups)``.
    Raises:
        UNetSpecError: an unknown ``name``.
    """
    if name not in _PRESETS:
        raise UNetSpecError("name", f"unknown UNet '{name}' (choose from {', '.join(_PRESETS)})")
    ch, layers, att, groups = _PRESETS[name]
    return (list(block_out_channels or ch),
            layers_per_block or layers,
            list(attention_levels if attention_levels is not None else att),
            norm_num_groups or groups)


def check_unet(name: str = "autoddpm", *, block_out_channels: Sequence[int] | None = None,
               layers_per_block: int | None = None,
               attention_levels: Sequence[bool] | None = None,
               norm_num_groups: int | None = None, mid_attention: bool = True,
               dropout: float = 0.0) -> None:
    """Check a preset and its overrides (arguments as :func:`unet_kwargs`).

    Raises:
        UNetSpecError: the first impossible setting (unknown name, non-positive widths, one
            attention flag per level missing, groups not dividing every width, fewer than one
            block per level, dropout outside ``[0, 1)``).
    """
    del mid_attention  # any bool is valid
    ch, _, att, groups = resolve_unet(name, block_out_channels, layers_per_block,
                                      attention_levels, norm_num_groups)
    if not (len(ch) >= 1 and all(c > 0 for c in ch)):
        raise UNetSpecError("block_out_channels", f"must be positive widths, got {ch}")
    if len(att) != len(ch):
        raise UNetSpecError("attention_levels",
                            f"needs one entry per level ({len(ch)}), got {len(att)}")
    if not all(c % groups == 0 for c in ch):
        raise UNetSpecError("norm_num_groups", f"{groups} must divide every width in {ch}")
    if not (layers_per_block is None or layers_per_block >= 1):
        raise UNetSpecError("layers_per_block", "must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise UNetSpecError("dropout", "must be in [0, 1)")


def unet_kwargs(name: str = "autoddpm", sample_size: int = 64, channels: int = 3, *,
                block_out_channels: Sequence[int] | None = None,
                layers_per_block: int | None = None,
                attention_levels: Sequence[bool] | None = None,
                norm_num_groups: int | None = None, mid_attention: bool = True,
                dropout: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of ``UNet2DModel`` for a preset at ``sample_size`` pixels.

    Args:
        name: preset (see :func:`unet_names`).
        sample_size: image side length in pixels; divisible by ``2 ** (levels - 1)``.
        channels: image channels (input and output).
        block_out_channels: channels per level (``None``: the preset's).
        layers_per_block: residual blocks per level (``None``: the preset's).
        attention_levels: single-head self-attention per level (``None``: the preset's).
        norm_num_groups: GroupNorm groups (``None``: the preset's); must divide every width.
        mid_attention: self-attention in the middle block.
        dropout: dropout in the residual blocks, in ``[0, 1)``.
    Raises:
        UNetSpecError: an impossible setting (:func:`check_unet`) or a ``sample_size`` the
            levels cannot halve (``field == "sample_size"``).
    """
    check_unet(name, block_out_channels=block_out_channels, layers_per_block=layers_per_block,
               attention_levels=attention_levels, norm_num_groups=norm_num_groups,
               mid_attention=mid_attention, dropout=dropout)
    ch, layers, att, groups = resolve_unet(name, block_out_channels, layers_per_block,
                                           attention_levels, norm_num_groups)
    if sample_size % (2 ** (len(ch) - 1)):
        raise UNetSpecError("sample_size",
                            f"image size {sample_size} is not divisible by 2^{len(ch) - 1} "
                            f"(the UNet '{name}' has {len(ch)} levels)")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in att)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att))
    return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                block_out_channels=tuple(ch), layers_per_block=layers,
                down_block_types=down, up_block_types=up,
                attention_head_dim=None,  # None = one head spanning the level's channels
                norm_num_groups=groups, dropout=dropout, add_attention=mid_attention)


def build_unet(name: str = "autoddpm", sample_size: int = 64, **overrides: Any) -> UNet2DModel:
    """Build a noise-prediction UNet (the one builder: tests, training and run loading).

    Args:
        name: preset name (see :func:`unet_names`).
        sample_size: image side length in pixels.
        **overrides: keyword arguments of :func:`unet_kwargs` (``block_out_channels``,
            ``layers_per_block``, ``attention_levels``, ``norm_num_groups``, ``mid_attention``,
            ``dropout``, ``channels``).
    Returns:
        A ``UNet2DModel`` mapping ``(x_t [B,3,H,W], t [B] long in [0, T))`` to predicted noise
        ``[B,3,H,W]`` (read ``.sample`` of its output).
    Raises:
        UNetSpecError: an impossible setting.
    """
    return UNet2DModel(**unet_kwargs(name, sample_size, **overrides))


__all__ = ["UNetSpecError", "build_unet", "check_unet", "resolve_unet",
           "unet_kwargs", "unet_names"]
