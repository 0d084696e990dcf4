"""Feature extractors for FID/KID: torch-fidelity's Inception-v3 with offline-safe weights.

:func:`load_inception` builds torch-fidelity's Inception-v3 (``inception-v3-compat``; pool 2048-d
or the cheaper 64/192/768 layers) with weights read ``weights_only=True``; a random-initialised
one (tests, benchmarks) is labelled ``inception-v3-random`` and never ``fid``, and so is a weights
file that is not a known FID Inception (by sha256, see :func:`is_known_inception`), labelled
``inception-v3-custom`` with a warning. Weights are found
at an explicit path, then as installed by ``gen-ad weights install``
(``gen_ad-fid-inception.safetensors``, see :mod:`gen_ad.weights.registry`), then in the torch
hub cache (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``), then
downloaded from torch-fidelity's release URL unless ``GEN_AD_OFFLINE`` / ``HF_HUB_OFFLINE`` is
set; when none works, :class:`~gen_ad.errors.WeightsNotFoundError` says how to install the file.
Any other feature function becomes an extractor with :func:`custom_extractor` (``fd_<name>``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from gen_ad.errors import CheckpointError, ConfigError, DataError, WeightsNotFoundError
from gen_ad.utils.download import download_file, hash_prefix_of, offline
from gen_ad.utils.io import check_state_dict, sha256_file, torch_load

FeatureFn = Callable[[Tensor], Tensor]
"""``features(x) -> [B,D]`` for uint8 images ``x`` of shape ``[B,3,H,W]``."""

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_RANDOM_NAME = "inception-v3-random"
INCEPTION_CUSTOM_NAME = "inception-v3-custom"
INCEPTION_LAYERS = ("64", "192", "768", "2048")
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
_INCEPTION_SHA256_PREFIX = hash_prefix_of(INCEPTION_FILE) or ""
# sha256 prefixes of weights files that are the real FID Inception (torch hub file names carry
# the first 8 hex digits of the file's sha256); the installed safetensors is known by the
# registry's tensor digest (see :func:`weights_digests`)
_KNOWN_FILE_SHA256_PREFIXES: tuple[str, ...] = (_INCEPTION_SHA256_PREFIX,)


def to_uint8(x: Tensor) -> Tensor:
    """Convert images from ``[-1,1]`` float to uint8, the form torch-fidelity consumes.

    Args:
        x: ``[B,3,H,W]`` float in ``[-1,1]`` (values outside are clamped).
    Returns:
        ``[B,3,H,W]`` uint8, ``((x + 1) * 127.5).round().clamp(0, 255)``.
    """
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled on ``device`` (a no-op context for device types autocast lacks)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- extractors


@dataclass(frozen=True)
class FeatureExtractor:
    """A named feature function on uint8 images.

    Attributes:
        name: lowercase name (``inception-v3-compat`` for real FID).
        fn: uint8 ``[B,3,H,W]`` on ``device`` -> ``[B,D]`` features.
        identity: what the weights are (a file hash, ``random-init:...``); part of the cache key.
        device: where input batches are sent.
        is_inception: True only for torch-fidelity's Inception with real weights (labels ``fid``).
        layer: the Inception layer (``2048`` is standard FID; others are labelled ``fid_<layer>``).
    """

    name: str
    fn: FeatureFn
    identity: str
    device: torch.device
    is_inception: bool = False
    layer: str = "2048"

    def _key(self, metric: str, generic: str) -> str:
        if not self.is_inception:
            return f"{generic}_{self.name}"
        return metric if self.layer == "2048" else f"{metric}_{self.layer}"

    @property
    def label(self) -> str:
        """Result key of the Fréchet distance: ``fid`` (``fid_<layer>``) or ``fd_<name>``."""
        return self._key("fid", "fd")

    @property
    def kid_label(self) -> str:
        """Result key prefix of the kernel distance: ``kid`` (``kid_<layer>``) or ``kd_<name>``."""
        return self._key("kid", "kd")

    def __call__(self, x: Tensor) -> Tensor:
        """Features ``[B,D]`` float32 on CPU of uint8 images ``[B,3,H,W]``; autocast is off, so
        a caller inside an autocast region (a bf16 training loop) gets float32 features."""
        with torch.no_grad(), _autocast_off(self.device):
            f = self.fn(x.to(self.device, non_blocking=True))
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise DataError(f"extractor '{self.name}' must return [B,D] features, got {shape}")
        return f.float().cpu()


def custom_extractor(name: str, fn: FeatureFn, *, identity: str = "",
                     device: str | torch.device | None = None) -> FeatureExtractor:
    """Wrap any feature function; its distances are labelled ``fd_<name>`` / ``kd_<name>``.

    Args:
        name: lowercase name (letters, digits, ``-_.``), e.g. ``dino-vits16``.
        fn: uint8 ``[B,3,H,W]`` -> ``[B,D]`` (it does its own resizing/normalisation).
        identity: a string that changes whenever the weights change (cache key).
        device: where batches are sent before ``fn`` (default: CUDA when available).
    """
    ok = name and name == name.lower() and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise ConfigError("extractor name must be lowercase letters, digits or '-_.', "
                          f"got {name!r}")
    return FeatureExtractor(name=name, fn=fn, identity=identity or name,
                            device=resolve_device(device))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (default: ``cuda`` when available, else ``cpu``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


class _InceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 (same layers and forward), weights set by gen_ad.

    torch-fidelity's constructor unpickles its weights file with ``weights_only=False``. Here the
    constructor gets an in-memory empty placeholder instead, and the weights, read with
    ``weights_only=True``, are copied in afterwards by ``load_state_dict``.
    """

    def __init__(self, layer: str = "2048") -> None:
        placeholder = io.BytesIO()
        torch.save({}, placeholder)
        placeholder.seek(0)
        super().__init__(INCEPTION_NAME, [layer], feature_extractor_weights_path=placeholder)

    def load_state_dict(self, state_dict: Any, strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        if not state_dict:  # the constructor's placeholder: keep the fresh initialisation
            return _IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    """He-normal conv/linear weights (activations stay O(1) through the 94 BN+ReLU layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))


def random_inception_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A random-initialised state dict for torch-fidelity's Inception-v3 (tests, benchmarks).

    Distances computed with it are not FID; :func:`load_inception` labels them as such.
    """
    module = _InceptionV3()
    _randomise_(module, seed)
    return {k: v.clone() for k, v in module.state_dict().items()}


def inception_cache_path() -> Path:
    """Where the Inception weights are looked for: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _missing_weights_message(reason: str) -> str:
    from gen_ad.weights.registry import install_hint

    dest = inception_cache_path()
    return (f"Inception-v3 weights for FID not found ({reason}): {install_hint('fid-inception')}; "
            f"or download {INCEPTION_URL} into '{dest.parent}', or pass --inception-weights PATH")


def resolve_inception_weights(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find the Inception weights: explicit path, installed file, torch hub cache, download.

    Raises:
        WeightsNotFoundError: explicit file missing, or not cached while offline / download failed.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"Inception weights file not found: {p}")
        return p
    from gen_ad.weights.registry import find_installed

    installed = find_installed("fid-inception")  # `gen-ad weights install`
    if installed is not None:
        return installed
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    if offline():
        raise WeightsNotFoundError(_missing_weights_message("offline mode"))
    return _download_inception(cached)


def _download_inception(dest: Path) -> Path:
    """Download torch-fidelity's weights to ``dest`` (atomic, hash-checked, bounded timeout)."""
    try:
        return download_file(INCEPTION_URL, dest, _INCEPTION_SHA256_PREFIX)
    except OSError as e:  # URLError, timeouts and hash mismatch
        raise WeightsNotFoundError(_missing_weights_message(f"download failed: {e}")) from e


@dataclass(frozen=True)
class WeightsDigests:
    """What a weights file is.

    Attributes:
        file: sha256 of the file's bytes.
        tensors: for a safetensors file, the sha256 of its tensors (name, dtype, shape and
            bytes, in name order), which the metadata does not change: safetensors writes the
            metadata in an arbitrary order, so one conversion gives files of different sha256.
            ``None`` for other files.
    """

    file: str
    tensors: str | None = None


def _feed_range(f: IO[bytes], n: int, sha: Any) -> None:
    """Feed the next ``n`` bytes of ``f`` into ``sha`` in 1 MiB chunks."""
    while n > 0:
        chunk = f.read(min(1 << 20, n))
        if not chunk:
            break
        sha.update(chunk)
        n -= len(chunk)


def _tensors_sha256(f: IO[bytes]) -> str | None:
    """The tensor digest of an open safetensors file (``None`` when it is not one)."""
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        names = sorted(k for k in header if k != "__metadata__")
        sha = hashlib.sha256()
        for name in names:
            t = header[name]
            start, end = t["data_offsets"]
            sha.update(json.dumps([name, t["dtype"], t["shape"]]).encode() + b"\0")
            f.seek(8 + n + start)
            _feed_range(f, end - start, sha)
    except (struct.error, ValueError, TypeError, KeyError, OSError, MemoryError):
        return None
    return sha.hexdigest()


def weights_digests(path: str | os.PathLike[str]) -> WeightsDigests:
    """:class:`WeightsDigests` of a weights file, streamed once per process and file (cached by
    resolved path, size and modification time)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _digests(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digests(path: str, size: int, mtime_ns: int) -> WeightsDigests:
    """:func:`weights_digests` of one version of a file (``size``/``mtime_ns`` key the cache)."""
    tensors = None
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            tensors = _tensors_sha256(f)
    return WeightsDigests(sha256_file(path), tensors)


def is_known_inception(digests: WeightsDigests) -> bool:
    """True for the real FID Inception: torch-fidelity's file (sha256 prefix in its name) or the
    safetensors that ``gen-ad weights install`` writes (tensor digest in the registry)."""
    from gen_ad.weights.registry import get_weight_spec

    if digests.file.startswith(_KNOWN_FILE_SHA256_PREFIXES):
        return True
    installed = get_weight_spec("fid-inception").installed_sha256
    return digests.tensors is not None and digests.tensors == installed


def _weights_name(path: Path, digests: WeightsDigests) -> str:
    """``inception-v3-compat`` for known weights, else ``inception-v3-custom`` with a warning."""
    if is_known_inception(digests):
        return INCEPTION_NAME
    warnings.warn(f"Inception weights {path} (sha256 {digests.file[:12]}...) are not a known FID "
                  f"Inception ({INCEPTION_FILE} or the installed gen_ad-fid-inception.safetensors)"
                  f": distances are labelled fd_{INCEPTION_CUSTOM_NAME}, not FID",
                  RuntimeWarning, stacklevel=3)
    return INCEPTION_CUSTOM_NAME


def _read_inception_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch_load(path)  # weights_only: a pickle of objects is refused, one line
    except Exception as e:  # noqa: BLE001 - any unreadable/unsafe file is the same user error
        raise CheckpointError(f"cannot read Inception weights {path} (expected a state dict of "
                              f"tensors, loadable with weights_only=True): {e}") from e
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return sd


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Copy a weights-only state dict into ``module``; mismatches name the offending keys."""
    sd = _read_inception_state_dict(path)
    check_state_dict(sd, module.state_dict(),
                     f"{path} does not match torch-fidelity's Inception-v3")
    module.load_state_dict(sd)


def load_inception(weights: str | os.PathLike[str] | None = None, *,
                   device: str | torch.device | None = None, random_init: bool = False,
                   seed: int = 0, layer: str = "2048") -> FeatureExtractor:
    """torch-fidelity's Inception-v3 pool features (2048-d) as a :class:`FeatureExtractor`.

    Args:
        weights: explicit weights file; ``None`` searches the cache / downloads (see module doc).
            A file that is not a known FID Inception is labelled ``inception-v3-custom``.
        device: where to run it (default: CUDA when available).
        random_init: build it with random weights (labelled ``inception-v3-random``, not FID).
        seed: seed of the random initialisation.
        layer: ``2048`` (FID), or ``64``/``192``/``768`` (torch-fidelity's ``feature_layer_fid``;
            labelled ``fid_<layer>``; much cheaper, e.g. for tests).
    Raises:
        WeightsNotFoundError: weights unavailable offline. CheckpointError: unreadable/mismatched.
    """
    dev = resolve_device(device)
    if layer not in INCEPTION_LAYERS:
        raise ConfigError(f"Inception layer must be one of {', '.join(INCEPTION_LAYERS)}, "
                          f"got {layer!r}")
    path = None if random_init else resolve_inception_weights(weights)
    module = _InceptionV3(layer)
    if path is None:
        _randomise_(module, seed)
        name, identity = INCEPTION_RANDOM_NAME, f"random-init:{seed}:torch={torch.__version__}"
    else:
        _load_weights(module, path)
        digests = weights_digests(path)
        name, identity = _weights_name(path, digests), f"sha256:{digests.file}"
    module = module.to(dev).eval()

    def features(x: Tensor) -> Tensor:
        return module(x)[0]

    known = name == INCEPTION_NAME
    if layer != "2048":
        name = name if known else f"{name}-{layer}"
        identity = f"{identity}:layer={layer}"
    return FeatureExtractor(name=name, fn=features, identity=identity, device=dev,
                            is_inception=known, layer=layer)
