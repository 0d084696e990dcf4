"""Stain normalisation of H&E patches (Macenko or Reinhard) through the ``torchstain`` library.

A :class:`StainNormalizer` is fitted once on a reference image and maps uint8 RGB patches to the
reference's stain appearance. Patches with too little tissue for a stable estimate (e.g. blank
background) are returned unchanged and counted in :attr:`StainNormalizer.n_skipped`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np

from gen_ad.errors import ConfigError, DataError

StainMethod = Literal["macenko", "reinhard"]

_IO = 240  # transmitted light intensity used by the Macenko method
_BETA = 0.15  # optical-density threshold below which a pixel counts as background


def tissue_pixel_fraction(rgb: np.ndarray, beta: float = _BETA, io: int = _IO) -> float:
    """Fraction of pixels whose optical density exceeds ``beta`` in every channel.

    Args:
        rgb: uint8 ``[H,W,3]``.
    Returns:
        Fraction in ``[0, 1]`` (the pixels Macenko's method estimates stains from).
    """
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)
    return float(np.mean(np.all(od >= beta, axis=1))) if od.size else 0.0


class StainNormalizer:
    """Map uint8 RGB patches to the stain appearance of a reference image.

    Args:
        method: ``macenko`` (stain vectors + concentration percentiles) or ``reinhard``
            (per-channel mean/std in LAB).
        reference: path of the reference image, or a uint8 ``[H,W,3]`` array.
        min_tissue: patches with a smaller tissue-pixel fraction (see
            :func:`tissue_pixel_fraction`) are returned unchanged.
    Raises:
        DataError: the reference is unreadable or has too little tissue to fit.
    """

    def __init__(self, method: StainMethod = "macenko",
                 reference: str | os.PathLike[str] | np.ndarray | None = None,
                 min_tissue: float = 0.01) -> None:
        if method not in ("macenko", "reinhard"):
            raise ValueError(f"stain method must be 'macenko' or 'reinhard', got {method!r}")
        if reference is None:
            raise DataError(f"stain normalisation '{method}' needs a reference image")
        self.method: StainMethod = method
        self.min_tissue = min_tissue
        self.n_calls = 0
        self.n_skipped = 0
        ref = self._load_reference(reference)
        if tissue_pixel_fraction(ref) < min_tissue:
            raise DataError(f"stain reference {self._ref_name(reference)} has almost no tissue "
                            f"(tissue pixel fraction < {min_tissue})")
        self._norm = self._make()
        try:
            with _strict_numerics():
                self._norm.fit(ref)
        except _FAILURES as e:
            raise DataError(f"cannot fit {method} stain normalisation on reference "
                            f"{self._ref_name(reference)}: {e}") from e

    @staticmethod
    def _ref_name(reference: str | os.PathLike[str] | np.ndarray) -> str:
        return "array" if isinstance(reference, np.ndarray) else str(reference)

    @staticmethod
    def _load_reference(reference: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
        if isinstance(reference, np.ndarray):
            if reference.dtype != np.uint8 or reference.ndim != 3 or reference.shape[-1] != 3:
                raise DataError(f"stain reference must be uint8 [H,W,3], got {reference.dtype} "
                                f"{tuple(reference.shape)}")
            return reference
        from gen_ad.data.folders import read_rgb

        return read_rgb(reference)

    def _make(self) -> object:
        try:
            from torchstain.numpy.normalizers import (
                NumpyMacenkoNormalizer,
                NumpyReinhardNormalizer,
            )
        except ImportError as err:  # an install without it (a wheel set carried to a GPU box)
            raise ConfigError("stain normalisation needs torchstain, which is not installed: "
                              "pip install torchstain (a dependency of gen_ad)") from err

        if self.method == "macenko":
            return NumpyMacenkoNormalizer()
        return NumpyReinhardNormalizer()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise one patch.

        Args:
            rgb: uint8 ``[H,W,3]``.
        Returns:
            uint8 ``[H,W,3]`` in the reference stain; the input itself when the patch has too
            little tissue or the estimate fails (counted in :attr:`n_skipped`).
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"expected uint8 [H,W,3], got {rgb.dtype} {tuple(rgb.shape)}")
        self.n_calls += 1
        if tissue_pixel_fraction(rgb) < self.min_tissue:
            self.n_skipped += 1
            return rgb
        try:
            with _strict_numerics():
                if self.method == "macenko":
                    out, _, _ = self._norm.normalize(rgb, stains=False)  # type: ignore[attr-defined]
                else:
                    out = self._norm.normalize(rgb)  # type: ignore[attr-defined]
        except _FAILURES:
            self.n_skipped += 1
            return rgb
        return np.ascontiguousarray(out, dtype=np.uint8).reshape(rgb.shape)


_FAILURES = (FloatingPointError, RuntimeWarning, np.linalg.LinAlgError, ValueError, IndexError)


@contextmanager
def _strict_numerics() -> Iterator[None]:
    """Turn invalid/divide floating-point events and numpy RuntimeWarnings into exceptions."""
    with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield
