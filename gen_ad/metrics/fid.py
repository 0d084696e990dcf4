"""FID and KID of generated images against a real image set, through torch-fidelity.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium"): the Fréchet distance between Gaussians fitted to the Inception features of the two
sets, ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``. KID (Bińkowski et al. 2018,
"Demystifying MMD GANs"): the unbiased estimate of the squared maximum mean discrepancy between
the feature sets under the cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3``, averaged over
random subsets; unlike FID it is unbiased, so it suits small sets.

Features come from torch-fidelity's Inception-v3 (``inception-v3-compat``, the 2048-d pool layer),
which takes uint8 ``[B,3,H,W]`` at any resolution and resizes to 299x299 itself (TF1-compatible
bilinear). Folders and generators are fed the same way: decoded files as uint8, and generator
samples in ``[-1,1]`` converted with :func:`~gen_ad.metrics.inception.to_uint8`. Statistics and
distances are torch-fidelity's own functions, so a folder-vs-folder FID equals
``torch_fidelity.calculate_metrics``.

The real set's features and statistics are cached under ``cache_dir()/fid`` as safetensors, keyed by
the content of the set (relative file list + bytes, or the pixels of an in-memory set), the
resolution, an optional per-image transform (a run's stain normalisation: :func:`stain_transform`),
the extractor (name + weights hash), torch-fidelity's and Pillow's versions and the device type
the features run on (TF32 on CUDA, float32 on CPU). A capped real set is a seeded random choice of
the sorted files, not the first ones. Any other feature extractor can be plugged in
with :func:`~gen_ad.metrics.inception.custom_extractor`; its results are labelled ``fd_<name>`` /
``kd_<name>_*``, never ``fid``/``kid``. A random-initialised Inception is labelled
``fd_inception-v3-random``, Inception weights that are not a known FID Inception
``fd_inception-v3-custom``, and the cheaper Inception layers 64/192/768 (torch-fidelity's
``feature_layer_fid``) ``fid_<layer>``.

Inception weights are found as :mod:`gen_ad.metrics.inception` describes (explicit path, torch
hub cache, download unless offline), which also holds the extractors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL
import torch
import torch_fidelity
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from tqdm import tqdm

from gen_ad.data.folders import (
    DECODER_VERSION,
    IMAGE_EXTENSIONS,
    MASK_FOLDER,
    SYNTH_SHEET_NAME,
    ResizeMode,
    fit_size,
    read_rgb,
    subset_indices,
    walk_images,
)
from gen_ad.errors import ConfigError, DataError, GenAdError
from gen_ad.metrics.inception import FeatureExtractor, load_inception, to_uint8
from gen_ad.utils.io import load_safetensors, save_safetensors
from gen_ad.utils.paths import cache_dir

if TYPE_CHECKING:
    from gen_ad.data.stain import StainNormalizer

SampleFn = Callable[[int, torch.Generator], Tensor]
"""``sample_fn(n, generator) -> [n,3,H,W]`` float images in ``[-1,1]``."""
RealSource = str | os.PathLike[str] | Dataset | Tensor

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed
_CACHE_VERSION = "2"  # 2: library versions, device type and image transform in the key
SUBSET_SEED = 0  # seed of a capped real set's random choice of files


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


# ----------------------------------------------------------------------------- image transforms


@dataclass(frozen=True)
class ImageTransform:
    """A per-image map of uint8 ``[H,W,3]`` arrays applied to real images after decoding and
    resizing, as training applies it (e.g. a run's stain normalisation).

    Attributes:
        fn: uint8 ``[H,W,3]`` -> uint8 ``[H,W,3]`` of the same shape.
        identity: what the map is (part of the real-statistics cache key).
    """

    fn: Callable[[np.ndarray], np.ndarray]
    identity: str

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        out = self.fn(rgb)
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != rgb.shape:
            got = (out.dtype, out.shape) if isinstance(out, np.ndarray) else type(out).__name__
            raise DataError(f"image transform '{self.identity}' must return uint8 "
                            f"{rgb.shape}, got {got}")
        return out


def stain_transform(normalizer: StainNormalizer,
                    reference: str | os.PathLike[str]) -> ImageTransform:
    """A stain normaliser (:class:`~gen_ad.data.stain.StainNormalizer`) fitted on ``reference``
    as an :class:`ImageTransform`, identified by
    :func:`~gen_ad.data.stain.cache_settings` (method, reference path + sha256, min tissue,
    algorithm and torchstain versions)."""
    from gen_ad.data.stain import cache_settings

    settings = cache_settings(normalizer, reference)
    return ImageTransform(normalizer, "stain:" + json.dumps(settings, sort_keys=True))


def _apply_transform(batch: Tensor, transform: ImageTransform | None) -> Tensor:
    """``transform`` on each uint8 image of ``[B,3,H,W]`` (in this thread: a stain normaliser
    changes process-wide warning filters, which threads would race on)."""
    if transform is None:
        return batch
    hwc = rearrange(batch, "b c h w -> b h w c").numpy()
    out = np.stack([transform(np.ascontiguousarray(a)) for a in hwc])
    return rearrange(torch.from_numpy(out), "b h w c -> b c h w").contiguous()


# ----------------------------------------------------------------------------- image sources


def list_images(folder: str | os.PathLike[str], *, classes: Sequence[str] | None = None,
                max_images: int | None = None, seed: int = SUBSET_SEED) -> list[Path]:
    """Image files under ``folder`` (recursive, as a patch folder lists them: hidden files
    skipped, linked folders read once; at the top level, ``gen-ad synth``'s ``masks/`` and
    contact sheet are not images of the set), sorted by relative path.

    Args:
        folder: directory of images.
        classes: if ``folder`` has subfolders with these names, only those are used.
        max_images: keep N of them, a seeded random choice (in sorted order), so that tiles
            named by slide do not make the first slides stand for the whole folder.
        seed: seed of that choice (the same as :func:`gen_ad.data.folders.subset`'s).
    Raises:
        DataError: not a directory, or no images found.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    roots = [root / c for c in classes or [] if (root / c).is_dir()] or [root]
    files = [p for r in roots for p in walk_images(r) if not _beside_the_set(p, root)]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise DataError(f"no images ({exts}) found in {root}")
    if not max_images or max_images >= len(files):
        return files
    return [files[i] for i in subset_indices(len(files), max_images, seed)]


def _beside_the_set(path: Path, root: Path) -> bool:
    """``path`` is a ground-truth mask (``root/masks/...``) or ``gen-ad synth``'s contact sheet."""
    parts = path.relative_to(root).parts
    return (len(parts) > 1 and parts[0] == MASK_FOLDER) or parts == (SYNTH_SHEET_NAME,)


def _read_rgb(path: Path, size: int | None, resize: ResizeMode) -> np.ndarray:
    """One image as RGB uint8 ``[H,W,3]`` (the training pipeline's decoding and resizing)."""
    rgb = read_rgb(path)
    return rgb if size is None else fit_size(rgb, size, resize)


def _folder_batches(files: Sequence[Path], batch_size: int, *, size: int | None = None,
                    resize: ResizeMode = "resize", threads: int = 4,
                    transform: ImageTransform | None = None) -> Iterator[Tensor]:
    """Decode files (in threads) into uint8 batches ``[B,3,H,W]``; all must share one size.
    ``transform`` follows decoding and resizing, as in training (decode, fit_size, stain)."""
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
            batch = rearrange(torch.from_numpy(np.stack(arrays)), "b h w c -> b c h w")
            yield _apply_transform(batch.contiguous(), transform)


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


def _runtime_identity(extractor: FeatureExtractor) -> str:
    """What else changes the features: torch-fidelity (its Inception and resizing), Pillow (the
    bicubic resizing of real images) and the device type (TF32 convolutions on CUDA)."""
    return (f"torch-fidelity={torch_fidelity.__version__};pillow={PIL.__version__};"
            f"device={extractor.device.type}")


def _set_key(extractor: FeatureExtractor, resolution: str, content_digest: bytes,
             transform: ImageTransform | None = None) -> str:
    h = hashlib.sha256()
    for part in (_CACHE_VERSION, f"decoder {DECODER_VERSION}", extractor.name,
                 extractor.identity, resolution, _runtime_identity(extractor),
                 transform.identity if transform else ""):
        h.update(part.encode() + b"\0")
    h.update(content_digest)
    return h.hexdigest()


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a given file outside the folder: its full path names it
        return path.as_posix()


def _folder_key(root: Path, files: Sequence[Path], size: int | None, resize: str,
                extractor: FeatureExtractor, transform: ImageTransform | None = None) -> str:
    """Content key: relative names + bytes of every file, resolution, transform, extractor."""
    content = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        content.update(f"{_relative_name(p, root)}\0{len(data)}\0".encode())
        content.update(data)
    if size is not None:
        resolution = f"{size}x{size}:{resize}"
    else:
        try:
            with Image.open(files[0]) as img:
                resolution = "{}x{}".format(*img.size)
        except OSError as e:
            raise DataError(f"cannot read image {files[0]}: {e}") from e
    return _set_key(extractor, resolution, content.digest(), transform)


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


@dataclass
class _RealSource:
    """A real set ready to extract: cache key, size, a name, and its uint8 batches."""

    key: str
    n: int
    name: str
    batches: Callable[[], Iterator[Tensor]]


def _folder_source(root: Path, files: Sequence[Path], extractor: FeatureExtractor, *,
                   batch_size: int, size: int | None, resize: ResizeMode,
                   transform: ImageTransform | None) -> _RealSource:
    if not files:
        raise DataError(f"no real images given from {root}")
    key = _folder_key(root, files, size, resize, extractor, transform)
    return _RealSource(key, len(files), str(root), lambda: _folder_batches(
        files, batch_size, size=size, resize=resize, transform=transform))


def _memory_source(real: Dataset | Tensor, extractor: FeatureExtractor, *, batch_size: int,
                   max_images: int | None, transform: ImageTransform | None) -> _RealSource:
    images = _materialise(real, batch_size, max_images)
    content = hashlib.sha256(images.contiguous().numpy().tobytes()).digest()
    key = _set_key(extractor, "x".join(map(str, images.shape[1:])), content, transform)

    def batches() -> Iterator[Tensor]:
        return (_apply_transform(images[i:i + batch_size], transform)
                for i in range(0, len(images), batch_size))

    return _RealSource(key, len(images), type(real).__name__, batches)


def real_stats(real: RealSource, extractor: FeatureExtractor, *, batch_size: int = 64,
               max_images: int | None = None, size: int | None = None,
               resize: ResizeMode = "resize",
               classes: Sequence[str] | None = None, use_cache: bool = True,
               transform: ImageTransform | None = None,
               files: Sequence[str | os.PathLike[str]] | None = None) -> SetStats:
    """Statistics of the real set, from the content-keyed cache when possible.

    Args:
        real: a folder of images, a Dataset of ``[3,H,W]`` images in ``[-1,1]`` (or uint8), or a
            tensor ``[N,3,H,W]``.
        extractor: the feature extractor.
        batch_size: images per extractor call.
        max_images: use N images: of a folder, a seeded random choice of its sorted files; of
            an in-memory set, its first N.
        size / resize: bring folder images to ``size`` x ``size`` (``resize`` or ``center_crop``).
        classes: class subfolders to use when the folder has them (e.g. ``["normal"]``).
        use_cache: read and write the cache under ``cache_dir()/fid``.
        transform: per-image uint8 map after reading and resizing (a run's stain normalisation,
            :func:`stain_transform`); its identity is part of the cache key.
        files: for a folder, exactly these image files of it (e.g. a validation subset) instead
            of listing it (``classes`` and ``max_images`` then do not apply).
    """
    if isinstance(real, str | os.PathLike):
        root = Path(real).expanduser()
        chosen = ([Path(f) for f in files] if files is not None
                  else list_images(root, classes=classes, max_images=max_images))
        src = _folder_source(root, chosen, extractor, batch_size=batch_size, size=size,
                             resize=resize, transform=transform)
    elif files is not None:
        raise ConfigError("real_stats: 'files' needs the real set to be a folder")
    else:
        src = _memory_source(real, extractor, batch_size=batch_size, max_images=max_images,
                             transform=transform)
    if use_cache and (hit := _load_cached(src.key)) is not None:
        return hit
    feats = _extract(src.batches(), extractor, src.n, "real features")
    stats = SetStats.from_features(feats, key=src.key)
    if use_cache:
        _store_cached(stats, {"source": src.name, "n": str(src.n), "extractor": extractor.name,
                              "identity": extractor.identity, "version": _CACHE_VERSION,
                              "runtime": _runtime_identity(extractor),
                              "transform": transform.identity if transform else ""})
    return stats


# ----------------------------------------------------------------------------- generated images


def fake_features(fake: str | os.PathLike[str] | SampleFn, extractor: FeatureExtractor, *,
                  n: int | None = None, batch_size: int = 64, seed: int = 0,
                  size: int | None = None, resize: ResizeMode = "resize",
                  generator_device: str | torch.device | None = None) -> Tensor:
    """Features ``[N,D]`` of generated images: a folder or a :data:`SampleFn`.

    Args:
        fake: image folder (a seeded random ``n`` of its files when ``n`` is given, as for a
            real folder: the first ``n`` sorted names may all come from one source) or callable
            (a trained run's sampler: see :mod:`gen_ad.app.fid`).
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
    """Fréchet distance between the Gaussians of two sets (Heusel et al. 2017; torch-fidelity's
    implementation): ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, ``>= 0``."""
    if a.mu.shape != b.mu.shape:
        raise DataError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma},
                                   {"mu": b.mu, "sigma": b.sigma}, False)
    return float(out["frechet_inception_distance"])


def kernel_distance(f1: Tensor, f2: Tensor, *, subset_size: int | None = None,
                    subsets: int = KID_SUBSETS, seed: int = KID_SEED) -> tuple[float, float, int]:
    """KID (Bińkowski et al. 2018): unbiased MMD² under the kernel ``(a.b / d + 1)^3``, over
    random subsets, as torch-fidelity computes it.

    Args:
        f1, f2: features ``[N1,D]`` and ``[N2,D]``.
        subset_size: images per subset (default ``min(1000, N1, N2)``, so small sets work).
        subsets: number of subsets (one when every subset is both whole sets); seed: their
            sampling seed (torch-fidelity's default 2020).
    Returns:
        ``(mean, std, subset_size)``; ``std`` is NaN when every subset is the whole of both sets
        (equal sets of at most the subset size): the subsets then cannot vary, and a spread of
        0 would read as certainty.
    """
    m = subset_size or min(KID_SUBSET_SIZE, len(f1), len(f2))
    if m < 2 or m > min(len(f1), len(f2)):
        raise DataError(f"KID subset size {m} must be in [2, {min(len(f1), len(f2))}] "
                        f"(sets of {len(f1)} and {len(f2)} images)")
    whole = m == len(f1) == len(f2)  # every subset would be both whole sets: compute it once
    out = kid_features_to_metric(f1, f2, kid_subsets=1 if whole else subsets, kid_subset_size=m,
                                 rng_seed=seed, verbose=False)
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


def compute_fid(real: RealSource, fake: str | os.PathLike[str] | SampleFn, *, n: int | None = None,
                kid: bool = False, extractor: FeatureExtractor | None = None,
                inception_weights: str | os.PathLike[str] | None = None,
                device: str | torch.device | None = None, batch_size: int = 64, seed: int = 0,
                size: int | None = None, resize: ResizeMode = "resize",
                max_real: int | None = None, use_cache: bool = True,
                inception_layer: str = "2048",
                transform: ImageTransform | None = None) -> dict[str, Any]:
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
        max_real: use only N real images (a seeded random choice).
        use_cache: use the real-statistics cache.
        inception_layer: Inception layer (see :func:`load_inception`); ``2048`` is FID.
        transform: per-image map of the real images after resizing (a run's stain
            normalisation, :func:`stain_transform`).
    Returns:
        ``{"fid"|"fd_<name>": float, ["kid_mean", "kid_std", "kid_subset_size"], "n_real",
        "n_fake", "extractor", "cache_hit"}``, and for a sampler ``"sampling": {"seed",
        "batch_size"}``: a plain sampler draws one batch per call, so another batch size draws
        another sample set (and another FID); a run's sampler in ``gen-ad fid`` and the
        benchmark (:func:`gen_ad.app.fid.run_images`) does not.
    """
    if isinstance(real, str | os.PathLike):  # fail on empty/missing folders before loading weights
        list_images(real, max_images=max_real)
    is_folder = isinstance(fake, str | os.PathLike)
    if is_folder:
        list_images(fake)
    ext = extractor or load_inception(inception_weights, device=device, layer=inception_layer)
    ref = real_stats(real, ext, batch_size=batch_size, max_images=max_real, size=size,
                     resize=resize, use_cache=use_cache, transform=transform)
    fake_n = ref.n if n is None and not is_folder else n
    feats = fake_features(fake, ext, n=fake_n, batch_size=batch_size, seed=seed, size=size,
                          resize=resize)
    out = distances(ref, feats, ext, kid=kid)
    if not is_folder:  # the sample set is a function of (sampler, n, seed, batch size)
        out["sampling"] = {"seed": int(seed), "batch_size": int(batch_size)}
    return out


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
        max_real: use only N real images (a seeded random choice).
        generator_device: device of the generator given to ``sample_fn`` (default: extractor's).
        transform: per-image map of the real images after resizing, as training applies it (the
            run's stain normalisation, :func:`stain_transform`).
    """

    def __init__(self, real: RealSource, *, n: int = 1000, size: int | None = None,
                 resize: ResizeMode = "resize",
                 normal_classes: Sequence[str] | None = None, every: int | None = None,
                 kid: bool = False, batch_size: int = 64, seed: int = 0,
                 device: str | torch.device | None = None,
                 inception_weights: str | os.PathLike[str] | None = None,
                 extractor: FeatureExtractor | None = None,
                 fallback: FeatureExtractor | None = None, max_real: int | None = None,
                 generator_device: str | torch.device | None = None,
                 transform: ImageTransform | None = None) -> None:
        self.real, self.n, self.size, self.resize = real, n, size, resize
        self.transform = transform
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
                                   resize=self.resize, classes=self.classes,
                                   transform=self.transform)
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
