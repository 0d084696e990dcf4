"""StyleGAN2 networks: published parameter counts, shapes, fused == unfused, FIR, mbstd."""

from __future__ import annotations

import pytest
import torch

from gen_ad.models.fir import downsample2d, setup_filter, upsample2d
from gen_ad.models.stylegan2 import (
    CHANNEL_BASE,
    Discriminator,
    Generator,
    LatentEncoder,
    minibatch_stddev,
    parameter_count,
)

# Parameter counts of the official stylegan2-ada-pytorch networks (training/networks.py,
# z_dim = w_dim = 512, 8 mapping layers, channel_max 512, no labels), obtained by instantiating
# them; config F at 1024 is the published "30.0M / 29.0M" pair (30,370,060 / 29,012,513).
OFFICIAL = {
    ("E", 256): (24_767_458, 24_001_089),
    ("F", 256): (30_034_338, 28_864_129),
    ("E", 512): (24_860_935, 24_030_753),
    ("F", 512): (30_276_583, 28_982_849),
    ("F", 1024): (30_370_060, 29_012_513),
}


@pytest.mark.parametrize(("preset", "res"), sorted(OFFICIAL))
def test_parameter_counts_match_official_architecture(preset: str, res: int) -> None:
    with torch.device("meta"):
        G = Generator(resolution=res, channel_base=CHANNEL_BASE[preset])
        D = Discriminator(resolution=res, channel_base=CHANNEL_BASE[preset])
    assert (parameter_count(G), parameter_count(D)) == OFFICIAL[(preset, res)]
    assert G.num_ws == 2 * len(G.synthesis.resolutions)


TINY = {"channel_base": 64, "channel_max": 8, "z_dim": 8, "w_dim": 8, "mapping_layers": 2}


def _tiny(res: int, **kw: object) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    g_kw = {k: v for k, v in {**TINY, **kw}.items()}
    d_kw = {k: v for k, v in g_kw.items() if k in ("channel_base", "channel_max", "init_res")}
    return Generator(resolution=res, **g_kw), Discriminator(resolution=res, **d_kw)


@pytest.mark.parametrize(("res", "init_res", "expected_blocks"),
                         [(16, None, 3), (64, None, 5), (96, None, 6), (96, 6, 5), (128, None, 6)])
def test_forward_backward_every_resolution(res: int, init_res: int | None,
                                           expected_blocks: int) -> None:
    G, D = _tiny(res, init_res=init_res)
    assert len(G.synthesis.blocks) == expected_blocks
    G.train()
    gen = torch.Generator().manual_seed(1)
    img, ws = G(torch.randn(4, 8, generator=gen), generator=gen, return_ws=True)
    assert img.shape == (4, 3, res, res) and ws.shape == (4, G.num_ws, 8)
    logits = D(img)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in list(G.parameters()) + list(D.parameters()) if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:-1])


def test_512_forward_with_tiny_channels() -> None:
    torch.manual_seed(0)
    G = Generator(resolution=512, z_dim=4, w_dim=4, channel_base=256, channel_max=4,
                  mapping_layers=1).eval()
    D = Discriminator(resolution=512, channel_base=256, channel_max=4)
    with torch.no_grad():
        img = G(torch.randn(1, 4), noise_mode="const")
        assert img.shape == (1, 3, 512, 512)
        assert D(img).shape == (1, 1)


