"""f-AnoGAN networks: shapes, ranges, per-sample critic, latent prior, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gen_ad.models.wgan import Critic, Encoder, Generator, ResBlock, sample_latent


@pytest.mark.parametrize("res", [64, 128])
def test_shapes_and_ranges(res: int) -> None:
    torch.manual_seed(0)
    G = Generator(latent_dim=128, resolution=res, channels=3, base_dim=4)
    D = Critic(resolution=res, channels=3, base_dim=4)
    E = Encoder(latent_dim=128, resolution=res, channels=3, base_dim=4)
    z = torch.randn(3, 128) * 3
    x = G(z)
    assert x.shape == (3, 3, res, res)
    assert x.abs().max() <= 1.0
    assert D(x).shape == (3,)
    # 4x4 x 8d features, as in the reference critic (d=4 -> 512)
    assert D.features(x).shape == (3, D.feature_dim) and D.feature_dim == 16 * 8 * 4
    zx = E(x * 5)
    assert zx.shape == (3, 128)
    assert zx.abs().max() < 1.0
    lin = Encoder(latent_dim=7, resolution=res, base_dim=4, output="linear")
    assert lin(x).shape == (3, 7)


def test_critic_is_per_sample_and_has_no_batchnorm() -> None:
    """WGAN-GP needs a critic without batch coupling: D(x)_i depends on x_i only."""
    torch.manual_seed(0)
    D = Critic(resolution=16, base_dim=4).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    x = torch.randn(4, 3, 16, 16)
    full = D(x)
    single = torch.cat([D(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-6)
    assert torch.equal(D.output(D.features(x)).squeeze(1), full)


def test_generator_is_deterministic_in_eval() -> None:
    torch.manual_seed(0)
    G = Generator(latent_dim=16, resolution=16, base_dim=4)
    G.train()
    G(torch.randn(8, 16))  # update BN statistics
    G.eval()
    z = torch.randn(4, 16)
    torch.testing.assert_close(G(z)[:2], G(z[:2]))


def test_resblock_resampling() -> None:
    x = torch.randn(2, 6, 8, 8)
    up = ResBlock(in_ch=6, out_ch=4, resample="up", norm="batch")
    down = ResBlock(in_ch=6, out_ch=10, resample="down", norm="layer")
    assert up(x).shape == (2, 4, 16, 16)
    assert down(x).shape == (2, 10, 4, 4)
    with pytest.raises(ValueError, match="resample"):
        ResBlock(in_ch=6, out_ch=4, resample="same", norm="none")  # type: ignore[arg-type]


@pytest.mark.parametrize("res", [0, 4, 48, 100])
def test_bad_resolution(res: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Generator(resolution=res, base_dim=4)
    with pytest.raises(ValueError, match="power of two"):
        Critic(resolution=res, base_dim=4)


def test_bad_norm_and_output() -> None:
    with pytest.raises(ValueError, match="batch norm"):
        Critic(resolution=16, base_dim=4, norm="batch")
    with pytest.raises(ValueError, match="output"):
        Encoder(resolution=16, base_dim=4, output="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm"):
        Encoder(resolution=16, base_dim=4, norm="instance")  # type: ignore[arg-type]


def test_sample_latent() -> None:
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = sample_latent(2000, 8, "normal", g1)
    assert a.shape == (2000, 8)
    assert torch.equal(a, sample_latent(2000, 8, "normal", g2))
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05
    u = sample_latent(2000, 8, "uniform", g1)
    assert u.min() >= -1 and u.max() < 1 and u.min() < -0.99 and u.max() > 0.99
    with pytest.raises(ValueError, match="prior"):
        sample_latent(2, 8, "cauchy", g1)  # type: ignore[arg-type]
