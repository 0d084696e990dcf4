"""FIR up/down-sampling (``upfirdn2d``) and resampling convolutions in plain PyTorch.

StyleGAN2 low-pass filters every resampling with the separable ``[1,3,3,1]`` FIR filter. The
reference code compiles a CUDA kernel for this; here it is a zero-insertion reshape, a pad and two
depthwise ``conv2d`` calls (one per axis), so it runs anywhere and is double-differentiable (R1
and path-length regularisation need second derivatives).
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """The 1-D filter ``[K]`` normalised to unit sum (its outer product is the 2-D filter)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    if f.ndim != 1 or f.numel() < 1:
        raise ValueError(f"filter taps must be a non-empty 1-D sequence, got {taps!r}")
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, *, up: int = 1, down: int = 1,
              pad: tuple[int, int, int, int] = (0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with the separable FIR ``f``, then decimate.

    Args:
        x: ``[B,C,H,W]``.
        f: 1-D filter ``[K]`` (see :func:`setup_filter`); the 2-D filter is ``outer(f, f)``.
        up: integer upsampling factor.
        down: integer downsampling factor.
        pad: ``(left, right, top, bottom)`` padding of the upsampled image (negative crops).
        gain: overall gain of the 2-D filter (``up**2`` keeps the mean when upsampling).
    Returns:
        ``[B,C,H',W']`` with ``H' = (H*up + top + bottom - K + 1) // down`` (rounded up).
    """
    c = x.shape[1]
    if up > 1:
        x = einops.rearrange(x, "b c h w -> b c h 1 w 1")
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])  # zeros after each pixel, along both axes
        x = einops.rearrange(x, "b c h u w v -> b c (h u) (w v)")
    x = F.pad(x, list(pad))
    k = (f.to(device=x.device, dtype=x.dtype) * gain ** 0.5).flip(0)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR upsampling ``[B,C,H,W] -> [B,C,up*H,up*W]`` (mean preserving)."""
    k = f.numel()
    p0, p1 = (k + up - 1) // 2, (k - up) // 2
    return upfirdn2d(x, f, up=up, pad=(p0, p1, p0, p1), gain=up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """FIR downsampling ``[B,C,H,W] -> [B,C,H/down,W/down]`` (mean preserving)."""
    k = f.numel()
    p0, p1 = (k - down + 1) // 2, (k - down) // 2
    return upfirdn2d(x, f, down=down, pad=(p0, p1, p0, p1))


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, *, f: torch.Tensor | None = None,
                    up: bool = False, down: bool = False, groups: int = 1) -> torch.Tensor:
    """Same-padded ``conv2d`` with optional FIR 2x upsampling before / downsampling after it.

    Upsampling runs as a stride-2 transposed convolution followed by the FIR filter (4x cheaper
    than convolving the upsampled image); downsampling filters first and then convolves with
    stride 2, as in the reference implementation.

    Args:
        x: ``[B, groups*I, H, W]``.
        w: ``[groups*O, I, k, k]`` (odd ``k``).
        f: 1-D FIR filter, required when ``up`` or ``down``.
        up / down: resample by 2 (at most one of them).
        groups: convolution groups (the batch in the fused modulated convolution).
    Returns:
        ``[B, groups*O, H', W']`` with ``H' = 2H``, ``H/2`` or ``H``.
    """
    k = w.shape[-1]
    padding = k // 2
    if up and down:
        raise ValueError("conv2d_resample: choose up or down, not both")
    if not up and not down:
        return F.conv2d(x, w, padding=padding, groups=groups)
    assert f is not None, "a FIR filter is needed for resampling"
    fw = f.numel()
    if down:
        p0, p1 = padding + (fw - 1) // 2, padding + (fw - 2) // 2
        if k == 1:
            return F.conv2d(upfirdn2d(x, f, down=2, pad=(p0, p1, p0, p1)), w, groups=groups)
        return F.conv2d(upfirdn2d(x, f, pad=(p0, p1, p0, p1)), w, stride=2, groups=groups)
    wt = einops.rearrange(w, "(g o) i kh kw -> (g i) o kh kw", g=groups)
    x = F.conv_transpose2d(x, wt, stride=2, groups=groups)
    p0 = padding + (fw + 1) // 2 - (k - 1)
    p1 = padding + (fw - 2) // 2 - (k - 2)
    return upfirdn2d(x, f, pad=(p0, p1, p0, p1), gain=4.0)
