"""LPIPS (Zhang et al. 2018) built offline.

``lpips.LPIPS(pretrained=True)`` asks torchvision for ImageNet weights, which downloads them. Here
the trunk is always built randomly initialised and its weights are loaded by us from, in order:

1. an explicit local file (``weights=``),
2. the torch hub cache: ``$TORCH_HOME/hub/checkpoints/<file>`` (e.g. ``vgg16-397923af.pth``),
3. a download into that cache, only when online (skipped when ``HF_HUB_OFFLINE=1`` or
   ``GEN_AD_OFFLINE=1``).

When none works a :class:`~gen_ad.errors.WeightsNotFoundError` names the exact file and directory.
The calibrated linear heads ship inside the ``lpips`` pip package and are loaded from there with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch

from gen_ad.errors import WeightsNotFoundError

# Trunk name -> (torchvision checkpoint file, download URL).
_TRUNKS: dict[str, tuple[str, str]] = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth",
             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth",
                "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def trunk_file(net: str) -> Path:
    """Where the ImageNet weights of LPIPS trunk ``net`` are looked for in the torch hub cache."""
    if net not in _TRUNKS:
        raise ValueError(f"unknown LPIPS trunk '{net}' (known: {', '.join(_TRUNKS)})")
    return Path(torch.hub.get_dir()) / "checkpoints" / _TRUNKS[net][0]


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "GEN_AD_OFFLINE"))


def _load_trunk_state(net: str, weights: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    """The torchvision state dict of the trunk (``features.<i>.*``), looked up offline first."""
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise WeightsNotFoundError(f"LPIPS trunk weights not found at the given path {p}")
        return torch.load(p, map_location="cpu", weights_only=True)
    cached = trunk_file(net)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    why = "offline mode is set (HF_HUB_OFFLINE/GEN_AD_OFFLINE)"
    if not _offline():
        try:
            return torch.hub.load_state_dict_from_url(
                _TRUNKS[net][1], model_dir=str(cached.parent), map_location="cpu",
                progress=False, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any network failure means "not available"
            why = f"download failed ({type(e).__name__})"
    raise WeightsNotFoundError(
        f"LPIPS needs the torchvision ImageNet weights '{cached.name}' and {why}: put the file at "
        f"{cached} (directory {cached.parent}; set TORCH_HOME to move it) or pass an explicit path")


def _remap_trunk(model: lpips.LPIPS, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ``features.<i>.*`` keys onto LPIPS's ``net.slice<k>.<i>.*`` keys."""
    where: dict[str, str] = {}
    for name, _ in model.net.named_children():
        for idx, _m in getattr(model.net, name).named_children():
            where[idx] = f"net.{name}.{idx}"
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in where:
            out[f"{where[parts[1]]}.{parts[2]}"] = value
    return out


def build_lpips(net: str = "vgg", spatial: bool = False,
                weights: str | os.PathLike[str] | None = None,
                random_init: bool = False) -> lpips.LPIPS:
    """An LPIPS metric (v0.1) without touching the network unless weights are missing and online.

    Args:
        net: trunk, ``vgg`` (default, as the StyleGAN2 projector), ``alex`` or ``squeeze``.
        spatial: return per-pixel maps ``[B,1,H,W]`` instead of ``[B,1,1,1]``.
        weights: explicit path of the torchvision ImageNet checkpoint of the trunk.
        random_init: keep the trunk randomly initialised (tests; no file needed). The calibrated
            linear heads are still loaded from the ``lpips`` package so distances stay >= 0.
    Returns:
        The module in eval mode with all parameters frozen. Call it as ``m(x, y)`` on images in
        ``[-1,1]``.
    Raises:
        WeightsNotFoundError: the trunk weights are not available offline (message names the file).
    """
    if net not in _TRUNKS:
        raise ValueError(f"unknown LPIPS trunk '{net}' (known: {', '.join(_TRUNKS)})")
    state = None if random_init else _load_trunk_state(net, weights)  # fail before building
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", spatial=spatial,
                            pnet_rand=True, verbose=False)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    model.load_state_dict(torch.load(lin_path, map_location="cpu", weights_only=True),
                          strict=False)
    if state is not None:
        trunk = _remap_trunk(model, state)
        expected = {k for k in model.state_dict() if k.startswith("net.")}
        if set(trunk) != expected:
            raise WeightsNotFoundError(
                f"LPIPS trunk weights for '{net}' do not match torchvision's layout "
                f"(missing: {sorted(expected - set(trunk))[:3]})")
        model.load_state_dict(trunk, strict=False)
    model.eval().requires_grad_(False)
    return model
