"""Residual WGAN-GP networks of f-AnoGAN: generator, critic and encoder.

The architecture follows the ResNet of the WGAN-GP paper (Gulrajani et al. 2017) as used by
f-AnoGAN (Schlegl et al. 2019) at 64x64 with a 128-d latent:

- **Generator**: ``Linear(latent -> 4*4*8d)`` -> ``[B,8d,4,4]`` -> one up-sampling residual block
  per doubling (channels ``8d, ..., 8d, 4d, 2d, d``) -> BatchNorm -> ReLU -> 3x3 conv -> ``tanh``.
- **Critic**: 3x3 conv (``d``) -> one down-sampling residual block per halving (channels
  ``2d, 4d, 8d, 8d, ...``) down to ``4x4`` -> flatten (the *features* ``f(x)``, ``[B, 16*8d]``) ->
  ``Linear -> 1``. No batch norm (it would break the per-sample gradient penalty): the reference
  uses layer norm over ``(C,H,W)`` with a per-channel affine, which is ``GroupNorm(1, C)``.
- **Encoder**: the critic's trunk with a ``Linear -> latent`` head, bounded by ``tanh`` as in the
  f-AnoGAN paper and its reference code's default (``tanh_fc``); ``output="linear"`` gives the
  unbounded head of its appendix variant.

Residual blocks (pre-activation): ``norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv3x3`` with
nearest up-sampling before the first conv (``up``) or 2x2 mean pooling after the second
(``down``); the shortcut is a 1x1 conv after up-sampling / before pooling.

Latent prior: the generator is trained on ``z ~ N(0, I)`` (the reference's default ``normal``
sampling) or ``z ~ U(-1, 1)`` (``prior="uniform"``); see :func:`sample_latent`.

Resolutions are powers of two ``>= 8`` (64 by default, 128 by config). Pure modules: no losses,
optimisers or IO.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

Norm = Literal["batch", "layer", "none"]
Prior = Literal["normal", "uniform"]


def _n_blocks(resolution: int) -> int:
    """Number of 2x resampling blocks between 4x4 and ``resolution``."""
    n = int(round(math.log2(resolution / 4))) if resolution > 0 else -1
    if n < 1 or 4 * 2**n != resolution:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return n


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C,H,W), per-channel affine
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (choose batch, layer or none)")


def sample_latent(n: int, latent_dim: int, prior: Prior, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``n`` latent codes ``[n, latent_dim]`` from the prior.

    Args:
        n: number of codes.
        latent_dim: latent size.
        prior: ``normal`` (``N(0, I)``) or ``uniform`` (``U(-1, 1)``).
        generator: random generator (its device is used when ``device`` is ``None``).
        device: device of the result.
    Returns:
        ``[n, latent_dim]`` float32 codes.
    """
    dev = device if device is not None else (generator.device if generator is not None else None)
    if prior == "normal":
        return torch.randn(n, latent_dim, generator=generator, device=dev)
    if prior == "uniform":
        return torch.rand(n, latent_dim, generator=generator, device=dev) * 2.0 - 1.0
    raise ValueError(f"unknown prior '{prior}' (choose normal or uniform)")


class ResBlock(nn.Module):
    """Pre-activation residual block that doubles (``up``) or halves (``down``) the resolution.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        resample: ``up`` or ``down``.
        norm: normalisation inside the block (``batch``, ``layer`` or ``none``).
    """

    def __init__(self, *, in_ch: int, out_ch: int, resample: Literal["up", "down"],
                 norm: Norm) -> None:
        super().__init__()
        if resample not in ("up", "down"):
            raise ValueError(f"resample must be 'up' or 'down', got {resample!r}")
        self.resample = resample
        mid = out_ch if resample == "up" else in_ch
        self.norm1 = _norm(norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,in,H,W]`` -> ``[B,out,2H,2W]`` (up) or ``[B,out,H/2,W/2]`` (down)."""
        h = F.relu(self.norm1(x))
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            return self.shortcut(x) + self.conv2(F.relu(self.norm2(self.conv1(h))))
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        return self.shortcut(F.avg_pool2d(x, 2)) + F.avg_pool2d(h, 2)


class Generator(nn.Module):
    """Residual generator ``z [B,latent_dim] -> images [B,channels,R,R]`` in ``(-1, 1)``.

    Args:
        latent_dim: size of ``z`` (128 in f-AnoGAN).
        resolution: output side length, a power of two ``>= 8`` (64 default).
        channels: image channels (3 for RGB).
        base_dim: width ``d`` (64 in the reference); the 4x4 stage has ``8d`` channels.
    """

    def __init__(self, *, latent_dim: int = 128, resolution: int = 64, channels: int = 3,
                 base_dim: int = 64) -> None:
        super().__init__()
        n = _n_blocks(resolution)
        self.latent_dim, self.resolution, self.channels = latent_dim, resolution, channels
        self.top = 8 * base_dim
        self.input = nn.Linear(latent_dim, 16 * self.top)
        widths = [self.top] + [base_dim * min(8, 2 ** (n - 1 - i)) for i in range(n)]
        self.blocks = nn.Sequential(*[
            ResBlock(in_ch=widths[i], out_ch=widths[i + 1], resample="up", norm="batch")
            for i in range(n)])
        self.out_norm = nn.BatchNorm2d(widths[-1])
        self.output = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B,latent_dim]`` -> ``[B,channels,R,R]`` in ``(-1, 1)``."""
        h = rearrange(self.input(z), "b (c h w) -> b c h w", c=self.top, h=4, w=4)
        h = F.relu(self.out_norm(self.blocks(h)))
        return torch.tanh(self.output(h))


