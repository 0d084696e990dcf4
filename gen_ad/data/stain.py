"""Stain normalisation of H&E patches (Macenko or Reinhard) through the ``torchstain`` library.

A :class:`StainNormalizer` is fitted once on a reference image and maps uint8 RGB patches to the
reference's stain appearance. Only tissue pixels change (optical density >= ``beta`` = 0.15 in
every channel, the pixels Macenko's method estimates stains from): background glass is left as
it is. Whole-image statistics let background drive the mapping: Reinhard's per-channel mean/std
over every pixel turned a mostly blank PCam patch the reference's tissue colour, and Macenko's
99th-percentile concentrations of a patch with little tissue rescaled noise into purple
background. Reinhard therefore takes its LAB statistics over tissue pixels only (as HistomicsTK's
``mask_out``); Macenko runs as torchstain's (Io 240, alpha 1, beta 0.15) and its background
pixels are restored. Patches with too little tissue for a stable estimate are returned
unchanged and counted in :attr:`StainNormalizer.n_skipped`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np

from gen_ad.errors import ConfigError, DataError

StainMethod = Literal["macenko", "reinhard"]

_IO = 240  # transmitted light intensity used by the Macenko method
_BETA = 0.15  # optical-density threshold below which a pixel counts as background
ALGORITHM = 2  # bumped when the mapping changes (2: tissue pixels only), so caches rebuild


def tissue_mask(rgb: np.ndarray, beta: float = _BETA, io: int = _IO) -> np.ndarray:
    """Pixels whose optical density ``-log((I + 1) / io)`` is at least ``beta`` in every channel.

    Args:
        rgb: uint8 ``[H,W,3]``.
    Returns:
        bool ``[H,W]`` (the pixels Macenko's method estimates stains from).
    """
    od = -np.log((rgb.astype(np.float64) + 1.0) / io)
    return np.all(od >= beta, axis=-1)


def tissue_pixel_fraction(rgb: np.ndarray, beta: float = _BETA, io: int = _IO) -> float:
    """Fraction of pixels in :func:`tissue_mask`, in ``[0, 1]`` (0 for an empty image)."""
    return float(tissue_mask(rgb, beta, io).mean()) if rgb.size else 0.0


class _TissueReinhard:
    """Reinhard et al. (2001) colour transfer in LAB with the statistics of tissue pixels only
    (reference and patch), applied to tissue pixels; LAB conversions are torchstain's."""

    def fit(self, ref: np.ndarray) -> None:
        self.mean, self.std = self._stats(ref)
        if not np.all(self.std > 0):
            raise FloatingPointError("the reference's tissue has a constant LAB channel")

    @staticmethod
    def _lab(rgb: np.ndarray) -> np.ndarray:
        from torchstain.numpy.utils.rgb2lab import rgb2lab

        return rgb2lab(rgb.astype(np.float32) / 255.0).astype(np.float64)

    def _stats(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tissue = self._lab(rgb)[tissue_mask(rgb)]
        return tissue.mean(axis=0), tissue.std(axis=0)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        from torchstain.numpy.utils.lab2rgb import lab2rgb

        mask = tissue_mask(rgb)
        lab = self._lab(rgb)
        mean, std = lab[mask].mean(axis=0), lab[mask].std(axis=0)
        if not np.all(std > 0):
            raise FloatingPointError("a constant LAB channel in the patch's tissue")
        lab[mask] = (lab[mask] - mean) / std * self.std + self.mean
        out = np.clip(lab2rgb(lab.astype(np.float32)) * 255.0, 0.0, 255.0)
        return np.where(mask[..., None], np.rint(out), rgb).astype(np.uint8)


def cache_settings(normalizer: StainNormalizer,
                   reference: str | os.PathLike[str]) -> dict[str, object]:
    """What identifies ``normalizer``'s mapping in a patch cache's key: the method, the reference
    file's path and content (sha256), the tissue threshold, this module's algorithm version and
    torchstain's version (a replaced reference or a new algorithm must not reuse a cache)."""
    from importlib.metadata import PackageNotFoundError, version

    from gen_ad.utils.io import sha256_file

    try:
        torchstain = version("torchstain")
    except PackageNotFoundError:
        torchstain = None
    digest = sha256_file(Path(reference).expanduser())
    return {"method": normalizer.method, "reference": str(reference), "sha256": digest,
            "min_tissue": normalizer.min_tissue, "algorithm": ALGORITHM, "torchstain": torchstain}


class StainNormalizer:
    """Map uint8 RGB patches to the stain appearance of a reference image.

    Args:
        method: ``macenko`` (stain vectors + concentration percentiles) or ``reinhard``
            (per-channel mean/std in LAB over tissue pixels).
        reference: path of the reference image, or a uint8 ``[H,W,3]`` array.
        min_tissue: patches with a smaller tissue-pixel fraction (see
            :func:`tissue_pixel_fraction`) are returned unchanged.
    Raises:
        DataError: the reference is unreadable or has too little tissue to fit.
    """

    def __init__(self, method: StainMethod = "macenko",
                 reference: str | os.PathLike[str] | np.ndarray | None = None,
                 min_tissue: float = 0.05) -> None:
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
                self._norm.fit(ref)  # type: ignore[attr-defined]  # as normalize: _make's object
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
            from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
        except ImportError as err:  # an install without it (a wheel set carried to a GPU box)
            raise ConfigError("stain normalisation needs torchstain, which is not installed: "
                              "pip install torchstain (a dependency of gen_ad)") from err

        if self.method == "macenko":
            return NumpyMacenkoNormalizer()
        return _TissueReinhard()

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
                    out = np.where(tissue_mask(rgb)[..., None],  # background stays as it is
                                   np.asarray(out, np.uint8).reshape(rgb.shape), rgb)
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


def unchanged_count(normalizer: StainNormalizer, images: Iterable[np.ndarray]) -> tuple[int, int]:
    """How many of ``images`` (uint8 ``[H,W,3]``) ``normalizer`` leaves unchanged (too little
    tissue or a failed estimate), and how many it saw: ``(unchanged, seen)``. The normaliser's
    own counters keep counting; only the difference is returned."""
    before, seen = normalizer.n_skipped, 0
    for rgb in images:
        normalizer(rgb)
        seen += 1
    return normalizer.n_skipped - before, seen
