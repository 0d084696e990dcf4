"""`gen-ad demo --fast`: synthetic data -> every family trained -> report with every method."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gen_ad.cli import main

METHODS = {"fanogan", "stylegan2", "anoddpm", "autoddpm", "knn-resnet50-random-init-tiny"}


def _check_scores_agree(folder: Path, record: dict) -> None:
    """A method's reported AUROC is scikit-learn's on its scores.csv, and its flags are exactly
    ``score > threshold`` (how well the 4-step models separate the classes is not checked: in a
    fast run some methods are below chance, e.g. pixel AUROC 0.49 for AutoDDPM)."""
    rows = [r.split(",") for r in (folder / "scores.csv").read_text().splitlines()[1:]]
    labels = np.array([int(r[1]) for r in rows])
    scores = np.array([float(r[3]) for r in rows])
    assert len(rows) == 20 and set(labels.tolist()) == {0, 1}
    assert record["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores),
                                                                abs=1e-12)
    value = record["threshold"]["value"]
    assert [int(r[4]) for r in rows] == (scores > value).astype(int).tolist()


def test_demo_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast"]) == 0
    printed = capsys.readouterr().out
    report = out / "benchmark" / "report.html"
    assert f"demo report: {report}" in printed

    results = json.loads((out / "benchmark" / "results.json").read_text())
    by_name = {m["name"]: m for m in results["methods"]}
    assert set(by_name) == METHODS | {"colour-baseline"}  # + the shortcut check's baseline
    assert set(results["shortcut"]["methods"]) == set(by_name)
    for m in by_name.values():
        assert 0.0 <= m["metrics"]["auroc"]["value"] <= 1.0
        assert m["ms_per_patch"] > 0
    # generative methods carry maps (pixel AUROC against the planted masks) and FID/KID records;
    # offline, the FID record is a labelled random-init Inception distance, never "fid"
    for name in ("fanogan", "stylegan2", "anoddpm", "autoddpm"):
        m = by_name[name]
        assert m["has_maps"] and m["metrics"]["pixel"]["auroc"] is not None
        gen = m["generator"]
        assert gen["status"] == "ok" and gen["extractor"] in ("inception-v3-random",
                                                               "inception-v3-compat")
        if gen["extractor"] == "inception-v3-random":
            assert "fid" not in gen and "RANDOM-INIT" in gen["label"]
    for name, m in by_name.items():
        _check_scores_agree(out / "benchmark" / "methods" / name, m)
    knn = by_name["knn-resnet50-random-init-tiny"]
    assert any("RANDOMLY INITIALISED" in n for n in knn["notes"]) and knn["generator"] is None

    html = report.read_text()
    for name in METHODS:
        assert name in html
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == len(results["figures"]) == 2 + 2 * (len(METHODS) + 1)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # the benchmark config the demo wrote re-loads (gen-ad benchmark --config ...)
    from gen_ad.app.benchmark import load_benchmark_config

    assert len(load_benchmark_config(out / "benchmark.yaml").methods) == len(METHODS)
    _check_rerun_reuses(out, results, capsys)


def _check_rerun_reuses(out: Path, first: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `gen-ad demo` into the same folder trains nothing and evaluates nothing again:
    every run and every benchmark method is reused, with the first run's numbers."""
    assert main(["demo", "--out", str(out), "--fast"]) == 0
    captured = capsys.readouterr()
    assert "[demo] training " not in captured.out and captured.out.count("[demo] reusing ") == 4
    for name in METHODS | {"colour-baseline"}:
        assert f"benchmark method {name}: reused" in captured.err
    # FID/KID of the three generator runs (f-AnoGAN's encoder run, StyleGAN2, DDPM) likewise
    fid = [line for line in captured.err.splitlines() if line.startswith("benchmark FID/KID")]
    assert len(fid) == 3 and all(": reused (computed " in line for line in fid), captured.err
    again = json.loads((out / "benchmark" / "results.json").read_text())
    assert {m["name"]: m["metrics"] for m in again["methods"]} == \
        {m["name"]: m["metrics"] for m in first["methods"]}
    assert all(m["reused"] for m in again["methods"])


def test_full_demo_uses_the_installed_vgg16_at_twice_the_patch_side(tmp_path: Path) -> None:
    """With the VGG16 weights installed the full demo's KNN row is the real `vgg16-imagenet`,
    loaded at 2x the 32 px patch side (its relu4_3 would be 4x4 at 32 px); without them, the
    labelled random-init stand-in."""
    from gen_ad.app.demo import _knn_method, demo_size
    from gen_ad.weights.registry import installed_path

    sz = demo_size(fast=False)
    assert _knn_method(sz, "bank")["name"] == "knn-resnet50-random-init"
    installed_path("lpips-vgg16").parent.mkdir(parents=True, exist_ok=True)
    installed_path("lpips-vgg16").write_bytes(b"")  # found by name; not loaded here
    m = _knn_method(sz, "bank")
    assert m["name"] == "knn-vgg16-imagenet"
    assert m["knn"] == {"extractor": "vgg16-imagenet", "k": sz.knn_k, "bank": "bank",
                        "size": 2 * sz.size}
