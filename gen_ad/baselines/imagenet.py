"""Frozen ImageNet / FID networks as KNN backbones, with weights from ``gen-ad weights install``.

Both expose ``forward_features(x) -> [B, D]`` on images already in ``[0,1]`` (the extractor's
``preprocess`` has resized/normalised them as its spec says), so
:class:`~gen_ad.baselines.extractors.FeatureExtractor` treats them like the timm backbones.

- :class:`VGG16Conv234`: torchvision VGG16 ``features`` up to relu4_3 (ImageNet, from the
  ``lpips-vgg16`` file). Embedding: global average pools of relu2_2 (128 channels), relu3_3 (256)
  and relu4_3 (512), concatenated without normalisation: 896-d, at the resolution the patches are
  loaded at (the trunk is fully convolutional). Why: chosen on PCam ``valid`` (300 normal + 300
  tumour patches, bank 1000 ``train/normal``, k in {1, 5, 20, 200}, 96 and 224 px) among single
  layers relu1_2..relu5_3 and their combinations, each raw, L2-normalised or bank-standardised.
  Per-layer L2 normalisation (this extractor's first version, relu4_3 + relu5_3) threw away the
  activation magnitude, which carries most of the signal: it cost 0.06-0.22 AUROC for every
  whole-patch average pool and left that version at chance (0.53 valid). Raw mid-level pools
  (relu2_2-relu4_3) were best (valid 0.68 at 96 px, 0.67 at 224 px; test 0.71); relu1_2 alone
  scored higher still but is a colour filter bank, i.e. the colour-only baseline again. 96 px
  equalled 224 px at a fifth of the cost, hence native resolution.
- :class:`InceptionPool3`: torch-fidelity's FID Inception (from ``fid-inception``), pool3 2048-d,
  on the same uint8 input path as FID (it resizes to 299 px itself).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gen_ad.metrics.inception import _InceptionV3

VGG_RELU2_2, VGG_RELU3_3, VGG_RELU4_3 = 8, 15, 22  # indices in torchvision's vgg16().features
VGG_MIN_SIDE = 16  # relu4_3 is 1/8 of the input: 2x2 at 16 px


class VGG16Conv234(nn.Module):
    """VGG16 conv trunk up to relu4_3; ``forward_features``: ``[B,3,H,W]`` -> ``[B,896]``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg16().features[:23] (same modules and keys; conv5 and the classifier
        # are not built, their weights in the file are ignored)
        self.features = make_layers(cfgs["D"])[:VGG_RELU4_3 + 1]

    def forward_features(self, x: Tensor) -> Tensor:
        """ImageNet-normalised images (``H, W >= 16``) -> GAP(relu2_2) ++ GAP(relu3_3) ++
        GAP(relu4_3), raw (magnitudes kept: they carry the signal)."""
        if min(x.shape[-2:]) < VGG_MIN_SIDE:
            raise ValueError(f"vgg16-imagenet needs patches of at least {VGG_MIN_SIDE} px "
                             f"(relu4_3 is 1/8 of the input), got {tuple(x.shape[-2:])}")
        pooled = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (VGG_RELU2_2, VGG_RELU3_3, VGG_RELU4_3):
                pooled.append(x.float().mean(dim=(2, 3)))
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
    builders: dict[str, type[nn.Module]] = {"gen_ad:vgg16-conv234": VGG16Conv234,
                                            "gen_ad:inception-pool3": InceptionPool3}
    if arch not in builders:
        raise ValueError(f"unknown gen_ad backbone '{arch}' (known: {', '.join(builders)})")
    return builders[arch]()
