"""``gen-ad knn score --k / --normal / --threshold``: another k equals a bank fitted with it,
a held-out normal folder sets the threshold from its own scores, the bank folder stays as it was."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gen_ad.cli import main
from gen_ad.scoring.thresholds import fpr_threshold, iqr_threshold

pytest.importorskip("faiss")

COMMON = ["--workers", "0", "--device", "cpu", "--batch-size", "16"]


def _folder(root: Path, seed: int, n_normal: int, n_tumour: int) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n, lo in (("normal", n_normal, 90), ("tumor", n_tumour, 150)):
        d = root / cls
        d.mkdir(parents=True)
        for j in range(n):
            arr = rng.integers(lo, lo + 70, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{j:03d}.png")
    return root


def _fit(tmp: Path, name: str, k: int) -> Path:
    bank = tmp / name
    assert main(["knn", "fit", "--extractor", "resnet50", "--random-init", "--tiny", "--normal",
                 str(tmp / "train"), "--out", str(bank), "--k", str(k), "--calib-size", "20",
                 *COMMON]) == 0
    return bank


def _score(bank: Path, data: Path, out: Path, *extra: str) -> tuple[dict, list[float]]:
    assert main(["knn", "score", str(bank), "--data", str(data), "--out", str(out), *extra,
                 *COMMON]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scores = [float(r["score"]) for r in csv.DictReader((out / "scores.csv").open())]
    return metrics, scores


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("knn")
    _folder(tmp / "train", 0, 30, 0)
    _folder(tmp / "test", 1, 8, 6)
    _folder(tmp / "val", 2, 16, 0)
    _fit(tmp, "bank3", 3)
    _fit(tmp, "bank5", 5)
    return tmp


def test_other_k_equals_a_bank_fitted_with_it(banks: Path) -> None:
    before = {p.name: p.read_bytes() for p in (banks / "bank5").iterdir() if p.is_file()}
    m_k, s_k = _score(banks / "bank5", banks / "test", banks / "out-k3", "--k", "3")
    m_3, s_3 = _score(banks / "bank3", banks / "test", banks / "out-3")
    assert s_k == pytest.approx(s_3, rel=1e-6)
    # the leave-one-out threshold re-calibrated in memory equals the one fitted at k=3
    assert m_k["threshold"]["value"] == pytest.approx(m_3["threshold"]["value"], rel=1e-6)
    assert m_k["k"] == m_3["k"] == 3
    assert "re-calibrated" in m_k["threshold_source"]
    assert "saved at fit" in m_3["threshold_source"]
    after = {p.name: p.read_bytes() for p in (banks / "bank5").iterdir() if p.is_file()}
    assert after == before  # scoring never writes into the bank


def test_held_out_normals_set_the_threshold(banks: Path, capsys: pytest.CaptureFixture) -> None:
    _, val_scores = _score(banks / "bank3", banks / "val", banks / "out-val")
    m, _ = _score(banks / "bank3", banks / "test", banks / "out-held", "--normal",
                  str(banks / "val"))
    assert m["threshold"]["value"] == pytest.approx(iqr_threshold(np.array(val_scores)),
                                                    rel=1e-6)
    assert m["threshold"]["n"] == 16 and "held-out" in m["threshold_source"]
    assert "threshold: iqr of 16 held-out normal patches" in capsys.readouterr().out
    m, _ = _score(banks / "bank3", banks / "test", banks / "out-fpr", "--normal",
                  str(banks / "val"), "--threshold", "fpr", "--fpr", "0.25")
    assert m["threshold"]["value"] == pytest.approx(fpr_threshold(np.array(val_scores), 0.25),
                                                    rel=1e-6)
    assert m["threshold"]["method"] == "fpr"


def test_k_beyond_the_bank_is_a_clear_error(banks: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["knn", "score", str(banks / "bank3"), "--data", str(banks / "test"), "--out",
                 str(banks / "out-big"), "--k", "30", *COMMON]) == 2
    assert "--k 30 needs more than 30 bank vectors; the bank has 30" in capsys.readouterr().err


def test_scoring_the_bank_images_warns_and_is_recorded(banks: Path, tmp_path: Path) -> None:
    # the bank's own images find themselves at distance 0: say so rather than report low scores
    metrics, _ = _score(banks / "bank3", banks / "test", tmp_path / "clean")
    assert metrics["images_also_in_bank"] == 0
    with pytest.warns(UserWarning, match="30 of 30 images to score are in the KNN bank"):
        metrics, scores = _score(banks / "bank3", banks / "train", tmp_path / "self")
    assert metrics["images_also_in_bank"] == 30


def test_limit_scores_a_seeded_random_subset(banks: Path, tmp_path: Path) -> None:
    from gen_ad.data.folders import subset_indices

    _, full = _score(banks / "bank3", banks / "test", tmp_path / "all")
    with pytest.warns(UserWarning, match="5 of 5 images to score are in the KNN bank"):
        metrics, part = _score(banks / "bank3", banks / "train", tmp_path / "own", "--limit", "5")
    assert metrics["limit"] == {"n": 5, "of": 30, "seed": 0} and len(part) == 5
    assert metrics["images_also_in_bank"] == 5  # counted on the subset scored
    metrics, some = _score(banks / "bank3", banks / "test", tmp_path / "some", "--limit", "6")
    assert metrics["n"] == 6 and some == [full[i] for i in subset_indices(14, 6, 0)]


def _fit_args(bank: Path, normal: Path, *extra: str) -> list[str]:
    return ["knn", "fit", "--extractor", "resnet50", "--tiny", "--normal", str(normal), "--out",
            str(bank), "--k", "3", "--calib-size", "20", *extra, *COMMON]


def test_extending_with_images_already_in_the_bank_skips_them(
        banks: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`fit --extend` with the bank's own folder would put every image in twice (each then its
    own leave-one-out neighbour at distance 0): those files are skipped, with a count."""
    bank = tmp_path / "bank"
    assert main(_fit_args(bank, banks / "train", "--random-init")) == 0
    threshold = json.loads((bank / "threshold.json").read_text())["value"]
    assert main(_fit_args(bank, banks / "train", "--extend")) == 2
    assert "all 30 images of" in capsys.readouterr().err
    assert json.loads((bank / "bank.json").read_text())["count"] == 30
    more = tmp_path / "more" / "normal"
    more.mkdir(parents=True)
    for j, src in enumerate(sorted((banks / "train" / "normal").iterdir())[:5]):
        (more / src.name).symlink_to(src)  # the same files through links: skipped
        _folder(tmp_path / f"new{j}", 10 + j, 1, 0)
        (tmp_path / f"new{j}" / "normal" / "000.png").rename(more / f"new{j}.png")
    assert main(_fit_args(bank, more.parent, "--extend")) == 0
    assert "skipping 5 of 10 images" in capsys.readouterr().out
    meta = json.loads((bank / "bank.json").read_text())
    assert meta["count"] == 35 and len(set(meta["paths"])) == 35
    assert json.loads((bank / "threshold.json").read_text())["value"] > 0.5 * threshold


