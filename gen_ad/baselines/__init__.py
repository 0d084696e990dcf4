"""Baselines: frozen foundation-model feature extractors and the KNN anomaly scorer."""

from gen_ad.baselines.extractors import (
    ExtractorSpec,
    FeatureExtractor,
    build_extractor,
    extractor_names,
    get_spec,
)
from gen_ad.baselines.knn import FeatureBank, KNNIndex, KNNScorer, SearchSettings

__all__ = [
    "ExtractorSpec",
    "FeatureBank",
    "FeatureExtractor",
    "KNNIndex",
    "KNNScorer",
    "SearchSettings",
    "build_extractor",
    "extractor_names",
    "get_spec",
]
