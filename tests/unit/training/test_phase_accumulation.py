"""StepContext.phase with gradient accumulation: ``grad_accum`` micro-batches give the one-batch
step (weights and logs), and clipping acts on the accumulated gradient.

Reference: a hand-written SGD step ``w <- w - lr * g`` on the full-batch gradient ``g`` of the
mean loss, clipped as ``g * min(1, c / |g|)`` (the global-norm clipping of
``torch.nn.utils.clip_grad_norm_``), with ``|g|`` the logged ``grad_norm``.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from gen_ad.training.family import StepContext

LR = 0.5


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def _net() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def _phase(accum: int, clip: float = 0.0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """One ``ctx.phase`` of SGD(lr=0.5) on the mean squared error of a Linear model."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, y = _data()
    batch = torch.cat([x, y], dim=1)  # the phase splits one tensor: targets ride along
    ctx = StepContext(Accelerator(cpu=True), {"net": net}, {"net": opt}, {}, {}, 0, 0.0,
                      torch.Generator().manual_seed(0), grad_accum=accum)

    def loss_fn(chunk: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (net(chunk[:, :4]) - chunk[:, 4:]).square().mean()
        return loss, {"loss": loss}

    ctx.phase("net", net, batch, loss_fn, clip_grad=clip)
    return [p.detach().clone() for p in net.parameters()], {k: float(v)
                                                           for k, v in ctx.logs.items()}


def _reference(clip: float = 0.0) -> tuple[list[torch.Tensor], float, float]:
    """The full-batch step by hand: weights after it, the loss before it, and |g|."""
    net = _net()
    x, y = _data()
    w, b = net.weight.detach(), net.bias.detach()
    r = x @ w.t() + b - y  # residuals [8, 1]
    loss = float(r.square().mean())
    gw = 2 * (r * x).mean(dim=0, keepdim=True)  # d/dw mean (xw + b - y)^2
    gb = 2 * r.mean(dim=0)
    norm = float(torch.cat([gw.flatten(), gb]).norm())
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0  # clip_grad_norm_'s 1e-6
    return [w - LR * scale * gw, b - LR * scale * gb], loss, norm


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_step_is_the_full_batch_step(accum: int) -> None:
    weights, logs = _phase(accum)
    ref_w, ref_loss, _ = _reference()
    for got, want in zip(weights, ref_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert logs["loss"] == pytest.approx(ref_loss, rel=1e-5)  # mean over micro-batches
    assert set(logs) == {"loss"}  # no clipping, no grad_norm


@pytest.mark.parametrize("accum", [1, 4])
def test_clipping_acts_on_the_accumulated_gradient(accum: int) -> None:
    _, _, norm = _reference()
    clip = norm / 3  # active: the step is a third of the unclipped one
    weights, logs = _phase(accum, clip=clip)
    ref_w, ref_loss, _ = _reference(clip)
    for got, want in zip(weights, ref_w, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert logs["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    assert logs["loss"] == pytest.approx(ref_loss, rel=1e-5)
