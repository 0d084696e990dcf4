"""A colour-only feature extractor: per-channel colour statistics of each image.

Registered as the extractor ``colour-stats`` (``build_extractor("colour-stats")``, no weights), so
``gen-ad knn fit --extractor colour-stats`` works like any other extractor. The shortcut check of
every benchmark (:mod:`gen_ad.app.shortcut`) runs the KNN baseline on these 15 numbers: a method
that does not beat it may be separating the classes by stain, scanner or compression rather than
by tissue.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

QUANTILES = (0.1, 0.5, 0.9)
COLOUR_STATS = "colour-stats"


def colour_statistics(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Mean, std and quantiles of each channel.

    Args:
        x: ``[B,3,H,W]`` images in ``[0,1]``.
        levels: ``[Q]`` quantile levels.
    Returns:
        ``[B, (2+Q)*3]`` float32 ordered ``(mean, std, q...)`` x ``(R, G, B)``.
    """
    v = rearrange(x.float(), "b c h w -> b c (h w)")
    q = torch.quantile(v, levels.to(v), dim=-1)  # [Q, B, C]
    stats = torch.stack([v.mean(-1), v.std(-1, unbiased=False), *q], dim=1)  # [B, 2+Q, C]
    return rearrange(stats, "b s c -> b (s c)")


class ColourStatsBackbone(nn.Module):
    """The ``colour-stats`` backbone: ``forward_features`` of ``[B,3,H,W]`` in ``[0,1]`` ->
    ``[B,15]`` (mean, std, 10/50/90 % quantiles of R, G, B). The quantile levels are its only
    (frozen) parameter, so it has a device like any network."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = nn.Parameter(torch.tensor(QUANTILES), requires_grad=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in ``[0,1]`` -> ``[B,15]``."""
        return colour_statistics(x, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)
