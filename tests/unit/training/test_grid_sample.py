"""The double-differentiable grid_sample: forward, first and second derivatives, R1 through ADA.

References: ``F.grid_sample`` for the forward; for derivatives, autograd through an explicit
sampling matrix ``S(grid)`` built with ``F.grid_sample`` from one-hot images (``y = S x`` is plain
linear algebra, so autograd differentiates it to any order on any PyTorch and device, and its
grid derivative needs only PyTorch's first-order kernel). Every test body runs on the CPU here and
on CUDA where one is present (the ``cuda`` cases are marked ``gpu``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from gen_ad.training import augment as augment_mod
from gen_ad.training.augment import AugmentSpec, augment
from gen_ad.training.grid_sample import grid_sample
from gen_ad.training.stylegan2 import r1_penalty

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
OPTIONS = list(itertools.product(["bilinear", "nearest", "bicubic"],
                                 ["zeros", "border", "reflection"], [False, True]))
ADA = ("bilinear", "reflection", False)


def _data(device: str, dtype: torch.dtype = torch.float32, b: int = 2, s: int = 5,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[b,3,s,s]`` image and a ``[b,4,6,2]`` grid reaching a little outside ``[-1,1]``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, s, s, generator=gen, dtype=torch.float64)
    grid = torch.rand(b, 4, 6, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    return x.to(device, dtype), grid.to(device, dtype)


def _reference(x: torch.Tensor, grid: torch.Tensor, opts: tuple) -> torch.Tensor:
    """``grid_sample`` as ``y[b,c,p] = sum_k S_b[k,p] x[b,c,k]`` with ``S`` from one-hot images."""
    mode, padding, align = opts
    b, _, h, w = x.shape
    basis = torch.eye(h * w, dtype=x.dtype, device=x.device).reshape(h * w, 1, h, w)
    mats = [F.grid_sample(basis, grid[i].expand(h * w, *grid.shape[1:]), mode=mode,
                          padding_mode=padding, align_corners=align) for i in range(b)]
    s = torch.stack(mats)  # [b, HW, 1, Ho, Wo]
    y = torch.einsum("bkpq,bck->bcpq", s[:, :, 0], rearrange(x, "b c h w -> b c (h w)"))
    return y


def _ours(x: torch.Tensor, grid: torch.Tensor, opts: tuple) -> torch.Tensor:
    mode, padding, align = opts
    return grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)


def _derivatives(fn, x: torch.Tensor, grid: torch.Tensor, opts: tuple) -> list[torch.Tensor]:
    """First (dL/dx, dL/dgrid) and second (dR/dx, dR/dgrid) derivatives, R = |w * dL/dx|^2."""
    x, grid = x.detach().requires_grad_(True), grid.detach().requires_grad_(True)
    y = fn(x, grid, opts)
    wy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    loss = (wy * y.square()).sum() + y.sum()  # nonlinear in y: dL/dx depends on x
    gx, ggrid = torch.autograd.grad(loss, [x, grid], create_graph=True)
    wx = torch.linspace(0.5, 2, gx.numel(), dtype=gx.dtype, device=gx.device).reshape(gx.shape)
    r = (wx * gx).square().sum()
    rx, rgrid = torch.autograd.grad(r, [x, grid])
    return [gx.detach(), ggrid.detach(), rx, rgrid]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_forward_equals_f_grid_sample(device: str, opts: tuple) -> None:
    x, grid = _data(device)
    mode, padding, align = opts
    want = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)
    assert torch.equal(_ours(x, grid, opts), want)  # the same kernel: bitwise
    # and the explicit-matrix reference agrees (float64), which validates it for the tests below
    x64, g64 = _data("cpu", torch.float64)
    torch.testing.assert_close(_reference(x64, g64, opts), F.grid_sample(
        x64, g64, mode=mode, padding_mode=padding, align_corners=align))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_first_and_second_derivatives_equal_autograd(device: str, opts: tuple) -> None:
    x, grid = _data(device)
    got = _derivatives(_ours, x, grid, opts)
    want = _derivatives(_reference, x, grid, opts)
    for name, a, b in zip(["dL/dx", "dL/dgrid", "dR/dx", "dR/dgrid"], got, want, strict=True):
        # float32 rounding only: both sides sum the same products in different orders (CUDA's
        # backward kernels accumulate with atomics); the grid terms sum ~50 products of size ~10
        scale = float(b.abs().max()) + 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck_in_float64(device: str) -> None:
    x, grid = _data(device, torch.float64, b=1, s=4)
    x.requires_grad_(True)
    for opts in [ADA, ("bilinear", "zeros", True), ("bicubic", "border", False)]:
        def f(a: torch.Tensor, g: torch.Tensor, o: tuple = opts) -> torch.Tensor:
            return _ours(a, g, o)

        # first order in both the image and the grid; second order in the image (the grid is a
        # constant, as in ADA), including the mixed output-gradient terms gradgradcheck perturbs
        assert torch.autograd.gradcheck(f, (x, grid.clone().requires_grad_(True)))
        assert torch.autograd.gradgradcheck(lambda a, o=opts: _ours(a, grid, o), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_samples_in_float32_and_stays_double_differentiable(device: str) -> None:
    x, grid = _data(device)
    x = x.detach().requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = grid_sample(x.bfloat16(), grid, padding_mode="reflection")
        assert y.dtype == torch.float32  # autocast's own policy for grid_sample
        (g,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), [x])
    assert g.dtype == h.dtype == torch.float32 and h.abs().sum() > 0


def _node_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


def test_r1_graph_never_needs_pytorchs_missing_cuda_derivative() -> None:
    # On CUDA, PyTorch cannot differentiate its grid_sample backward kernel. The graph of an R1
    # gradient through ADA must therefore contain no PyTorch grid-sampler node (checked on CPU,
    # where the graph has the same shape), only this module's functions.
    x = torch.rand(2, 3, 8, 8).requires_grad_(True)
    y = augment(x, 1.0, torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    names = _node_names(g)
    assert not any(n.startswith("GridSampler") for n in names), names
    assert any("GridSample" in n for n in names), names


def test_bad_options_are_clear_errors() -> None:
    x, grid = _data("cpu")
    with pytest.raises(ValueError, match="padding_mode"):
        grid_sample(x, grid, padding_mode="wrap")
    with pytest.raises(ValueError, match="mode"):
        grid_sample(x, grid, mode="area")
    with pytest.raises(ValueError, match=r"\[B,Ho,Wo,2\]"):
        grid_sample(x, grid[..., :1])


def _tiny_d(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LeakyReLU(0.2),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 1)).to(device)


def _r1_grads(device: str, sampler) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R1 through ADA (every transform, p = 1) of a tiny D, with ``sampler`` as grid_sample."""
    d = _tiny_d(device)
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(2)
    mp = pytest.MonkeyPatch()
    mp.setattr(augment_mod, "grid_sample", sampler)
    try:
        pen, _ = r1_penalty(d, real, lambda v: augment(v, 1.0, gen, AugmentSpec()))
    finally:
        mp.undo()
    pen.sum().backward()
    return pen.detach(), [p.grad for p in d.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_r1_through_augmentation_equals_the_explicit_reference(device: str) -> None:
    def reference(x: torch.Tensor, grid: torch.Tensor, **kw) -> torch.Tensor:
        return _reference(x, grid, (kw["mode"], kw["padding_mode"], kw["align_corners"]))

    pen, grads = _r1_grads(device, grid_sample)
    want_pen, want_grads = _r1_grads(device, reference)
    assert pen.gt(0).all()
    # float32 rounding: the reference sums the same bilinear products through a dense matrix
    torch.testing.assert_close(pen, want_pen, rtol=1e-5, atol=1e-6)
    # biases do not enter grad_x D (D is piecewise linear): their gradients are zero or None
    assert [a is None for a in grads] == [b is None for b in want_grads]
    assert all(a.abs().sum() > 0 for a in grads if a is not None and a.ndim > 1)
    for a, b in zip(grads, want_grads, strict=True):
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (float(b.abs().max()) + 1))