def test_fused_and_unfused_modulated_convolutions_agree() -> None:
    G, _ = _tiny(32)
    z = torch.randn(3, 8)
    with torch.no_grad():
        for s in G.synthesis.modules():
            if hasattr(s, "noise_strength"):
                s.noise_strength.fill_(0.5)
        a = G(z, noise_mode="const", fused=True)
        b = G(z, noise_mode="const", fused=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_noise_modes_and_explicit_noise() -> None:
    G, _ = _tiny(16)
    G.eval()
    with torch.no_grad():
        s = [m for m in G.synthesis.modules() if hasattr(m, "noise_strength")]
        for m in s:
            m.noise_strength.fill_(1.0)
        z = torch.randn(2, 8)
        c1, c2 = G(z, noise_mode="const"), G(z, noise_mode="const")
        r1 = G(z, generator=torch.Generator().manual_seed(0))
        r2 = G(z, generator=torch.Generator().manual_seed(0))
        r3 = G(z, generator=torch.Generator().manual_seed(1))
        consts = [m.noise_const[None, None] for m in s]
        e = G.synthesis(G.mapping_ws(z), noise=consts)
    assert torch.equal(c1, c2) and torch.equal(r1, r2) and not torch.equal(r1, r3)
    torch.testing.assert_close(c1, e)
    assert G.synthesis.noise_resolutions() == [4, 8, 8, 16, 16]


def test_style_mixing_and_truncation() -> None:
    G, _ = _tiny(16)
    z, z2 = torch.randn(2, 8), torch.randn(2, 8)
    ws = G.mapping_ws(z, mix_z=z2, mix_cutoff=2, update_w_avg=False)
    w1, w2 = G.mapping(z), G.mapping(z2)
    torch.testing.assert_close(ws[:, 1], w1)
    torch.testing.assert_close(ws[:, 2], w2)
    G.mapping.w_avg.fill_(0.5)
    wt = G.mapping_ws(z, truncation_psi=0.0, update_w_avg=False)
    assert torch.allclose(wt, torch.full_like(wt, 0.5))


def test_fir_resampling_preserves_constants() -> None:
    f = setup_filter([1, 3, 3, 1])
    x = torch.full((1, 2, 8, 8), 3.0)
    up, down = upsample2d(x, f), downsample2d(x, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 3.0))


def test_minibatch_stddev_matches_hand_computation() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 2, 2)
    y = minibatch_stddev(x, group_size=4)
    assert y.shape == (8, 5, 2, 2)
    # samples i and i+2 (group member g = i // 2 ... ) share statistics: groups are strided by n=2
    groups = x.reshape(4, 2, 4, 2, 2)
    expected = (groups.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])  # [2]
    torch.testing.assert_close(y[:, 4, 0, 0], expected.repeat(4))
    assert minibatch_stddev(torch.randn(6, 4, 2, 2), group_size=4).shape == (6, 5, 2, 2)


def test_encoder_starts_at_w_avg_and_bad_resolution_errors() -> None:
    E = LatentEncoder(resolution=16, num_ws=6, w_dim=8, channel_base=64, channel_max=8)
    E.w_avg.fill_(0.25)
    out = E(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 6, 8) and torch.allclose(out, torch.full_like(out, 0.25))
    with pytest.raises(ValueError, match="power"):
        Generator(resolution=48, init_res=5)
    with pytest.raises(ValueError):
        Discriminator(resolution=100, init_res=4)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_reduced_precision_blocks_agree_with_float32(dtype: torch.dtype, tol: float) -> None:
    # On CUDA the top num_fp16_res blocks run like this automatically; here the dtype is forced.
    G, D = _tiny(32, channel_base=256, channel_max=16)
    G.eval()
    ws = G.mapping_ws(torch.randn(2, 8))
    x = img = None
    i = 0
    with torch.no_grad():
        for blk in G.synthesis.blocks:
            n = blk.num_conv
            x, img = blk(x, img, ws[:, i:i + n + 1], dtype=dtype if blk.use_lowp else torch.float32,
                         noises=[None] * n, noise_mode="const", generator=None, fused=False)
            i += n
        ref = G.synthesis(ws, noise_mode="const")
        assert [b.use_lowp for b in G.synthesis.blocks] == [False, True, True, True]
        assert img.dtype == torch.float32
        assert (img - ref).abs().max() < tol * ref.abs().max()
        h = ref
        for blk in D.blocks:
            h = blk(h, dtype if blk.use_lowp else torch.float32)
        assert torch.isfinite(h).all()