def test_bank_records_and_checks_its_weights_file(banks: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The bank records the resolved weights file with its sha256 and size; scoring with a file
    of other content is refused naming both; an older bank without the record warns."""
    import hashlib

    from gen_ad.baselines.extractors import build_extractor
    from gen_ad.utils.io import save_safetensors

    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir()
    save_safetensors(weights, build_extractor("resnet50", random_init=True, tiny=True,
                                              seed=1).backbone.state_dict())
    bank = tmp_path / "bank"
    assert main(_fit_args(bank, banks / "train", "--weights", str(weights.parent))) == 0
    assert f"weights {weights}" in capsys.readouterr().out
    rec = json.loads((bank / "bank.json").read_text())["extractor"]["weights_identity"]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert rec == {"kind": "file", "file": str(weights.resolve()), "sha256": sha,
                   "bytes": weights.stat().st_size}
    _score(bank, banks / "test", tmp_path / "ok")
    save_safetensors(weights, build_extractor("resnet50", random_init=True, tiny=True,
                                              seed=2).backbone.state_dict())  # replaced
    new_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(["knn", "score", str(bank), "--data", str(banks / "test"), "--out",
                 str(tmp_path / "bad"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert sha in err and new_sha in err and str(weights) in err and "--weights" in err
    meta = json.loads((bank / "bank.json").read_text())
    del meta["extractor"]["weights_identity"]  # a bank from an earlier gen_ad
    (bank / "bank.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="does not record which weights file"):
        _score(bank, banks / "test", tmp_path / "old")
    random = json.loads((banks / "bank3" / "bank.json").read_text())["extractor"]
    assert random["weights_identity"] == {"kind": "random-init", "seed": 0}


def test_fit_prints_weights_precision_and_training_resolution(
        banks: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _fit_args(tmp_path / "bank", banks / "train", "--random-init")
    args[args.index("resnet50")] = "uni"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM-INIT" in out and "fp32 embeddings" in out
    assert "~0.5 um/px (20x)" in out and "gen-ad tile --mpp 0.5" in out
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())["extractor"]
    assert meta["train_mpp"] == 0.5 and meta["precision"] == "fp32"


def test_fit_onto_an_existing_bank_fails_before_reading_images(
        banks: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Without --extend, an existing bank is refused at once (no extractor, no image read) and
    the message names the --extend flag."""
    import gen_ad.app.knn as app_knn

    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("the folder was read before the existing bank was refused")

    monkeypatch.setattr(app_knn, "build_extractor", must_not_run)
    monkeypatch.setattr(app_knn, "normal_dataset", must_not_run)
    capsys.readouterr()
    assert main(_fit_args(banks / "bank3", banks / "train", "--random-init")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen-ad: error: a feature bank already exists") and "--extend" in err


def test_colour_stats_fit_states_it_is_resolution_free(
        banks: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _fit_args(tmp_path / "bank", banks / "train")
    args[args.index("resnet50")] = "colour-stats"
    args.remove("--tiny")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "extractor colour-stats: colour statistics: resolution-free" in out
    assert "model card" not in out


class Killed(Exception):
    """What the interrupted embedding raises."""


def _kill_midway(mp: pytest.MonkeyPatch, after: int) -> None:
    """Make a fit's embedding loop raise after ``after`` batches, flushing a shard per batch, and
    leave on disk what a SIGKILL leaves (no clean-up of the staged write)."""
    import gen_ad.app.knn as app_knn
    import gen_ad.baselines.knn as knn

    real_embed, real_extend = knn.embed_batches, knn.extend_bank

    def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, item in enumerate(real_embed(*args, **kwargs)):
            if i == after:
                raise Killed("killed midway")
            yield item

    def small_shards(*args: Any, **kwargs: Any) -> Any:
        return real_extend(*args, **{**kwargs, "shard_rows": 4})

    mp.setattr(knn, "embed_batches", broken)
    mp.setattr(knn, "extend_bank", small_shards)
    mp.setattr(app_knn, "extend_bank", small_shards)
    mp.setattr(knn.FeatureBank, "abort", lambda self: None, raising=False)


def test_knn_score_refuses_a_bank_whose_fit_was_interrupted(
        banks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from gen_ad.app.knn import fit_folder

    bank = tmp_path / "bank"
    with monkeypatch.context() as mp:
        _kill_midway(mp, after=2)
        with pytest.raises(Killed):
            fit_folder("resnet50", banks / "train", bank, random_init=True, tiny=True, k=3,
                       calib_size=20, batch_size=4, workers=0, device="cpu")
    capsys.readouterr()
    assert main(["knn", "score", str(bank), "--data", str(banks / "test"), "--out",
                 str(tmp_path / "out"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "incomplete bank at" in err and "the fit was interrupted" in err
    assert "re-run `gen-ad knn fit`" in err
    with pytest.warns(UserWarning, match=r"removed 1 temporary .*\(\.staged\."):
        assert main(_fit_args(bank, banks / "train", "--random-init")) == 0  # fits again
    assert not list(bank.glob(".staged.*"))
    _, scores = _score(bank, banks / "test", tmp_path / "new")
    _, ref = _score(banks / "bank3", banks / "test", tmp_path / "ref")  # the same fit
    assert scores == ref


def test_an_interrupted_extend_leaves_the_bank_and_its_threshold(
        banks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.app.knn import fit_folder

    bank = tmp_path / "bank"
    assert main(_fit_args(bank, banks / "train", "--random-init")) == 0
    m0, s0 = _score(bank, banks / "test", tmp_path / "before")
    before = {p.name: p.read_bytes() for p in bank.iterdir() if p.is_file()}
    _folder(tmp_path / "more", 7, 12, 0)
    with monkeypatch.context() as mp:
        _kill_midway(mp, after=2)
        with pytest.raises(Killed):
            fit_folder("resnet50", tmp_path / "more", bank, extend=True, batch_size=4,
                       workers=0, device="cpu")
    after = {p.name: p.read_bytes() for p in bank.iterdir() if p.is_file()}
    assert after == before  # bank.json, shards, calibration and threshold.json as they were
    m1, s1 = _score(bank, banks / "test", tmp_path / "after")
    assert s1 == s0 and m1["threshold"] == m0["threshold"]
    assert "saved at fit" in m1["threshold_source"]
    with pytest.warns(UserWarning, match="removed 1 temporary"):
        assert main(_fit_args(bank, tmp_path / "more", "--extend")) == 0
    meta = json.loads((bank / "bank.json").read_text())
    assert meta["count"] == 42 and not list(bank.glob(".staged.*"))
    saved = json.loads((bank / "threshold.json").read_text())
    assert saved == meta["threshold"] and saved["bank"]["count"] == 42
