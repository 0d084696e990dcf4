"""Stain shifts for the stain-shift evaluation: HED jitter, a normal-set reference, and a dataset
wrapper that applies either to every image.

HED jitter (as in Tellez et al. 2018): colour deconvolution into hematoxylin, eosin and DAB
(``skimage.color.rgb2hed``), each channel scaled by ``U(1-s, 1+s)`` and shifted by ``U(-s, s)``,
back to RGB. Each image gets its own draw from a generator seeded by ``(seed, index)``, so a
shifted set is the same whatever order or batch size it is read in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gen_ad.data.folders import image_to_tensor, tensor_to_uint8
from gen_ad.errors import ConfigError

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def hed_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random HED stain perturbation of one image.

    Args:
        rgb: uint8 ``[H,W,3]``.
        strength: ``s`` >= 0 (0 returns the image unchanged); 0.05 is a moderate shift.
        rng: random generator (three scales, then three shifts are drawn).
    Returns:
        uint8 ``[H,W,3]``.
    """
    from skimage.color import hed2rgb, rgb2hed

    if strength < 0:
        raise ConfigError(f"stain jitter strength must be >= 0, got {strength}")
    if strength == 0:
        return rgb
    alpha = rng.uniform(1 - strength, 1 + strength, 3)
    beta = rng.uniform(-strength, strength, 3)
    hed = rgb2hed(rgb) * alpha + beta
    return np.clip(np.rint(hed2rgb(hed) * 255.0), 0, 255).astype(np.uint8)


def median_reference(images: torch.Tensor) -> int:
    """Index of the image whose colour statistics are closest to the set's median statistics.

    Args:
        images: ``[N,3,H,W]`` in ``[-1,1]``.
    Returns:
        An index into ``images`` (the stain reference of a normal set).
    """
    from gen_ad.baselines.colour import ColourStatsBackbone

    feats = ColourStatsBackbone().forward_features((images.float() + 1) / 2)
    med = feats.median(dim=0).values
    scale = feats.std(dim=0).clamp(min=1e-6)
    return int((((feats - med) / scale) ** 2).sum(1).argmin())


class ShiftedDataset(Dataset):
    """``dataset`` with ``transform(rgb uint8 [H,W,3], rng) -> uint8`` applied to each image.

    Items keep every key of the wrapped dataset; ``image`` is replaced (float ``[3,H,W]`` in
    ``[-1,1]``). Image ``i`` uses ``np.random.default_rng([seed, i])``.
    """

    def __init__(self, dataset: Dataset, transform: Transform, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        rgb = tensor_to_uint8(item["image"]).numpy()
        out = self.transform(np.ascontiguousarray(rgb), np.random.default_rng([self.seed, i]))
        item["image"] = image_to_tensor(out)
        return item
