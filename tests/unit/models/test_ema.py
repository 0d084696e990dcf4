"""EMA of weights: ``ema <- decay * ema + (1 - decay) * model`` for every parameter (any dtype),
buffers copied, the trained model untouched."""

from __future__ import annotations

import torch
from torch import nn

from gen_ad.models.ema import ema_copy, ema_update


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 6, 6))
    net[3].half()  # a low-precision layer, as StyleGAN2's fp16 blocks
    return net


def test_ema_update_equals_the_formula_per_parameter() -> None:
    model = _net()
    ema = ema_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_update(ema, model, decay=0.9)
    for name, p in ema.named_parameters():
        m = dict(model.named_parameters())[name].detach()
        want = before[name] + (m.to(before[name].dtype) - before[name]) * 0.1
        assert p.dtype == before[name].dtype and not p.requires_grad
        tol = 1e-3 if p.dtype == torch.float16 else 1e-6  # half-precision rounding of the lerp
        torch.testing.assert_close(p, want, rtol=tol, atol=tol)
    for name, p in model.named_parameters():
        assert torch.equal(p, model_before[name])
    assert torch.equal(ema[1].running_mean, torch.full((4,), 3.0))
    assert int(ema[1].num_batches_tracked) == 7
