"""FID/KID of a sampler: a rerun repeats bitwise; the sample set, a function of the seed and the
sampling batch size (one sampler call per batch), is recorded with the result."""

from __future__ import annotations

import torch

from gen_ad.metrics import fid
from gen_ad.metrics import inception as inc


def _meanstd() -> inc.FeatureExtractor:
    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return torch.cat([xf.mean((2, 3)), xf.std((2, 3))], 1)

    return inc.custom_extractor("meanstd", fn, identity="v1", device="cpu")


def _sample(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=generator) * 2 - 1


def _real() -> torch.Tensor:
    return torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_sampler_fid_and_kid_repeat_bitwise_and_record_how_they_sampled() -> None:
    kw = {"extractor": _meanstd(), "kid": True, "n": 20, "use_cache": False}
    a = fid.compute_fid(_real(), _sample, batch_size=6, seed=3, **kw)
    assert a == fid.compute_fid(_real(), _sample, batch_size=6, seed=3, **kw)
    assert a["sampling"] == {"seed": 3, "batch_size": 6}
    other = fid.compute_fid(_real(), _sample, batch_size=5, seed=3, **kw)
    assert other["sampling"] == {"seed": 3, "batch_size": 5}
