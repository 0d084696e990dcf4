"""Scoring in the stain space a run was trained in.

A run trained with ``data.stain_norm`` (Macenko or Reinhard towards ``data.stain_ref``) learned
normal tissue *after* normalisation. Its queries must be normalised the same way, or the stain
difference itself raises every score. :class:`StainNormalizedScorer` wraps any
:class:`~gen_ad.scoring.base.AnomalyScorer` and normalises each image (``[-1,1]`` -> uint8 ->
the run's :class:`~gen_ad.data.stain.StainNormalizer` -> ``[-1,1]``) before ``fit`` and ``score``,
the same per-patch operation training applied after resizing. Maps and reconstructions are in the
normalised stain. Images the normaliser leaves unchanged (too little tissue, or a failed estimate)
are marked 1 in the score term ``stain_unchanged`` (a ``terms.csv`` column).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gen_ad.data.folders import image_to_tensor, tensor_to_uint8
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

if TYPE_CHECKING:
    from gen_ad.data.stain import StainNormalizer


def normalise_batch(x: torch.Tensor, stain: StainNormalizer,
                    unchanged: list[bool] | None = None) -> torch.Tensor:
    """Stain-normalise ``x`` ``[B,3,H,W]`` in ``[-1,1]`` image by image (same device/dtype);
    appends to ``unchanged`` whether each image was left as it was (see the module docstring)."""
    u = tensor_to_uint8(x.cpu()).numpy()
    out = []
    for img in u:
        before = stain.n_skipped
        out.append(image_to_tensor(stain(np.ascontiguousarray(img))))
        if unchanged is not None:
            unchanged.append(stain.n_skipped > before)
    return torch.stack(out).to(device=x.device, dtype=x.dtype)


class StainNormalizedScorer(AnomalyScorer):
    """``inner`` applied to stain-normalised images (see the module docstring).

    Attributes not defined here (e.g. a KNN scorer's ``extractor``, an LPIPS scorer's network)
    are read from ``inner``, so code that inspects a scorer sees the method itself.

    Args:
        inner: the method's scorer.
        stain: the normaliser fitted on the run's reference image.
    """

    def __init__(self, inner: AnomalyScorer, stain: StainNormalizer) -> None:
        self.inner = inner
        self.stain = stain
        self.name = inner.name

    def __getattr__(self, key: str) -> Any:
        if key in ("inner", "stain"):  # not yet set (e.g. during unpickling): no recursion
            raise AttributeError(key)
        return getattr(self.inner, key)

    def _normalised(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for xb in batches:
            yield normalise_batch(xb, self.stain)

    def fit(self, normal_batches: Iterable[torch.Tensor]) -> StainNormalizedScorer:
        self.inner.fit(self._normalised(normal_batches))
        return self

    def calibration(self) -> dict[str, float]:
        return self.inner.calibration()

    def load_calibration(self, state: dict[str, float]) -> None:
        self.inner.load_calibration(state)

    def fit_scores(self) -> np.ndarray | None:
        return self.inner.fit_scores()

    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Scores of ``x`` ``[B,3,H,W]`` in ``[-1,1]`` after stain normalisation, with the term
        ``stain_unchanged`` (1 where the normaliser left the image as it was)."""
        unchanged: list[bool] = []
        out = self.inner.score(normalise_batch(x, self.stain, unchanged))
        flags = torch.tensor(unchanged, dtype=torch.float32, device=out.scores.device)
        return replace(out, terms={**out.terms, "stain_unchanged": flags})
