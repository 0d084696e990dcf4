"""FID and KID of generated images against a real image set, through torch-fidelity.

Features come from torch-fidelity's Inception-v3 (``inception-v3-compat``, the 2048-d pool layer),
which takes uint8 ``[B,3,H,W]`` at any resolution and resizes to 299x299 itself (TF1-compatible
bilinear). Folders and generators are fed the same way: decoded files as uint8, and generator
samples in ``[-1,1]`` converted with :func:`~gen_ad.metrics.inception.to_uint8`. Statistics and
distances are torch-fidelity's own functions, so a folder-vs-folder FID equals
``torch_fidelity.calculate_metrics``.

The real set's features and statistics are cached under ``cache_dir()/fid`` as safetensors, keyed by
the content of the set (relative file list + bytes, or the pixels of an in-memory set), the
resolution and the extractor (name + weights hash). Any other feature extractor can be plugged in
with :func:`~gen_ad.metrics.inception.custom_extractor`; its results are labelled ``fd_<name>`` /
``kd_<name>_*``, never ``fid``/``kid``. A random-initialised Inception is labelled
``fd_inception-v3-random``, and the cheaper Inception layers 64/192/768 (torch-fidelity's
``feature_layer_fid``) ``fid_<layer>``.

Inception weights are found as :mod:`gen_ad.metrics.inception` describes (explicit path, torch
hub cache, download unless offline), which also holds the extractors.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from tqdm import tqdm

from gen_ad.data.folders import IMAGE_EXTENSIONS, ResizeMode, fit_size, read_rgb
from gen_ad.errors import ConfigError, DataError, GenAdError
from gen_ad.metrics.inception import FeatureExtractor, load_inception, to_uint8
from gen_ad.utils.io import load_safetensors, save_safetensors
from gen_ad.utils.paths import cache_dir

SampleFn = Callable[[int, torch.Generator], Tensor]
"""``sample_fn(n, generator) -> [n,3,H,W]`` float images in ``[-1,1]``."""
RealSource = str | os.PathLike | Dataset | Tensor

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed
_CACHE_VERSION = "1"


# ----------------------------------------------------------------------------- conversion


def _check_images(x: Any, n: int | None, what: str) -> Tensor:
    """Validate ``[n,3,H,W]`` finite float images (or uint8); returns them."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{what} must give images [B,3,H,W], got {shape}")
    if n is not None and x.shape[0] != n:
        raise DataError(f"{what} returned {x.shape[0]} images, {n} were asked for")
    if x.dtype != torch.uint8 and not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} returned non-finite values (NaN or inf)")
    return x


# ----------------------------------------------------------------------------- image sources


