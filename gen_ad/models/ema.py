"""Exponential moving average of a network's weights (no optimiser, no IO)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) to hold its EMA."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    Args:
        ema: the EMA copy (same architecture as ``model``).
        model: the trained network (unwrapped from DDP).
        decay: EMA decay in ``[0, 1)``.
    """
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
    if pairs:  # one multi-tensor kernel per dtype/device group instead of one per parameter
        torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs],
                             1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
