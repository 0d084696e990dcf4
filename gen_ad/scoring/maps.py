"""Anomaly-map post-processing (erosion, dilation) and display helpers (colour map, overlays, PNG).

Morphology is batched torch code on ``[B,H,W]`` maps. Display helpers work at the file edge in
numpy: they take images as ``[B,3,H,W]`` tensors in ``[-1,1]`` or ``[H,W,3]`` uint8 arrays and
return uint8 RGB. The colour map is a jet-like ramp computed in numpy (no matplotlib needed).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from gen_ad.errors import ConfigError, DataError
from gen_ad.utils.io import atomic_path


def _check_k(k: int) -> None:
    if k < 1 or k % 2 == 0:
        raise ConfigError(f"structuring element size must be a positive odd integer, got {k}")


def _check_maps(maps: torch.Tensor) -> None:
    if maps.ndim != 3:
        raise DataError(f"maps must be [B,H,W], got {tuple(maps.shape)}")


def erode(maps: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Grey erosion (minimum over a ``k x k`` window); pixels outside the image are ignored.

    Equals ``scipy.ndimage.grey_erosion(m, size=(k, k))`` (its default ``reflect`` border) per map.

    Args:
        maps: ``[B,H,W]`` float maps.
        k: odd window size.
    Returns:
        ``[B,H,W]`` eroded maps.
    """
    _check_maps(maps)
    _check_k(k)
    x = rearrange(maps, "b h w -> b 1 h w")
    return rearrange(-F.max_pool2d(-x, k, stride=1, padding=k // 2), "b 1 h w -> b h w")


def dilate(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Dilation (maximum over a ``k x k`` window) of boolean masks or float maps.

    Args:
        mask: ``[B,H,W]`` bool mask (e.g. AutoDDPM's thresholded map) or float map.
        k: odd window size.
    Returns:
        ``[B,H,W]`` dilated mask, same dtype as the input.
    """
    _check_maps(mask)
    _check_k(k)
    x = rearrange(mask, "b h w -> b 1 h w")
    y = F.max_pool2d(x.float() if mask.dtype == torch.bool else x, k, stride=1, padding=k // 2)
    y = rearrange(y, "b 1 h w -> b h w")
    return y > 0.5 if mask.dtype == torch.bool else y


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def normalize(maps: Any, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale maps to ``[0,1]`` for display.

    Args:
        maps: ``[..., H, W]`` maps (tensor or array).
        vmin, vmax: fixed range (use the same values for maps that are compared side by side);
            default: the min/max of ``maps`` (over everything passed in).
    Returns:
        float32 array in ``[0,1]``; a constant map becomes zeros.
    """
    m = _np(maps).astype(np.float32)
    lo = float(np.nanmin(m)) if vmin is None else float(vmin)
    hi = float(np.nanmax(m)) if vmax is None else float(vmax)
    if not hi > lo:
        return np.zeros_like(m)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0)


normalise = normalize  # British spelling alias


def jet(v: Any) -> np.ndarray:
    """Jet-like colour map (blue → cyan → yellow → red).

    Args:
        v: ``[...]`` values in ``[0,1]`` (clipped; NaN becomes black).
    Returns:
        ``[..., 3]`` uint8 RGB.
    """
    x = np.clip(_np(v).astype(np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], -1)
    rgb = np.nan_to_num(rgb, nan=0.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def to_uint8_images(x: Any) -> np.ndarray:
    """Images ``[B,3,H,W]`` in ``[-1,1]`` (tensor or array) → ``[B,H,W,3]`` uint8."""
    a = _np(x)
    if a.ndim != 4 or a.shape[1] != 3:
        raise DataError(f"images must be [B,3,H,W], got {a.shape}")
    a = rearrange(a, "b c h w -> b h w c")
    return np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def overlay(image: np.ndarray, map01: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured map over a uint8 RGB image.

    Args:
        image: ``[..., H, W, 3]`` uint8.
        map01: ``[..., H, W]`` map in ``[0,1]`` (see :func:`normalize`); NaN cells keep the image.
        alpha: weight of the colour map.
    Returns:
        ``[..., H, W, 3]`` uint8.
    """
    img = np.asarray(image)
    m = _np(map01)
    if img.dtype != np.uint8 or img.shape[-1] != 3 or img.shape[:-1] != m.shape:
        raise DataError(f"overlay needs a uint8 [...,H,W,3] image matching the map [...,H,W]; got "
                        f"{img.shape} {img.dtype} and {m.shape}")
    a = np.where(np.isnan(m), 0.0, float(alpha))[..., None]
    out = (1.0 - a) * img.astype(np.float32) + a * jet(m).astype(np.float32)
    return np.round(out).astype(np.uint8)


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Atomically save an ``[H,W,3]`` (or ``[H,W]``) uint8 array as PNG."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise DataError(f"PNG data must be uint8, got {arr.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def save_map_png(path: str | os.PathLike[str], map_: Any, image: Any = None, alpha: float = 0.5,
                 vmin: float | None = None, vmax: float | None = None) -> None:
    """Save one map as a colour PNG, optionally overlaid on its image.

    Args:
        path: output ``.png`` path (written atomically).
        map_: ``[H,W]`` map.
        image: optional ``[3,H,W]`` image in ``[-1,1]`` or ``[H,W,3]`` uint8.
        alpha: overlay weight.
        vmin, vmax: display range (default: the map's own min/max).
    """
    m = normalize(map_, vmin, vmax)
    if m.ndim != 2:
        raise DataError(f"map must be [H,W], got {m.shape}")
    if image is None:
        save_png(path, jet(m))
        return
    img = _np(image)
    if img.dtype != np.uint8:
        img = to_uint8_images(img[None])[0]
    save_png(path, overlay(img, m, alpha))