def list_images(folder: str | os.PathLike, *, classes: Sequence[str] | None = None,
                max_images: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted by relative path.

    Args:
        folder: directory of images.
        classes: if ``folder`` has subfolders with these names, only those are used.
        max_images: keep the first N (sorted order).
    Raises:
        DataError: not a directory, or no images found.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    roots = [root / c for c in classes or [] if (root / c).is_dir()] or [root]
    files = [p for r in roots for p in r.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise DataError(f"no images ({exts}) found in {root}")
    return files[:max_images] if max_images else files


def _read_rgb(path: Path, size: int | None, resize: ResizeMode) -> np.ndarray:
    """One image as RGB uint8 ``[H,W,3]`` (the training pipeline's decoding and resizing)."""
    rgb = read_rgb(path)
    return rgb if size is None else fit_size(rgb, size, resize)


def _folder_batches(files: Sequence[Path], batch_size: int, *, size: int | None = None,
                    resize: ResizeMode = "resize", threads: int = 4) -> Iterator[Tensor]:
    """Decode files (in threads) into uint8 batches ``[B,3,H,W]``; all must share one size."""
    first: tuple[int, ...] | None = None
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            arrays = list(pool.map(lambda p: _read_rgb(p, size, resize), chunk))
            first = first or arrays[0].shape
            for p, a in zip(chunk, arrays):
                if a.shape != first:
                    raise DataError(f"{p}: size {a.shape[1]}x{a.shape[0]} differs from "
                                    f"{first[1]}x{first[0]} of the other images (pass a size)")
            yield rearrange(torch.from_numpy(np.stack(arrays)), "b h w c -> b c h w").contiguous()


def _sample_batches(sample_fn: SampleFn, n: int, batch_size: int, seed: int,
                    device: torch.device) -> Iterator[Tensor]:
    """Draw ``n`` samples in batches from one seeded generator; yields uint8 batches."""
    gen = torch.Generator(device=device).manual_seed(seed)
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        with torch.no_grad():
            x = _check_images(sample_fn(b, gen), b, "sample_fn")
        yield x if x.dtype == torch.uint8 else to_uint8(x)
        done += b


def _materialise(data: Dataset | Tensor, batch_size: int, max_images: int | None) -> Tensor:
    """An in-memory real set (tensor or dataset of ``[3,H,W]`` in ``[-1,1]``) as uint8."""
    if isinstance(data, Tensor):
        x = data[:max_images] if max_images else data
        x = _check_images(x, None, "real images")
        return x.cpu() if x.dtype == torch.uint8 else to_uint8(x.cpu())
    out, count = [], 0
    for item in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = item["image"] if isinstance(item, dict) else item
        x = x[0] if isinstance(x, list | tuple) else x
        x = _check_images(x, None, "real dataset")
        out.append(x.cpu() if x.dtype == torch.uint8 else to_uint8(x.cpu()))
        count += len(x)
        if max_images and count >= max_images:
            break
    if not out:
        raise DataError("the real dataset is empty")
    x = torch.cat(out)
    return x[:max_images] if max_images else x


def _extract(batches: Iterable[Tensor], extractor: FeatureExtractor, total: int,
             desc: str) -> Tensor:
    """Features ``[N,D]`` float32 (CPU) of all batches."""
    feats = []
    with tqdm(total=total, desc=desc, unit="img", leave=False, disable=None) as bar:
        for x in batches:
            feats.append(extractor(x))
            bar.update(len(x))
    return torch.cat(feats)


# ----------------------------------------------------------------------------- statistics


@dataclass
class SetStats:
    """Features and Gaussian statistics of an image set.

    Attributes:
        features: ``[N,D]`` float32 (needed for KID).
        mu: ``[D]`` float32 mean; sigma: ``[D,D]`` float64 covariance (torch-fidelity's dtypes).
        cache_hit: True when loaded from the cache instead of computed.
        key: cache key ('' for sets that are never cached).
    """

    features: Tensor
    mu: np.ndarray
    sigma: np.ndarray
    cache_hit: bool = False
    key: str = ""

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def from_features(cls, features: Tensor, **kw: Any) -> SetStats:
        if features.shape[0] < 2:
            raise DataError(f"FID needs at least 2 images per set, got {features.shape[0]}")
        st = fid_features_to_statistics(features)
        return cls(features=features, mu=st["mu"], sigma=st["sigma"], **kw)


def _set_key(extractor: FeatureExtractor, resolution: str, content_digest: bytes) -> str:
    h = hashlib.sha256()
    for part in (_CACHE_VERSION, extractor.name, extractor.identity, resolution):
        h.update(part.encode() + b"\0")
    h.update(content_digest)
    return h.hexdigest()


def _folder_key(root: Path, files: Sequence[Path], size: int | None, resize: str,
                extractor: FeatureExtractor) -> str:
    """Content key: relative names + bytes of every file, resolution, extractor identity."""
    content = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        content.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        content.update(data)
    if size is not None:
        resolution = f"{size}x{size}:{resize}"
    else:
        try:
            with Image.open(files[0]) as img:
                resolution = "{}x{}".format(*img.size)
        except OSError as e:
            raise DataError(f"cannot read image {files[0]}: {e}") from e
    return _set_key(extractor, resolution, content.digest())


def _cache_file(key: str) -> Path:
    return cache_dir() / "fid" / f"{key}.safetensors"


def _load_cached(key: str) -> SetStats | None:
    path = _cache_file(key)
    if not path.is_file():
        return None
    try:
        t = load_safetensors(path)
        return SetStats(features=t["features"], mu=t["mu"].numpy(), sigma=t["sigma"].numpy(),
                        cache_hit=True, key=key)
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
        return None


def _store_cached(stats: SetStats, meta: dict[str, str]) -> None:
    tensors = {"features": stats.features, "mu": torch.from_numpy(np.ascontiguousarray(stats.mu)),
               "sigma": torch.from_numpy(np.ascontiguousarray(stats.sigma))}
    try:
        save_safetensors(_cache_file(stats.key), tensors, metadata=meta)
    except OSError as e:
        warnings.warn(f"could not write the FID cache {_cache_file(stats.key)}: {e}",
                      RuntimeWarning, stacklevel=3)


def real_stats(real: RealSource, extractor: FeatureExtractor, *, batch_size: int = 64,
               max_images: int | None = None, size: int | None = None,
               resize: ResizeMode = "resize",
               classes: Sequence[str] | None = None, use_cache: bool = True) -> SetStats:
    """Statistics of the real set, from the content-keyed cache when possible.

    Args:
        real: a folder of images, a Dataset of ``[3,H,W]`` images in ``[-1,1]`` (or uint8), or a
            tensor ``[N,3,H,W]``.
        extractor: the feature extractor.
        batch_size: images per extractor call.
        max_images: use the first N images (sorted names / dataset order).
        size / resize: bring folder images to ``size`` x ``size`` (``resize`` or ``center_crop``).
        classes: class subfolders to use when the folder has them (e.g. ``["normal"]``).
        use_cache: read and write the cache under ``cache_dir()/fid``.
    """
    if isinstance(real, str | os.PathLike):
        root = Path(real).expanduser()
        files = list_images(root, classes=classes, max_images=max_images)
        key = _folder_key(root, files, size, resize, extractor)
        n, source = len(files), str(root)

        def batches() -> Iterator[Tensor]:
            return _folder_batches(files, batch_size, size=size, resize=resize)
    else:
        images = _materialise(real, batch_size, max_images)
        content = hashlib.sha256(images.contiguous().numpy().tobytes()).digest()
        key = _set_key(extractor, "x".join(map(str, images.shape[1:])), content)
        n, source = len(images), type(real).__name__

        def batches() -> Iterator[Tensor]:
            return (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    if use_cache and (hit := _load_cached(key)) is not None:
        return hit
    stats = SetStats.from_features(_extract(batches(), extractor, n, "real features"), key=key)
    if use_cache:
        _store_cached(stats, {"source": source, "n": str(n), "extractor": extractor.name,
                              "identity": extractor.identity, "version": _CACHE_VERSION})
    return stats


# ----------------------------------------------------------------------------- generated images


def fake_features(fake: str | os.PathLike | SampleFn, extractor: FeatureExtractor, *,
                  n: int | None = None, batch_size: int = 64, seed: int = 0,
                  size: int | None = None, resize: ResizeMode = "resize",
                  generator_device: str | torch.device | None = None) -> Tensor:
    """Features ``[N,D]`` of generated images: a folder or a :data:`SampleFn`.

    Args:
        fake: image folder (first ``n`` files when ``n`` is given) or callable (a trained run's
            sampler: see :mod:`gen_ad.app.fid`).
        extractor: the feature extractor.
        n: number of samples (required for a callable).
        batch_size: images per generator / extractor call.
        seed: seed of the generator handed to the sampler (one generator for all batches).
        size / resize: bring folder images to ``size`` x ``size``.
        generator_device: device of that generator (default: the extractor's device).
    """
    if isinstance(fake, str | os.PathLike):
        files = list_images(fake, max_images=n)
        batches = _folder_batches(files, batch_size, size=size, resize=resize)
        return _extract(batches, extractor, len(files), "fake features")
    gen_dev = torch.device(generator_device) if generator_device else extractor.device
    if not callable(fake):
        raise ConfigError(f"fake must be a folder or a callable, got {fake!r}")
    if n is None or n < 2:
        raise ConfigError(f"the number of generated samples must be >= 2, got {n}")
    batches = _sample_batches(fake, n, batch_size, seed, device=gen_dev)
    return _extract(batches, extractor, n, "fake features")


# ----------------------------------------------------------------------------- distances


def frechet_distance(a: SetStats, b: SetStats) -> float:
    """Fréchet distance between the Gaussians of two sets (torch-fidelity's formula)."""
    if a.mu.shape != b.mu.shape:
        raise DataError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma},
                                   {"mu": b.mu, "sigma": b.sigma}, False)
    return float(out["frechet_inception_distance"])


def kernel_distance(f1: Tensor, f2: Tensor, *, subset_size: int | None = None,
                    subsets: int = KID_SUBSETS, seed: int = KID_SEED) -> tuple[float, float, int]:
    """KID (polynomial-kernel MMD², unbiased) over random subsets, as torch-fidelity computes it.

    Args:
        f1, f2: features ``[N1,D]`` and ``[N2,D]``.
        subset_size: images per subset (default ``min(1000, N1, N2)``, so small sets work).
        subsets: number of subsets; seed: their sampling seed (torch-fidelity's default 2020).
    Returns:
        ``(mean, std, subset_size)``; ``std`` is NaN when every subset is the whole of both sets
        (equal sets of at most the subset size): the subsets then cannot vary, and a spread of
        0 would read as certainty.
    """
    m = subset_size or min(KID_SUBSET_SIZE, len(f1), len(f2))
    if m < 2 or m > min(len(f1), len(f2)):
        raise DataError(f"KID subset size {m} must be in [2, {min(len(f1), len(f2))}] "
                        f"(sets of {len(f1)} and {len(f2)} images)")
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=m, rng_seed=seed,
                                 verbose=False)
    whole = m == len(f1) == len(f2)
    std = math.nan if whole else float(out["kernel_inception_distance_std"])
    return float(out["kernel_inception_distance_mean"]), std, m


