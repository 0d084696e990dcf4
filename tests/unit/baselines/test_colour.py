"""The colour-stats extractor's 15 numbers equal numpy's per-channel statistics."""

from __future__ import annotations

import numpy as np
import torch

from gen_ad.baselines.colour import colour_statistics
from gen_ad.baselines.extractors import build_extractor


def _reference(x01: np.ndarray) -> np.ndarray:
    """``[B,3,H,W]`` in ``[0,1]`` -> ``[B,15]``: (mean, population std, 10/50/90 % linear
    quantiles) x (R, G, B), statistic-major."""
    v = x01.reshape(x01.shape[0], 3, -1).astype(np.float64)
    stats = [v.mean(-1), v.std(-1, ddof=0), *np.quantile(v, [0.1, 0.5, 0.9], axis=-1)]
    return np.stack(stats, axis=1).reshape(x01.shape[0], 15)  # [B, stat, channel] flattened


def test_colour_statistics_equal_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    x[:, 1] = x[:, 1] ** 3  # channels with different spreads and skews
    x[:, 2] = 0.2 + 0.1 * x[:, 2]
    out = colour_statistics(x, torch.tensor([0.1, 0.5, 0.9]))
    assert out.shape == (2, 15) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), _reference(x.numpy()), rtol=0, atol=1e-6)


def test_colour_stats_extractor_maps_minus_one_one_to_unit_range() -> None:
    """The extractor takes ``[-1,1]`` images like every extractor and describes them in
    ``[0,1]``: no resizing, no normalisation."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x[1, 0] = x[1, 0].abs()  # one channel only in [0, 1]: its quantiles differ from the others
    ext = build_extractor("colour-stats")
    with torch.no_grad():
        out = ext(x)
    assert out.shape == (2, 15) and ext.dim == 15
    np.testing.assert_allclose(out.double().numpy(), _reference((x.numpy() + 1) / 2), rtol=0,
                               atol=1e-6)
