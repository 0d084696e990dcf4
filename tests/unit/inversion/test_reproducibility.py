"""Per-image scores of every generative scorer: what they may and may not depend on (CPU).

Each image's random draws come from its own stream (``gen_ad.inversion.noise``), so a score
depends only on the image, the model and the seed. What remains is float rounding: the same
call repeated, or the same image with other images beside it in a batch of the same shape, is
bitwise equal; a batch of another size (or another thread count) runs other matrix-product /
convolution kernels, whose summation order differs. Measured on tiny random nets: at most
2.4e-7 relative (alone vs in a batch of 6, 1 vs 2 threads). Iterative inversions amplify it
with the step count (AnoGAN, 200 Adam steps on a trained demo WGAN: 2.2e-3; 50 steps: 8e-8),
so the tolerance below holds for the few steps used here, not for any step count.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gen_ad.inversion.diffusion import AnoDDPMScorer, AutoDDPMScorer
from gen_ad.inversion.encoder import FAnoGANScorer
from gen_ad.inversion.lpips_net import build_lpips
from gen_ad.inversion.projector import StyleGAN2Scorer
from gen_ad.models import stylegan2 as sg
from gen_ad.models import wgan
from gen_ad.models.schedule import build_scheduler
from gen_ad.models.unet import build_unet
from gen_ad.scoring.base import AnomalyScorer

RTOL, ATOL = 1e-5, 1e-7  # batched-kernel rounding (measured <= 2.4e-7 relative)


def _fanogan(mode: str) -> tuple[AnomalyScorer, int]:
    torch.manual_seed(0)
    G = wgan.Generator(latent_dim=8, resolution=16, base_dim=4)
    G.train()(torch.randn(16, 8))  # non-trivial BatchNorm statistics
    enc = None if mode == "iterative" else wgan.Encoder(latent_dim=8, resolution=16,
                                                        base_dim=4).eval()
    return FAnoGANScorer(generator=G.eval(), critic=wgan.Critic(resolution=16, base_dim=4).eval(),
                         encoder=enc, mode=mode, steps=4, seed=2), 16  # type: ignore[arg-type]


def _stylegan2(with_encoder: bool) -> tuple[AnomalyScorer, int]:
    torch.manual_seed(0)
    G = sg.Generator(resolution=32, z_dim=8, w_dim=8, channel_base=64, channel_max=8,
                     mapping_layers=2).eval().requires_grad_(False)
    D = sg.Discriminator(resolution=32, channel_base=64, channel_max=8).eval()
    E = sg.LatentEncoder(resolution=32, num_ws=G.num_ws, w_dim=G.w_dim,
                         init_res=G.init_res).eval() if with_encoder else None
    return StyleGAN2Scorer(G, D=D, encoder=E, lpips_net=build_lpips("alex", random_init=True),
                           steps=3, feature_weight=0.1), 32


def _diffusion(kind: str) -> tuple[AnomalyScorer, int]:
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=32, block_out_channels=[16, 32],
                      attention_levels=[False, False]).eval()
    if kind == "anoddpm":
        return AnoDDPMScorer(unet, build_scheduler(), t=20, sampler="ddim", steps=4, seed=1), 32
    lp = build_lpips(net="squeeze", spatial=True, random_init=True)
    return AutoDDPMScorer(unet, build_scheduler(), t_recon=20, t_inpaint=5, resample=2,
                          steps_recon=4, steps_inpaint=2, sampler="ddim", lpips=lp,
                          threshold=0.1), 32


SCORERS: dict[str, Callable[[], tuple[AnomalyScorer, int]]] = {
    "fanogan-izif": lambda: _fanogan("izif"),
    "anogan-iterative": lambda: _fanogan("iterative"),
    "fanogan-izif+iterative": lambda: _fanogan("izif+iterative"),
    "stylegan2": lambda: _stylegan2(False),
    "stylegan2-enc": lambda: _stylegan2(True),
    "anoddpm": lambda: _diffusion("anoddpm"),
    "autoddpm": lambda: _diffusion("autoddpm"),
}


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _scores(scorer: AnomalyScorer, x: torch.Tensor) -> torch.Tensor:
    return scorer.score(x).scores.detach().cpu()


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_score_depends_on_the_image_not_its_batch(name: str) -> None:
    scorer, size = SCORERS[name]()
    x = _images(6, size, 5)
    ref = _scores(scorer, x)
    # bitwise: a rerun, and other images beside it in a batch of the same shape
    assert torch.equal(_scores(scorer, x), ref)
    mates = torch.cat([x[:3], _images(3, size, 77)])
    assert torch.equal(_scores(scorer, mates)[:3], ref[:3])
    # within rounding: alone, another order, the batch split in two calls
    alone = torch.cat([_scores(scorer, x[i:i + 1]) for i in range(len(x))])
    flipped = _scores(scorer, x.flip(0)).flip(0)
    split = torch.cat([_scores(scorer, x[:4]), _scores(scorer, x[4:])])
    for other in (alone, flipped, split):
        torch.testing.assert_close(other, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["anogan-iterative", "stylegan2", "autoddpm"])
def test_score_within_rounding_of_the_thread_count(name: str) -> None:
    scorer, size = SCORERS[name]()
    x = _images(4, size, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _scores(scorer, x)
        torch.set_num_threads(2)
        two = _scores(scorer, x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(two, one, rtol=RTOL, atol=ATOL)