def distances(ref: SetStats, fake: Tensor, extractor: FeatureExtractor, *,
              kid: bool = False) -> dict[str, Any]:
    """The result record: ``fid`` (or ``fd_<name>``), optional KID, set sizes, extractor."""
    fake_stats = SetStats.from_features(fake)
    out: dict[str, Any] = {extractor.label: frechet_distance(ref, fake_stats)}
    if kid:
        mean, std, m = kernel_distance(ref.features, fake)
        lab = extractor.kid_label
        out.update({f"{lab}_mean": mean, f"{lab}_std": None if math.isnan(std) else std,
                    f"{lab}_subset_size": m})
    out.update(n_real=ref.n, n_fake=fake_stats.n, extractor=extractor.name,
               cache_hit=ref.cache_hit)
    return out


def compute_fid(real: RealSource, fake: str | os.PathLike | SampleFn, *, n: int | None = None,
                kid: bool = False, extractor: FeatureExtractor | None = None,
                inception_weights: str | os.PathLike | None = None,
                device: str | torch.device | None = None, batch_size: int = 64, seed: int = 0,
                size: int | None = None, resize: ResizeMode = "resize",
                max_real: int | None = None, use_cache: bool = True,
                inception_layer: str = "2048") -> dict[str, Any]:
    """FID (and KID) between a real set and generated images.

    Args:
        real: folder / Dataset / tensor of real images (statistics cached by content).
        fake: folder of generated images or ``sample_fn(n, generator)``.
        n: generated samples (default: as many as real images); for a folder, its first ``n``.
        kid: also compute KID.
        extractor: features to use (default: Inception-v3 from ``inception_weights``).
        device: where the extractor runs (default: CUDA when available).
        batch_size / seed: sampling and extraction batch size; generator seed.
        size / resize: bring folder images to ``size`` x ``size``.
        max_real: use only the first N real images.
        use_cache: use the real-statistics cache.
        inception_layer: Inception layer (see :func:`load_inception`); ``2048`` is FID.
    Returns:
        ``{"fid"|"fd_<name>": float, ["kid_mean", "kid_std", "kid_subset_size"], "n_real",
        "n_fake", "extractor", "cache_hit"}``.
    """
    if isinstance(real, str | os.PathLike):  # fail on empty/missing folders before loading weights
        list_images(real, max_images=max_real)
    is_folder = isinstance(fake, str | os.PathLike)
    if is_folder:
        list_images(fake, max_images=n)
    ext = extractor or load_inception(inception_weights, device=device, layer=inception_layer)
    ref = real_stats(real, ext, batch_size=batch_size, max_images=max_real, size=size,
                     resize=resize, use_cache=use_cache)
    fake_n = ref.n if n is None and not is_folder else n
    feats = fake_features(fake, ext, n=fake_n, batch_size=batch_size, seed=seed, size=size,
                          resize=resize)
    return distances(ref, feats, ext, kid=kid)


