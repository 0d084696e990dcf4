"""``grid_sample`` whose backward is itself differentiable w.r.t. the input, on every device.

R1 regularisation through ADA's geometric augmentation needs ``d/dx`` of a gradient that passed
through ``grid_sample``: a second derivative w.r.t. the sampled image. PyTorch's CUDA kernels have
no derivative for ``aten::grid_sampler_2d_backward`` ("derivative ... is not implemented"), so
StyleGAN2 + ADA crashed at its first lazy R1 step on a GPU. The idea of a custom op whose backward
is an autograd function in its own right comes from NVlabs' stylegan2-ada-pytorch (its
``grid_sample_gradfix``); this is an independent implementation built on the math below.

For a fixed grid, sampling is linear in the input: ``y = S(grid) x``. Hence

* ``dL/dx = S(grid)^T g`` for the output gradient ``g`` (PyTorch's own backward kernel);
* that gradient is linear in ``g`` and does not depend on ``x``: its derivative w.r.t. ``g`` in a
  direction ``v`` is ``S(grid) v = grid_sample(v, grid)``, and w.r.t. ``x`` it is exactly zero;
* its derivative w.r.t. the grid is ``d/dgrid <g, S(grid) v>``, the grid gradient of
  ``grid_sample(v, grid)`` with output gradient ``g`` (first order in the grid, so exact).

The grid gradient itself (``dL/dgrid``) is PyTorch's first-order kernel, recorded as is: whether
it can be differentiated again is PyTorch's business (on CUDA it cannot). ADA never needs that: its
grid is built from random matrices that need no gradient.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

# Integer codes of ``aten::grid_sampler_2d_backward`` (see torch.nn.functional.grid_sample).
_MODES = MappingProxyType({"bilinear": 0, "nearest": 1, "bicubic": 2})
_PADDINGS = MappingProxyType({"zeros": 0, "border": 1, "reflection": 2})


def _check(mode: str, padding_mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"grid_sample mode must be one of {sorted(_MODES)}, got {mode!r}")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"grid_sample padding_mode must be one of {sorted(_PADDINGS)}, "
                         f"got {padding_mode!r}")


def _no_autocast(t: torch.Tensor) -> Any:
    """A context that switches autocast off for ``t``'s device (the op runs in its given dtype)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _sampler_backward(g: torch.Tensor, x: torch.Tensor, grid: torch.Tensor, opts: tuple,
                      mask: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PyTorch's first-order kernel: ``(dL/dx, dL/dgrid)`` for output gradient ``g``."""
    mode, padding, align = opts
    gx, ggrid = torch.ops.aten.grid_sampler_2d_backward(
        g, x, grid, _MODES[mode], _PADDINGS[padding], align, list(mask))
    return (gx if mask[0] else None), (ggrid if mask[1] else None)


class _GridSample(torch.autograd.Function):
    """``y = grid_sample(x, grid)``; backward through ``_GridSampleBackward`` (differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: torch.Tensor, opts: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, grid)
        ctx.opts = opts
        mode, padding, align = opts
        with _no_autocast(x):
            return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, grid = ctx.saved_tensors
        need_x, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = ggrid = None
        if need_x:
            gx = _GridSampleInputBackward.apply(g, grid, x, ctx.opts)
        if need_grid:
            # First order only: PyTorch's op, recorded by autograd; its own derivative is
            # unimplemented on CUDA, so a second derivative through dL/dgrid raises there.
            with _no_autocast(x):
                _, ggrid = _sampler_backward(g, x, grid, ctx.opts, (False, True))
        return gx, ggrid, None


class _GridSampleInputBackward(torch.autograd.Function):
    """``dL/dx = S(grid)^T g``, differentiable w.r.t. ``g`` (any order) and ``grid`` (first)."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, grid: torch.Tensor, x: torch.Tensor,
                opts: tuple) -> torch.Tensor:
        ctx.save_for_backward(g, grid)
        ctx.opts = opts
        with _no_autocast(x):
            gx, _ = _sampler_backward(g, x, grid, opts, (True, False))
        return gx

    @staticmethod
    def backward(ctx: Any, v: torch.Tensor) -> tuple:
        g, grid = ctx.saved_tensors
        dg = dgrid = None
        if ctx.needs_input_grad[0]:
            # d<S^T g, v>/dg = S v: the forward sampling of v (differentiable again).
            dg = _GridSample.apply(v, grid, ctx.opts)
        if ctx.needs_input_grad[1]:
            # d<S(grid)^T g, v>/dgrid = d<g, S(grid) v>/dgrid: the grid gradient of sampling v.
            with _no_autocast(v):
                _, dgrid = _sampler_backward(g, v, grid, ctx.opts, (False, True))
        # x enters dL/dx not at all (sampling is linear in x): its derivative is exactly zero.
        return dg, dgrid, None, None


def grid_sample(x: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """``F.grid_sample`` for 2-D images whose gradient w.r.t. ``x`` can be differentiated again.

    Args:
        x: ``[B,C,H,W]`` input (any range).
        grid: ``[B,Ho,Wo,2]`` sampling positions, ``(x, y)`` in ``[-1,1]`` (outside = padding).
        mode / padding_mode / align_corners: as in ``torch.nn.functional.grid_sample``.
    Returns:
        ``[B,C,Ho,Wo]``, equal to ``F.grid_sample`` (same kernel). Under autocast both tensors are
        sampled in float32 (autocast's own policy for ``grid_sample``).
    """
    _check(mode, padding_mode)
    if x.ndim != 4 or grid.ndim != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid_sample needs x [B,C,H,W] and grid [B,Ho,Wo,2], got "
                         f"{tuple(x.shape)} and {tuple(grid.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.float32
    else:
        dtype = torch.promote_types(x.dtype, grid.dtype)
    return _GridSample.apply(x.to(dtype), grid.to(dtype), (mode, padding_mode, bool(align_corners)))
