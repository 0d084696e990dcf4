"""Offline LPIPS construction: random init, cache lookup, clear error when weights are missing."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gen_ad.errors import WeightsNotFoundError
from gen_ad.inversion.lpips_net import build_lpips, trunk_file


def test_random_init_builds_offline_and_measures_distances() -> None:
    m = build_lpips("vgg", random_init=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d_same = m(x, x).flatten()
    d_diff = m(x, y).flatten()
    assert d_same.shape == (2,)
    assert torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()
    assert not any(p.requires_grad for p in m.parameters())
    spatial = build_lpips("alex", spatial=True, random_init=True)
    assert spatial(x, y).shape == (2, 1, 32, 32)


def test_missing_weights_name_the_file_and_directory() -> None:
    path = trunk_file("vgg")
    assert path.name == "vgg16-397923af.pth"
    with pytest.raises(WeightsNotFoundError) as e:
        build_lpips("vgg")
    assert "vgg16-397923af.pth" in str(e.value) and str(path.parent) in str(e.value)
    with pytest.raises(WeightsNotFoundError):
        build_lpips("vgg", weights="/nonexistent/vgg16.pth")


def test_trunk_loaded_from_torch_home_cache() -> None:
    # AlexNet keeps the cache file small; the lookup logic is the same for every trunk.
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items()
             if k.startswith("features.")}
    path = trunk_file("alex")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    m = build_lpips("alex")
    assert torch.equal(getattr(m.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(m.net.slice5, "10").bias, state["features.10.bias"])
    explicit = build_lpips("alex", weights=path)
    assert torch.equal(getattr(explicit.net.slice3, "6").weight, state["features.6.weight"])
