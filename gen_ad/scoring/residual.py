"""Residual anomaly maps between images and their reconstructions, and image scores from maps.

All functions are batched tensor code on the input's device: images ``[B,3,H,W]`` in ``[-1,1]``,
maps ``[B,H,W]`` ``>= 0`` at image resolution, scores ``[B]``.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gen_ad.errors import ConfigError, DataError


def _check_pair(x: torch.Tensor, recon: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != recon.shape:
        raise DataError(f"image and reconstruction must both be [B,C,H,W] of equal shape, got "
                        f"{tuple(x.shape)} and {tuple(recon.shape)}")


def pixel_residual(x: torch.Tensor, recon: torch.Tensor, reduce: str = "l1") -> torch.Tensor:
    """Per-pixel residual averaged over channels.

    Args:
        x: ``[B,C,H,W]`` images.
        recon: ``[B,C,H,W]`` reconstructions.
        reduce: ``"l1"`` (mean ``|x - recon|``) or ``"l2"`` (mean squared error).
    Returns:
        ``[B,H,W]`` map ``>= 0``.
    """
    mode = reduce
    _check_pair(x, recon)
    diff = x - recon
    if mode == "l1":
        d = diff.abs()
    elif mode == "l2":
        d = diff.square()
    else:
        raise ConfigError(f"unknown residual reduce '{mode}' (choose l1 or l2)")
    return einops.reduce(d, "b c h w -> b h w", "mean")


def gaussian_kernel1d(sigma: float, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(3 sigma)``; shape ``[2r+1]``."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of maps (separable conv, reflect padding); ``sigma <= 0`` is a no-op.

    Args:
        maps: ``[B,H,W]`` maps.
        sigma: standard deviation in pixels.
    Returns:
        ``[B,H,W]`` smoothed maps (same dtype and device).
    """
    if maps.ndim != 3:
        raise DataError(f"maps must be [B,H,W], got {tuple(maps.shape)}")
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device, maps.dtype if maps.is_floating_point()
                          else torch.float32)
    r = k.numel() // 2
    h, w = maps.shape[-2:]
    if r >= h or r >= w:
        raise DataError(f"sigma {sigma} too large for {h}x{w} maps (kernel radius {r})")
    y = rearrange(maps.to(k.dtype), "b h w -> b 1 h w")
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), rearrange(k, "k -> 1 1 1 k"))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), rearrange(k, "k -> 1 1 k 1"))
    return rearrange(y, "b 1 h w -> b h w")


def lpips_map(x: torch.Tensor, recon: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """Spatial LPIPS distance map.

    Args:
        x: ``[B,3,H,W]`` images in ``[-1,1]``.
        recon: ``[B,3,H,W]`` reconstructions in ``[-1,1]``.
        net: an ``lpips.LPIPS(spatial=True)`` module (or any module mapping two ``[-1,1]`` images
            to a ``[B,1,H,W]`` distance map) on the same device.
    Returns:
        ``[B,H,W]`` map ``>= 0`` at image resolution (bilinearly resized if the net returns
        another size).
    """
    _check_pair(x, recon)
    d = net(x, recon)
    if d.ndim != 4 or d.shape[1] != 1:
        raise DataError(f"LPIPS net must return [B,1,H,W] (build it with spatial=True), got "
                        f"{tuple(d.shape)}")
    if d.shape[-2:] != x.shape[-2:]:
        d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return rearrange(d, "b 1 h w -> b h w").clamp_min(0.0)


def image_score(maps: torch.Tensor, reduce: str = "mean", k_frac: float = 0.01) -> torch.Tensor:
    """Image score from a map.

    Args:
        maps: ``[B,H,W]`` maps.
        reduce: ``"mean"``, ``"max"`` or ``"topk"`` (mean of the top ``k_frac`` pixels, at least
            one).
        k_frac: fraction of pixels for ``topk``, in ``(0, 1]``.
    Returns:
        ``[B]`` scores.
    """
    mode = reduce
    if maps.ndim != 3:
        raise DataError(f"maps must be [B,H,W], got {tuple(maps.shape)}")
    flat = rearrange(maps, "b h w -> b (h w)")
    if mode == "mean":
        return flat.mean(dim=1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "topk":
        if not 0.0 < k_frac <= 1.0:
            raise ConfigError(f"k_frac must be in (0, 1], got {k_frac}")
        k = max(1, int(math.ceil(k_frac * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ConfigError(f"unknown image score reduce '{mode}' (choose mean, max or topk)")