class _DownTrunk(nn.Module):
    """Shared trunk of critic and encoder: ``[B,C,R,R] -> [B, 16 * feature_channels]``."""

    def __init__(self, *, resolution: int, channels: int, base_dim: int, norm: Norm) -> None:
        super().__init__()
        n = _n_blocks(resolution)
        widths = [base_dim] + [base_dim * min(8, 2 ** (i + 1)) for i in range(n)]
        self.input = nn.Conv2d(channels, base_dim, 3, padding=1)
        self.blocks = nn.Sequential(*[
            ResBlock(in_ch=widths[i], out_ch=widths[i + 1], resample="down", norm=norm)
            for i in range(n)])
        self.feature_dim = 16 * widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.blocks(self.input(x)), "b c h w -> b (c h w)")


class Critic(nn.Module):
    """Residual WGAN critic ``images -> [B]`` scores (unbounded; higher = more "real").

    Args:
        resolution: input side length, a power of two ``>= 8``.
        channels: image channels.
        base_dim: width ``d``; features have ``16 * min(8, 2**n) * d`` entries (``128d`` at 64 px).
        norm: ``layer`` (reference) or ``none``; batch norm is rejected (breaks the gradient
            penalty, which is per sample).
    """

    def __init__(self, *, resolution: int = 64, channels: int = 3, base_dim: int = 64,
                 norm: Norm = "layer") -> None:
        super().__init__()
        if norm == "batch":
            raise ValueError("the critic must not use batch norm (WGAN-GP); use 'layer' or 'none'")
        self.trunk = _DownTrunk(resolution=resolution, channels=channels, base_dim=base_dim,
                                norm=norm)
        self.feature_dim = self.trunk.feature_dim
        self.output = nn.Linear(self.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the last layer: ``[B,C,R,R] -> [B, feature_dim]``."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,C,R,R]`` in ``[-1,1]`` -> ``[B]`` critic values."""
        return rearrange(self.output(self.trunk(x)), "b 1 -> b")


class Encoder(nn.Module):
    """izi_f encoder ``images -> z [B,latent_dim]`` (critic-like trunk, linear head).

    Args:
        latent_dim: size of ``z``.
        resolution: input side length, a power of two ``>= 8``.
        channels: image channels.
        base_dim: width ``d``.
        norm: normalisation in the residual blocks (``layer`` default; the reference code used
            batch norm, ``batch``).
        output: ``tanh`` (codes in ``(-1, 1)``, as in the f-AnoGAN paper) or ``linear``.
    """

    def __init__(self, *, latent_dim: int = 128, resolution: int = 64, channels: int = 3,
                 base_dim: int = 64, norm: Norm = "layer",
                 output: Literal["tanh", "linear"] = "tanh") -> None:
        super().__init__()
        if output not in ("tanh", "linear"):
            raise ValueError(f"output must be 'tanh' or 'linear', got {output!r}")
        self.trunk = _DownTrunk(resolution=resolution, channels=channels, base_dim=base_dim,
                                norm=norm)
        self.head = nn.Linear(self.trunk.feature_dim, latent_dim)
        self.bounded = output == "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,C,R,R]`` in ``[-1,1]`` -> ``[B, latent_dim]`` codes."""
        z = self.head(self.trunk(x))
        return torch.tanh(z) if self.bounded else z
