"""Anomaly scoring: the one scorer interface, residual maps, thresholds."""

from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

__all__ = ["AnomalyScorer", "ScoreBatch"]
