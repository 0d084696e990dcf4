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


@pytest.mark.parametrize("net,arch", [("alex", "alexnet"), ("vgg", "vgg16"),
                                      ("squeeze", "squeezenet1_1")])
def test_every_trunk_loads_a_state_dict_in_torchvision_layout(net: str, arch: str,
                                                              tmp_path) -> None:
    """A genuine torchvision state dict (random init, every key incl. the classifier; SqueezeNet's
    ``features.3.expand1x1.weight`` nesting) loads into LPIPS with every trunk tensor in place."""
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = getattr(torchvision.models, arch)(weights=None).state_dict()
    # torchvision's exact keys and shapes; random trunk values; the classifier (up to 120M
    # parameters, ignored by LPIPS) as zero-stride zeros so the file stays small
    state = {k: torch.randn(v.shape) if k.startswith("features.")
             else torch.zeros(()).expand(v.shape) for k, v in shapes.items()}
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    m = build_lpips(net, weights=path)
    own = dict(m.net.named_parameters())
    matched = 0
    for slice_name, block in m.net.named_children():
        for idx, layer in block.named_children():
            for pname, p in layer.named_parameters():
                assert torch.equal(p, state[f"features.{idx}.{pname}"]), (slice_name, pname)
                matched += 1
    assert matched == len(own) > 0
    assert m.gen_ad_source == f"LPIPS-{net} (file {path})"


def test_installed_file_is_found_first_and_fallback_is_labelled() -> None:
    from gen_ad.utils.io import save_safetensors
    from gen_ad.weights.registry import installed_path

    torch.manual_seed(1)
    with torch.device("meta"):
        shapes = torchvision.models.alexnet(weights=None).features.state_dict()
    trunk = {f"features.{k}": torch.randn(v.shape) for k, v in shapes.items()}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
             for k, c in enumerate((64, 192, 384, 256, 256))}
    save_safetensors(installed_path("lpips-alex"), {**trunk, **heads})
    m = build_lpips("alex")
    assert m.gen_ad_source == "LPIPS-alex (installed gen_ad-lpips-alex.safetensors)"
    assert torch.equal(getattr(m.net.slice2, "3").weight, trunk["features.3.weight"])
    assert torch.equal(m.lin4.model[1].weight, heads["lin4.model.1.weight"])
    with pytest.raises(WeightsNotFoundError, match="no package registry holds it"):
        build_lpips("squeeze")
    with pytest.warns(RuntimeWarning, match="INSTEAD OF LPIPS-squeeze"):
        fb = build_lpips("squeeze", spatial=True, fallback="alex")
    assert fb.pnet_type == "alex" and "INSTEAD OF LPIPS-squeeze" in fb.gen_ad_source
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert fb(x, x.flip(-1)).shape == (1, 1, 64, 64)
