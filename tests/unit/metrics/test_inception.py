"""Inception-v3 feature extractors: conversion, weights resolution, loading errors, labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gen_ad.errors import CheckpointError, ConfigError, DataError
from gen_ad.metrics import inception as inc
from gen_ad.utils.download import offline
from gen_ad.utils.io import torch_save


def test_to_uint8_is_exact_and_round_trips() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert inc.to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(inc.to_uint8(u.float() / 127.5 - 1), u)


def test_hub_cache_file_is_used(tmp_path: Path) -> None:
    """A weights file in $TORCH_HOME/hub/checkpoints (a temporary TORCH_HOME) is found offline;
    random weights under torch-fidelity's file name are still not FID (its sha256 prefix)."""
    weights = tmp_path / "w.pth"
    torch_save(weights, inc.random_inception_state_dict(seed=0))
    dest = inc.inception_cache_path()
    assert not dest.exists() and offline()
    dest.parent.mkdir(parents=True)
    shutil.copyfile(weights, dest)
    assert inc.resolve_inception_weights() == dest
    with pytest.warns(RuntimeWarning, match="not a known FID Inception"):
        ext = inc.load_inception(device="cpu", layer="64")
    assert ext.label == "fd_inception-v3-custom-64" and not ext.is_inception
    assert ext.identity.startswith("sha256:")
    feats = ext(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 64) and feats.dtype == torch.float32


def test_bad_weights_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "w.pth"
    torch_save(bad, {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="does not match"):
        inc.load_inception(bad, device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        inc.load_inception(tmp_path / "junk.pth", device="cpu")


def test_random_init_inception_is_not_called_fid() -> None:
    ext = inc.load_inception(random_init=True, device="cpu")
    assert ext.label == "fd_inception-v3-random" and ext.kid_label == "kd_inception-v3-random"
    with pytest.raises(ConfigError, match="layer"):
        inc.load_inception(random_init=True, device="cpu", layer="1000")


def test_custom_extractor_checks_its_name_and_output() -> None:
    ext = inc.custom_extractor("flat", lambda x: x.float().flatten(1), device="cpu")
    assert ext.label == "fd_flat" and ext.kid_label == "kd_flat"
    assert ext(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).shape == (2, 48)
    bad = inc.custom_extractor("bad", lambda x: x.float(), device="cpu")
    with pytest.raises(DataError, match=r"\[B,D\]"):
        bad(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="lowercase"):
        inc.custom_extractor("Bad Name", lambda x: x)


def test_installed_safetensors_is_found_before_the_hub_cache(tmp_path: Path) -> None:
    """`gen-ad weights install` output (safetensors) wins over torch-fidelity's cache name."""
    from gen_ad.errors import WeightsNotFoundError
    from gen_ad.utils.io import save_safetensors
    from gen_ad.weights.registry import installed_path

    with pytest.raises(WeightsNotFoundError, match="gen-ad weights install --only fid-inception"):
        inc.resolve_inception_weights()
    torch_save(inc.inception_cache_path(), inc.random_inception_state_dict(seed=0))
    installed = installed_path("fid-inception")
    save_safetensors(installed, inc.random_inception_state_dict(seed=1))
    assert inc.resolve_inception_weights() == installed
    with pytest.warns(RuntimeWarning, match="fd_inception-v3-custom"):
        assert not inc.load_inception(device="cpu", layer="64").is_inception


def _register_installed_digest(monkeypatch: pytest.MonkeyPatch, digest: str) -> None:
    """The registry's tensor digest of the installed FID Inception, set to ``digest``."""
    from dataclasses import replace

    from gen_ad.weights import registry

    specs = registry._specs()
    patched = tuple(replace(s, installed_sha256=digest) if s.name == "fid-inception" else s
                    for s in specs)
    monkeypatch.setattr(registry, "_specs", lambda: patched)


def test_installed_file_is_fid_by_its_tensor_digest(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed safetensors is known by the registry's digest of its tensors, which the
    metadata (written by safetensors in an arbitrary order) does not change."""
    from gen_ad.utils.io import save_safetensors
    from gen_ad.weights.registry import get_weight_spec, installed_path

    assert len(get_weight_spec("fid-inception").installed_sha256) == 64
    sd = inc.random_inception_state_dict(seed=1)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(a, sd, metadata={"source": "x"})
    save_safetensors(b, dict(reversed(list(sd.items()))), metadata={"source": "y", "z": "1"})
    da, db = inc.weights_digests(a), inc.weights_digests(b)
    assert da.file != db.file and da.tensors == db.tensors is not None
    _register_installed_digest(monkeypatch, da.tensors)
    installed = installed_path("fid-inception")
    save_safetensors(installed, sd, metadata={"gen_ad_network": "fid-inception"})
    ext = inc.load_inception(device="cpu", layer="64")
    assert ext.label == "fid_64" and ext.is_inception
    torch_save(tmp_path / "same.pth", sd)  # the same tensors as a .pth: not the installed file
    with pytest.warns(RuntimeWarning, match="not a known FID Inception"):
        assert inc.load_inception(tmp_path / "same.pth", device="cpu").label == (
            "fd_inception-v3-custom")


def test_explicit_random_weights_are_not_fid_and_hashed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit weights file is labelled fid only when its sha256 is a known Inception's; the
    file is hashed once per process (cached by path, size and modification time)."""
    import os
    import warnings

    weights = tmp_path / "random.pth"
    torch_save(weights, inc.random_inception_state_dict(seed=3))
    hashed: list[int | None] = []
    whole = inc.sha256_file  # one whole-file pass recorded as None
    monkeypatch.setattr(inc, "sha256_file", lambda path: (hashed.append(None), whole(path))[1])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ext = inc.load_inception(weights, device="cpu", layer="64")
    assert ext.label == "fd_inception-v3-custom-64" and ext.kid_label == "kd_inception-v3-custom-64"
    assert not ext.is_inception and len(rec) == 1 and "\n" not in str(rec[0].message)
    assert "fd_inception-v3-custom" in str(rec[0].message)
    with pytest.warns(RuntimeWarning):
        assert inc.load_inception(weights, device="cpu").label == "fd_inception-v3-custom"
    assert hashed == [None]  # one streamed pass over the file for both loads
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file: hashed again
    digest = inc.weights_digests(weights).file
    assert hashed == [None, None]
    monkeypatch.setattr(inc, "_KNOWN_FILE_SHA256_PREFIXES", (digest,))
    assert inc.load_inception(weights, device="cpu").label == "fid"


def test_autocast_does_not_change_features() -> None:
    """Features are float32 whatever autocast region the caller is in (a bf16 training loop)."""
    ext = inc.load_inception(random_init=True, device="cpu", layer="64")
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    plain = ext(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ext(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
