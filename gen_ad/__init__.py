"""gen_ad: generative models of normal histopathology tissue for unsupervised anomaly detection.

Train WGAN-GP + izi_f (f-AnoGAN), StyleGAN2 and DDPM (AnoDDPM / AutoDDPM) on normal patches,
measure them with FID, reconstruct query patches, score the residuals, and compare every method
with a KNN baseline on frozen foundation-model features through one evaluation.
"""

from __future__ import annotations

from typing import Any

from gen_ad._version import __version__

__all__ = ["load_run", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import gen_ad` (and `gen-ad --help`) stays fast; torch loads on first use.
    if name == "load_run":
        from gen_ad.training.runs import load_run

        return load_run
    raise AttributeError(f"module 'gen_ad' has no attribute {name!r}")
