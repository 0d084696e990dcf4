"""Frozen ImageNet / FID networks as KNN backbones, with weights from ``gen-ad weights install``.

Both expose ``forward_features(x) -> [B, D]`` on images already in ``[0,1]`` (the extractor's
``preprocess`` has resized/normalised them as its spec says), so
:class:`~gen_ad.baselines.extractors.FeatureExtractor` treats them like the timm backbones.

- :class:`VGG16Conv45`: torchvision VGG16 ``features`` (ImageNet, from the ``lpips-vgg16`` file).
  Embedding: global average pools of relu4_3 (512 channels, 28x28 at 224 px) and relu5_3 (512,
  14x14), each L2-normalised, concatenated: 1024-d. Why these layers: they are the deepest
  *convolutional* features, texture- and structure-level descriptors whose receptive fields
  (~100-200 px) cover a patch, while the fully-connected layers above them are tuned to ImageNet's
  object classes; mid-to-high conv layers are also what PatchCore-style anomaly detectors pool.
  Per-layer normalisation keeps one layer from dominating the Euclidean KNN distance.
- :class:`InceptionPool3`: torch-fidelity's FID Inception (from ``fid-inception``), pool3 2048-d,
  on the same uint8 input path as FID (it resizes to 299 px itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_ad.metrics.inception import _InceptionV3

VGG_RELU4_3, VGG_RELU5_3 = 22, 29  # indices in torchvision's vgg16().features


class VGG16Conv45(nn.Module):
    """VGG16 conv trunk up to relu5_3; ``forward_features``: ``[B,3,H,W]`` -> ``[B,1024]``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg16().features (same modules and keys) without building the classifier
        self.features = make_layers(cfgs["D"])[:VGG_RELU5_3 + 1]

    def forward_features(self, x: Tensor) -> Tensor:
        """ImageNet-normalised images -> GAP(relu4_3) ++ GAP(relu5_3), each unit-norm."""
        pooled = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (VGG_RELU4_3, VGG_RELU5_3):
                pooled.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1))
        return torch.cat(pooled, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)


class InceptionPool3(_InceptionV3):
    """FID Inception; ``forward_features``: ``[B,3,H,W]`` in ``[0,1]`` -> pool3 ``[B,2048]``."""

    def __init__(self) -> None:
        super().__init__("2048")

    def forward_features(self, x: Tensor) -> Tensor:
        """Quantise to uint8 exactly as FID does, then torch-fidelity's forward (pool3)."""
        u8 = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return super().forward(u8)[0]


def create_pretrained_backbone(arch: str) -> nn.Module:
    """The (randomly initialised) module for a ``gen_ad:<name>`` architecture."""
    builders = {"gen_ad:vgg16-conv45": VGG16Conv45, "gen_ad:inception-pool3": InceptionPool3}
    if arch not in builders:
        raise ValueError(f"unknown gen_ad backbone '{arch}' (known: {', '.join(builders)})")
    return builders[arch]()
