"""Offline mode means the same everywhere, and a weights download is bounded, whole and checked
(file:// URLs stand in for the network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from gen_ad.errors import WeightsNotFoundError
from gen_ad.utils.download import download_file, hash_prefix_of, offline


@pytest.mark.parametrize("value,expected", [("1", True), ("TRUE", True), (" yes ", True),
                                            ("on", True), ("0", False), ("false", False),
                                            ("", False), ("no", False)])
@pytest.mark.parametrize("var", ["GEN_AD_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_reads_either_variable_as_a_boolean(monkeypatch: pytest.MonkeyPatch, var: str,
                                                    value: str, expected: bool) -> None:
    monkeypatch.delenv("GEN_AD_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, value)
    assert offline() is expected


def test_download_is_whole_and_hash_checked(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "hub" / "checkpoints" / f"net-{digest[:8]}.pth"
    assert hash_prefix_of(dest.name) == digest[:8]
    assert download_file(src.as_uri(), dest, hash_prefix_of(dest.name)) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert capsys.readouterr().err == f"gen-ad: downloading {src.as_uri()} -> {dest}\n"

    bad = tmp_path / "hub" / "checkpoints" / "net-0000abcd.pth"
    with pytest.raises(OSError, match="wrong SHA-256"):
        download_file(src.as_uri(), bad, hash_prefix_of(bad.name))
    assert sorted(p.name for p in bad.parent.iterdir()) == [dest.name]  # nothing half-written
    with pytest.raises(OSError):
        download_file((tmp_path / "absent.bin").as_uri(), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("name,prefix", [("vgg16-397923af.pth", "397923af"),
                                         ("dino_resnet50_pretrain.pth", None),
                                         ("weights-inception-2015-12-05-6726825d.pth", "6726825d"),
                                         ("resnet50-sha.pth", None)])
def test_hash_prefix_follows_the_torch_hub_file_names(name: str, prefix: str | None) -> None:
    assert hash_prefix_of(name) == prefix


def test_lpips_downloads_its_trunk_atomically_unless_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not cached, online: the trunk is fetched (with a bounded timeout, checked against the
    hash its file name carries) and loaded; ``HF_HUB_OFFLINE=false`` is online (it read as
    offline before), ``GEN_AD_OFFLINE=1`` is offline."""
    import gen_ad.inversion.lpips_net as lp

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items()
             if k.startswith("features.")}
    src = tmp_path / "alexnet.pth"
    torch.save(state, src)
    name = f"alexnet-{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}.pth"
    monkeypatch.setattr(lp, "_TRUNKS", {**lp._TRUNKS, "alex": (name, src.as_uri())})
    monkeypatch.setattr(lp, "_installed", lambda net: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")
    monkeypatch.delenv("GEN_AD_OFFLINE", raising=False)
    m = lp.build_lpips("alex")
    assert torch.equal(getattr(m.net.slice1, "0").weight, state["features.0.weight"])
    assert lp.trunk_file("alex").read_bytes() == src.read_bytes()

    lp.trunk_file("alex").unlink()
    monkeypatch.setenv("GEN_AD_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="offline mode is set"):
        lp.build_lpips("alex")
    assert not lp.trunk_file("alex").exists()


def test_extractors_honour_gen_ad_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GEN_AD_OFFLINE=1`` alone keeps the KNN extractors off the network (it was read by the
    LPIPS and Inception lookups only, so a hub download was still attempted)."""
    import gen_ad.baselines.extractors as ex

    def no_network(spec: object) -> Path:
        raise AssertionError("tried the network while offline")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("GEN_AD_OFFLINE", "1")
    monkeypatch.setattr(ex, "_download", no_network)
    with pytest.raises(WeightsNotFoundError, match="offline mode is set"):
        ex.resolve_weights(ex.get_spec("dino-resnet50"), None)