# ----------------------------------------------------------------------------- training


class FIDMonitor:
    """Periodic FID for a training loop; it warns instead of raising and never stops a run.

    Without Inception weights (offline) it warns once and returns ``None`` from then on, or, when
    ``fallback`` is given, reports that extractor's distance labelled ``fd_<name>``.

    Args:
        real: real images (folder, Dataset or tensor); their statistics are cached.
        n: generated samples per evaluation.
        size / resize / normal_classes: how folder images are read (see :func:`real_stats`).
        every: evaluate when ``step % every == 0`` (``None``: whenever called).
        kid: also compute KID. batch_size / seed / device: as in :func:`compute_fid`.
        inception_weights: explicit Inception weights file.
        extractor: use this extractor instead of Inception.
        fallback: extractor used when the Inception weights are missing.
        max_real: use only the first N real images.
        generator_device: device of the generator given to ``sample_fn`` (default: extractor's).
    """

    def __init__(self, real: RealSource, *, n: int = 1000, size: int | None = None,
                 resize: ResizeMode = "resize",
                 normal_classes: Sequence[str] | None = None, every: int | None = None,
                 kid: bool = False, batch_size: int = 64, seed: int = 0,
                 device: str | torch.device | None = None,
                 inception_weights: str | os.PathLike | None = None,
                 extractor: FeatureExtractor | None = None,
                 fallback: FeatureExtractor | None = None, max_real: int | None = None,
                 generator_device: str | torch.device | None = None) -> None:
        self.real, self.n, self.size, self.resize = real, n, size, resize
        self.classes = list(normal_classes) if normal_classes else None
        self.every, self.kid, self.batch_size, self.seed = every, kid, batch_size, seed
        self.device, self.weights, self.max_real = device, inception_weights, max_real
        self.generator_device = generator_device
        self._primary, self._fallback = extractor, fallback
        self._extractor: FeatureExtractor | None = None
        self._ref: SetStats | None = None
        self.disabled_reason: str | None = None

    def maybe_compute(self, step: int, sample_fn: SampleFn) -> dict[str, Any] | None:
        """Evaluate at this step if it is due; ``None`` when not due, disabled or failed."""
        if self.every and step % self.every != 0:
            return None
        return self.compute(step, sample_fn)

    def compute(self, step: int, sample_fn: SampleFn) -> dict[str, Any] | None:
        """Evaluate now: ``{"fid"|"fd_<name>", ..., "seconds"}`` or ``None`` (with a warning)."""
        if self.disabled_reason is not None or not self._prepare():
            return None
        assert self._extractor is not None and self._ref is not None
        t0 = time.perf_counter()
        try:
            feats = fake_features(sample_fn, self._extractor, n=self.n,
                                  batch_size=self.batch_size, seed=self.seed,
                                  generator_device=self.generator_device)
            out = distances(self._ref, feats, self._extractor, kid=self.kid)
        except Exception as e:  # noqa: BLE001 - an evaluation must never stop training
            warnings.warn(f"FID at step {step} failed ({type(e).__name__}: {e}); training "
                          "continues", RuntimeWarning, stacklevel=2)
            return None
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    def _prepare(self) -> bool:
        """Load the extractor and the real statistics once; on failure warn once and disable."""
        if self._ref is not None:
            return True
        try:
            if self._extractor is None:
                self._extractor = self._primary or self._load_inception_or_fallback()
            if self._extractor is None:
                return False
            self._ref = real_stats(self.real, self._extractor, batch_size=self.batch_size,
                                   max_images=self.max_real, size=self.size,
                                   resize=self.resize, classes=self.classes)
        except Exception as e:  # noqa: BLE001 - disable the monitor, keep training
            self._disable(f"{type(e).__name__}: {e}")
            return False
        return True

    def _load_inception_or_fallback(self) -> FeatureExtractor | None:
        try:
            return load_inception(self.weights, device=self.device)
        except GenAdError as e:
            if self._fallback is None:
                self._disable(str(e))
                return None
            warnings.warn(f"{e}; reporting '{self._fallback.label}' (not FID) instead",
                          RuntimeWarning, stacklevel=4)
            return self._fallback

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        warnings.warn(f"periodic FID disabled for this run: {reason}", RuntimeWarning,
                      stacklevel=4)
