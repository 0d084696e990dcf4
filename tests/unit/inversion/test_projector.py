"""StyleGAN2 projection: recovers generated images, batch == one by one, encoder, scorer."""

from __future__ import annotations

import pytest
import torch

from gen_ad.errors import DataError
from gen_ad.inversion.lpips_net import build_lpips
from gen_ad.inversion.projector import (
    StyleGAN2Scorer,
    encoder_loss,
    noise_regularizer,
    project,
    train_projection_encoder,
    w_stats,
)
from gen_ad.models.stylegan2 import Generator, LatentEncoder


def _G(res: int = 16) -> Generator:
    torch.manual_seed(0)
    G = Generator(resolution=res, z_dim=8, w_dim=8, channel_base=64, channel_max=8,
                  mapping_layers=2)
    return G.eval().requires_grad_(False)


def test_projection_recovers_images_the_generator_made() -> None:
    G = _scaled_down_G(16)  # its images lie inside [-1, 1], as images do
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = G(z, noise_mode="const")
    stats = w_stats(G, n=2000)
    res = project(G, target, lpips_net=None, mse_weight=1.0, steps=150, optimize_noise=False,
                  w_avg=stats[0], w_std=stats[1], generator=torch.Generator().manual_seed(0))
    unrelated = (target - target.roll(1, dims=0)).square().mean(dim=[1, 2, 3])
    start = (G.synthesis(stats[0].expand(4, G.num_ws, -1), noise_mode="const")
             - target).square().mean(dim=[1, 2, 3])
    assert res.recon.shape == target.shape and res.ws.shape == (4, G.num_ws, 8)
    assert (res.mse < 0.1 * unrelated).all() and (res.mse < 0.1 * start).all()


def test_batched_projection_equals_one_by_one() -> None:
    G = _G(32)  # AlexNet-LPIPS needs at least ~32 px
    net = build_lpips("alex", random_init=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    stats = w_stats(G, n=500)
    kw = {"lpips_net": net, "mse_weight": 0.5, "steps": 8, "w_avg": stats[0],
          "w_std": stats[1]}
    batch = project(G, x, generator=torch.Generator().manual_seed(5), latent="w+", **kw)
    for i in range(3):
        one = project(G, x[i:i + 1], generator=torch.Generator().manual_seed(5), latent="w+",
                      **kw)
        torch.testing.assert_close(one.ws, batch.ws[i:i + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.noise[-1], batch.noise[-1][i:i + 1], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(one.lpips, batch.lpips[i:i + 1], atol=1e-5, rtol=1e-4)


def test_noise_maps_are_renormalised_and_regulariser_is_per_image() -> None:
    G = _G()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    res = project(G, x, lpips_net=None, mse_weight=1.0, steps=3)
    for n in res.noise:
        assert n.shape[:2] == (2, 1)
        torch.testing.assert_close(n.mean(dim=[1, 2, 3]), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(n.square().mean(dim=[1, 2, 3]), torch.ones(2))
    const = torch.ones(1, 1, 16, 16)
    assert noise_regularizer([torch.cat([const, torch.randn(1, 1, 16, 16)])])[0] > 1.0
    with pytest.raises(DataError):
        project(G, torch.zeros(1, 3, 8, 8), lpips_net=None, mse_weight=1.0, steps=1)


def test_encoder_training_lowers_its_loss_and_initialises_projection() -> None:
    G = _G()
    real = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    E = LatentEncoder(resolution=16, num_ws=G.num_ws, w_dim=8, channel_base=64, channel_max=8)
    E.w_avg.copy_(G.mapping.w_avg)
    with torch.no_grad():
        before, _ = encoder_loss(E, G, real, generator=torch.Generator().manual_seed(9))
    E = train_projection_encoder(G, real, steps=40, batch_size=8, lr=3e-3, encoder=E)
    with torch.no_grad():
        after, logs = encoder_loss(E, G, real, generator=torch.Generator().manual_seed(9))
    assert after.item() < before.item() and set(logs) >= {"w_mse", "real_mse"}
    res = project(G, real[:2], lpips_net=None, mse_weight=1.0, steps=0, latent="w+",
                  init_ws=E(real[:2]))
    torch.testing.assert_close(res.ws, E(real[:2]))


def _scaled_down_G(res: int = 32, gain: float = 0.2) -> Generator:
    """``_G`` with its toRGB weights scaled by ``gain``: outputs well inside [-1, 1] (the
    random generator overshoots to ~3), so clamping the reconstruction changes nothing."""
    G = _G(res)
    for blk in G.synthesis.blocks:
        blk.torgb.weight.mul_(gain)
    return G


def test_scorer_outputs_scores_maps_and_terms() -> None:
    G = _scaled_down_G()
    from gen_ad.models.stylegan2 import Discriminator

    D = Discriminator(resolution=32, channel_base=64, channel_max=8).eval()
    net = build_lpips("alex", random_init=True)
    scorer = StyleGAN2Scorer(G, D=D, lpips_net=net, steps=3, feature_weight=0.1,
                             lpips_weight=0.6, pixel_weight=1.3)
    assert scorer.name == "stylegan2" and scorer.latent == "w"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = scorer.score(x)
    assert out.scores.shape == (3,) and out.maps.shape == (3, 32, 32)
    assert out.recon.shape == (3, 3, 32, 32) and (out.maps >= 0).all()
    assert out.recon.abs().max() < 0.99  # nothing clamped (see _scaled_down_G)
    assert set(out.terms) == {"lpips", "pixel", "feature"}
    # independent references from the nets and the returned reconstruction
    spatial = build_lpips("alex", spatial=True, random_init=True)
    spatial.load_state_dict(net.state_dict())  # the same weights, per-pixel output
    with torch.no_grad():
        lp = net(x, out.recon).flatten()
        lp_map = spatial(x, out.recon)[:, 0]
        feat = (D.features(x, mbstd_group=1) - D.features(out.recon, mbstd_group=1)).square()
    pix_map = (x - out.recon).abs().mean(dim=1)
    torch.testing.assert_close(out.terms["pixel"], (x - out.recon).abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out.terms["lpips"], lp)
    torch.testing.assert_close(out.terms["feature"], feat.mean(dim=1))
    torch.testing.assert_close(out.maps, 0.6 * lp_map + 1.3 * pix_map)
    assert (0.6 * lp_map).mean() > 0.05 * out.maps.mean()  # the LPIPS part is not negligible
    expected = 0.6 * lp + 1.3 * out.terms["pixel"] + 0.1 * out.terms["feature"]
    torch.testing.assert_close(out.scores, expected)
    alone = torch.cat([scorer.score(x[i:i + 1]).terms["feature"] for i in range(3)])
    torch.testing.assert_close(out.terms["feature"], alone)  # no dependence on batch mates


def test_scorer_lpips_term_is_of_the_returned_reconstruction() -> None:
    """project() measured LPIPS (and MSE) on the raw synthesis but returned it clamped to
    [-1, 1]: the score's LPIPS term was of another image than its pixel term, map and recon
    (about 9% apart for this generator, whose outputs reach 3.1)."""
    G = _G(32)  # random generator: outputs overshoot [-1, 1]
    net = build_lpips("alex", random_init=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = StyleGAN2Scorer(G, lpips_net=net, steps=3).score(x)
    with torch.no_grad():
        lp = net(x, out.recon).flatten()
    torch.testing.assert_close(out.terms["lpips"], lp)
