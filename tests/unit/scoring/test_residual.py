"""Residual maps, Gaussian smoothing, LPIPS maps and image scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.residual import image_score, lpips_map, pixel_residual, smooth


def test_pixel_residual_l1_l2() -> None:
    x = torch.zeros(2, 3, 4, 5)
    r = torch.zeros(2, 3, 4, 5)
    r[0, 0, 1, 2] = 0.6  # one channel differs: mean over 3 channels
    r[1, :, 0, 0] = -1.0
    l1 = pixel_residual(x, r, reduce="l1")
    assert l1.shape == (2, 4, 5) and (l1 >= 0).all()
    assert l1[0, 1, 2] == pytest.approx(0.2) and l1[1, 0, 0] == pytest.approx(1.0)
    assert l1.sum() == pytest.approx(1.2)
    l2 = pixel_residual(x, r, reduce="l2")
    assert l2[0, 1, 2] == pytest.approx(0.36 / 3)
    with pytest.raises(DataError, match="equal shape"):
        pixel_residual(x, r[:, :, :3])
    with pytest.raises(ConfigError):
        pixel_residual(x, r, reduce="l3")


def test_smooth_matches_scipy_gaussian_and_keeps_mass() -> None:
    m = torch.zeros(2, 16, 16)
    m[0, 8, 8] = 1.0
    m[1] = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    out = smooth(m, sigma=1.0)
    assert out.shape == m.shape
    ref = gaussian_filter(m[1].numpy().astype("float64"), sigma=1.0, mode="mirror", truncate=3.0)
    assert torch.allclose(out[1].double(), torch.from_numpy(ref), atol=1e-5)
    assert out[0].sum() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(smooth(m, 0.0), m)


class _FakeLPIPS(nn.Module):
    """Stand-in for lpips.LPIPS(spatial=True): half-resolution |x - y| map."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d((a - b).abs().mean(1, keepdim=True), 2)


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear resizing with half-pixel centres (the
    ``align_corners=False`` convention: source ``(i + 0.5) * n_in / n_out - 0.5``, clamped)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        i0 = int(np.floor(s))
        i1 = min(i0 + 1, n_in - 1)
        w[i, i0] += 1.0 - (s - i0)
        w[i, i1] += s - i0
    return w


def test_lpips_map_shape_and_resize() -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    out = lpips_map(x, r, _FakeLPIPS())
    assert out.shape == (3, 8, 8) and (out >= 0).all()
    # reference in numpy: the fake net's 2x2-mean half-resolution map, bilinearly upsampled
    d = np.abs(x.double().numpy() - r.double().numpy()).mean(1)  # [3, 8, 8]
    half = d.reshape(3, 4, 2, 4, 2).mean((2, 4))  # [3, 4, 4]
    w = _bilinear_1d(4, 8)
    ref = np.einsum("ih,bhw,jw->bij", w, half, w)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-6)
    assert out.mean() > 0.1  # |a - b| of independent uniforms in [-1, 1]: mean 2/3
    with pytest.raises(DataError, match="spatial=True"):
        lpips_map(x, r, lambda a, b: (a - b).abs().mean((1, 2, 3)))  # type: ignore[arg-type]


def test_lpips_map_with_real_lpips_module_random_weights() -> None:
    lpips = pytest.importorskip("lpips")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init linear heads: some distances come out negative
        net = lpips.LPIPS(net="alex", spatial=True, pretrained=False, pnet_rand=True,
                          verbose=False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = lpips_map(x, x.flip(-1), net)
        same = lpips_map(x, x, net)
        raw = net(x, x.flip(-1))  # [2,1,32,32]: already at image resolution
    assert out.shape == (2, 32, 32) and (out >= 0).all()
    assert (raw < 0).any() and (raw > 0).any()  # so the clamp below is exercised
    torch.testing.assert_close(out, raw[:, 0].clamp(min=0.0), rtol=0, atol=0)
    assert out.mean() > 0
    assert same.abs().max() < 1e-6


def test_image_score_reductions() -> None:
    m = torch.zeros(2, 10, 10)
    m[0, 0, 0] = 5.0
    m[1] = torch.arange(100.0).reshape(10, 10)
    assert torch.allclose(image_score(m, "mean"), torch.tensor([0.05, 49.5]))
    assert torch.allclose(image_score(m, reduce="max"), torch.tensor([5.0, 99.0]))
    assert torch.allclose(image_score(m, "topk", k_frac=0.01), torch.tensor([5.0, 99.0]))
    assert torch.allclose(image_score(m, "topk", k_frac=0.05), torch.tensor([1.0, 97.0]))
    with pytest.raises(ConfigError):
        image_score(m, "median")
