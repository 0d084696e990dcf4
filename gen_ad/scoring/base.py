"""The one scorer interface every method implements.

Evaluation, thresholds, reports and the CLI see every method (f-AnoGAN, StyleGAN2 projection,
AnoDDPM, AutoDDPM, KNN, ...) only through :class:`AnomalyScorer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ScoreBatch:
    """What a scorer returns for a batch of ``B`` images of size ``H x W``.

    Attributes:
        scores: ``[B]`` float, higher = more anomalous.
        maps: ``[B,H,W]`` float ``>= 0`` at image resolution, or ``None`` (e.g. KNN).
        recon: ``[B,3,H,W]`` reconstruction in ``[-1,1]``, or ``None``.
        terms: named ``[B]`` components of the score (e.g. izi_f's residual and feature terms).
    """

    scores: torch.Tensor
    maps: torch.Tensor | None = None
    recon: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"scores must be [B], got shape {tuple(self.scores.shape)}")
        b = self.scores.shape[0]
        if self.maps is not None and (self.maps.ndim != 3 or self.maps.shape[0] != b):
            raise ValueError(f"maps must be [B,H,W] with B={b}, got {tuple(self.maps.shape)}")
        if self.recon is not None and (self.recon.ndim != 4 or self.recon.shape[0] != b):
            raise ValueError(f"recon must be [B,3,H,W] with B={b}, got {tuple(self.recon.shape)}")
        for k, v in self.terms.items():
            if v.shape != (b,):
                raise ValueError(f"term '{k}' must be [B], got {tuple(v.shape)}")

    def cpu(self) -> ScoreBatch:
        """A detached CPU copy."""
        return ScoreBatch(
            scores=self.scores.detach().cpu(),
            maps=None if self.maps is None else self.maps.detach().cpu(),
            recon=None if self.recon is None else self.recon.detach().cpu(),
            terms={k: v.detach().cpu() for k, v in self.terms.items()},
        )

    @staticmethod
    def cat(batches: Iterable[ScoreBatch]) -> ScoreBatch:
        """Concatenate batches along the batch dimension (maps/recon kept only if all have them)."""
        bs = list(batches)
        if not bs:
            raise ValueError("no batches to concatenate")
        maps = None if any(b.maps is None for b in bs) else torch.cat([b.maps for b in bs])
        recon = None if any(b.recon is None for b in bs) else torch.cat([b.recon for b in bs])
        keys = set.intersection(*(set(b.terms) for b in bs))
        terms = {k: torch.cat([b.terms[k] for b in bs]) for k in sorted(keys)}
        return ScoreBatch(torch.cat([b.scores for b in bs]), maps, recon, terms)


class AnomalyScorer(ABC):
    """Scores images for anomaly; higher = more anomalous.

    Subclasses set ``name`` and implement :meth:`score`. :meth:`fit` may only *calibrate* on normal
    data (e.g. a threshold or a feature bank), never train a generator.
    """

    name: str = "scorer"

    def fit(self, normal_batches: Iterable[torch.Tensor]) -> AnomalyScorer:
        """Calibrate on batches of normal images ``[B,3,H,W]`` in ``[-1,1]`` (default: nothing)."""
        return self

    def calibration(self) -> dict[str, float]:
        """What :meth:`fit` learned, as plain numbers (saved with the run; default: nothing)."""
        return {}

    def load_calibration(self, state: dict[str, float]) -> None:  # noqa: B027
        """Restore what :meth:`calibration` returned, instead of fitting again."""

    def fit_scores(self) -> np.ndarray | None:
        """Scores of (a subset of) the images :meth:`fit` saw, each scored without itself, for a
        threshold; ``None`` (the default): scoring them again is fair (nothing memorised them).
        A scorer whose fit stores the images (a KNN bank) must return leave-one-out scores:
        re-scored, every image would find itself at distance 0."""
        return None

    @abstractmethod
    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Score a batch.

        Args:
            x: ``[B,3,H,W]`` float in ``[-1,1]``.
        Returns:
            A :class:`ScoreBatch` with ``[B]`` scores and, where the method has them, maps and
            reconstructions.
        """


def batch_dependent(scorer: AnomalyScorer) -> bool:
    """Whether a scorer's scores depend on the batch an image is scored in beyond rounding (so
    a re-run may reuse results only at the same batch size): diffusion scorers with
    ``streams="batch"`` draw one generator per batch; the default per-image streams do not.
    Read through wrappers that delegate attributes (stain normalisation)."""
    return getattr(scorer, "streams", None) == "batch"
