"""ADA: exact integer transforms, seeded determinism, double backward, the p controller."""

from __future__ import annotations

import math

import pytest
import torch

from gen_ad.training.augment import SYM6, AdaptiveAugment, AugmentSpec, _resample, augment

NONE = {k: 0.0 for k in AugmentSpec().__dict__}


def _img(b: int = 6, s: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_p_zero_is_identity_and_draws_are_seeded() -> None:
    x = _img()
    assert augment(x, 0.0, torch.Generator().manual_seed(0)) is x
    a = augment(x, 0.7, torch.Generator().manual_seed(3))
    b = augment(x, 0.7, torch.Generator().manual_seed(3))
    c = augment(x, 0.7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and torch.isfinite(a).all()


def test_integer_geometric_transforms_are_exact_pixel_permutations() -> None:
    x = _img(16)
    spec = AugmentSpec(**{**NONE, "xflip": 1.0, "rotate90": 1.0, "xint": 1.0})
    y = augment(x, 1.0, torch.Generator().manual_seed(1), spec)
    # every output is a flip/rotation/shift of its input: same multiset of pixel values when the
    # shift is zero, and in any case every output value is (up to float error) an input value
    for i in range(x.shape[0]):
        d = (y[i].reshape(3, -1, 1) - x[i].reshape(3, 1, -1)).abs().amin(dim=2)
        assert d.max() < 1e-5
    flips = AugmentSpec(**{**NONE, "xflip": 1.0})
    y = augment(x, 1.0, torch.Generator().manual_seed(2), flips)
    same = (y - x).abs().amax(dim=[1, 2, 3]) < 1e-5
    flipped = (y - x.flip(3)).abs().amax(dim=[1, 2, 3]) < 1e-5
    assert bool((same | flipped).all()) and bool(flipped.any()) and bool(same.any())


def test_colour_transforms_brightness_only_shift_every_channel_equally() -> None:
    x = _img()
    spec = AugmentSpec(**{**NONE, "brightness": 1.0})
    y = augment(x, 1.0, torch.Generator().manual_seed(0), spec)
    shift = (y - x).reshape(x.shape[0], -1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    assert shift[:, 0].abs().min() > 0


def test_second_order_gradients_flow_through_augmentation() -> None:
    x = _img(4).requires_grad_(True)
    w = torch.randn(3, 3, 3, 3, requires_grad=True)
    y = augment(x, 1.0, torch.Generator().manual_seed(0))
    out = torch.nn.functional.conv2d(y, w).square().sum()
    (g,) = torch.autograd.grad(out, [x], create_graph=True)
    g.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_controller_moves_p_at_the_configured_speed_and_round_trips() -> None:
    ada = AdaptiveAugment(target=0.6, interval=4, speed_kimg=500)
    for step in range(4):
        ada.accumulate(real_signs_sum=32.0, n=32)  # r_t = 1 > target: overfitting
        changed = ada.maybe_adjust(step, batch_size=32)
        assert changed == (step == 3)
    assert abs(ada.p - 32 * 4 / 500_000) < 1e-12 and ada.rt == 1.0
    ada.accumulate(-32.0, 32)
    for step in range(4, 8):
        ada.maybe_adjust(step, 32)
    assert ada.p == 0.0  # moved back down, clamped at 0
    ada.p = 0.3
    ada.accumulate(5.0, 8)
    other = AdaptiveAugment()
    other.load_state_dict(ada.state_dict())
    assert other.state_dict() == ada.state_dict()


def _waves(th: float, s: float, n: int = 64) -> torch.Tensor:
    """A band-limited pattern rotated by ``th`` and zoomed by ``s``, evaluated analytically."""
    ys = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    gy, gx = torch.meshgrid(ys, ys, indexing="ij")
    c, si = math.cos(th), math.sin(th)
    u, v = (c * gx - si * gy) * s, (si * gx + c * gy) * s
    out = sum(torch.cos(math.pi * (a * u + b * v) + ph)
              for a, b, ph in ((3, 1, 0.2), (5, -4, 1.0), (9, 7, 2.0)))
    return out[None, None].repeat(1, 3, 1, 1)


def test_antialiased_resampling() -> None:
    """The symlet-6 pair alone is the identity; rotations and zooms of a band-limited pattern
    come out closer to the analytic answer than direct bilinear sampling (inside a disc whose
    sources stay in the image)."""
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert float(h.sum()) == pytest.approx(math.sqrt(2)) and float(h @ h) == pytest.approx(1)
    for k in range(1, 6):  # orthonormal: even autocorrelation lags vanish
        assert float(h[:-2 * k] @ h[2 * k:]) == pytest.approx(0.0, abs=1e-10)
    x = _waves(0.0, 1.0)
    eye = torch.eye(3, dtype=torch.float64)[None]
    torch.testing.assert_close(_resample(x, eye, antialias=True), x, atol=2e-6, rtol=0)
    ys = (torch.arange(64, dtype=torch.float64) + 0.5) / 32 - 1
    gy, gx = torch.meshgrid(ys, ys, indexing="ij")
    disc = gx ** 2 + gy ** 2 < 0.55 ** 2
    for th, s in ((0.3, 1.0), (1.0, 1.0), (2.5, 1.0), (0.0, 0.7), (0.0, 1.4)):
        c, si = math.cos(th), math.sin(th)
        m = torch.tensor([[[c * s, -si * s, 0.0], [si * s, c * s, 0.0], [0.0, 0.0, 1.0]]],
                         dtype=torch.float64)
        want = _waves(th, s)
        errs = [float((_resample(x, m, antialias=aa) - want)[..., disc].abs().max())
                for aa in (False, True)]
        assert errs[1] < 0.16 and errs[1] < errs[0], (th, s, errs)
