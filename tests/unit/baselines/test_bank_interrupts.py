"""A KNN bank is published whole: a fit interrupted midway leaves no bank, an interrupted
``--extend`` leaves the previous bank and its threshold; a threshold saved for other vectors
than the bank holds (an earlier gen_ad's killed extend) is re-calibrated with a warning."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gen_ad.baselines.knn as knn
from gen_ad.baselines.knn import (
    FeatureBank,
    KNNIndex,
    KNNScorer,
    build_bank,
    calibrate_bank,
    check_no_bank,
    extend_bank,
)
from gen_ad.errors import CheckpointError
from gen_ad.scoring.thresholds import calibrate

INFO = {"name": "pooled"}


class Pooled(torch.nn.Module):
    """A tiny deterministic extractor: 8x8 average pooling of 32x32 images -> 48-d."""

    dim = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1)


class Killed(Exception):
    """What the interrupted embedding raises."""


EXT = Pooled()


def _batches(n: int, seed: int, bs: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list((torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).split(bs))


def _interrupt(monkeypatch: pytest.MonkeyPatch, after: int, kill: bool) -> None:
    """Make the embedding loop raise after ``after`` batches; ``kill``: skip the clean-up of the
    staged write, leaving on disk what a SIGKILL leaves."""
    real = knn.embed_batches

    def broken(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, item in enumerate(real(*args, **kwargs)):
            if i == after:
                raise Killed("killed midway")
            yield item

    monkeypatch.setattr(knn, "embed_batches", broken)
    if kill:
        monkeypatch.setattr(FeatureBank, "abort", lambda self: None, raising=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def _fit(root: Path, batches: list[torch.Tensor]) -> FeatureBank:
    return build_bank(EXT, batches, root, INFO, k=3, calib_size=20, shard_rows=16)


@pytest.mark.parametrize("kill", [False, True], ids=["raised", "killed"])
def test_an_interrupted_fit_leaves_no_bank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           kill: bool) -> None:
    out = tmp_path / "bank"
    with monkeypatch.context() as mp:
        _interrupt(mp, after=2, kill=kill)  # two 16-row shards were embedded
        with pytest.raises(Killed):
            _fit(out, _batches(64, 0))
    what = "incomplete bank at .*: the fit was interrupted" if kill else "no feature bank at"
    with pytest.raises(CheckpointError, match=what):
        FeatureBank(out)
    check_no_bank(out)  # fitting again is allowed
    bank = _fit(out, _batches(64, 0))
    ref = _fit(tmp_path / "ref", _batches(64, 0))
    assert bank.count == 64
    np.testing.assert_array_equal(FeatureBank(out).load(), ref.load())
    listed = {sh["file"] for sh in bank.meta["shards"]} | {bank.meta["calibration"]}
    assert {p.name for p in out.glob("*.npy")} == listed


@pytest.mark.parametrize("kill", [False, True], ids=["raised", "killed"])
def test_an_interrupted_extend_keeps_the_old_bank_and_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill: bool) -> None:
    root = tmp_path / "bank"
    first, more = _batches(48, 0), _batches(48, 1)
    bank = _fit(root, first)
    before = _files(root)
    q = EXT(_batches(8, 2)[0])
    old = KNNScorer(EXT, FeatureBank(root), k=3)
    with monkeypatch.context() as mp:
        _interrupt(mp, after=2, kill=kill)
        with pytest.raises(Killed):
            extend_bank(bank, EXT, more, shard_rows=16)
    assert _files(root) == before  # bank.json, shards, calibration, threshold.json untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the threshold belongs to the bank: no re-calibration
        again = KNNScorer(EXT, FeatureBank(root), k=3)
    assert again.index is not None and again.index.count == 48
    assert again.threshold == old.threshold and again.threshold_source == "saved at fit"
    np.testing.assert_array_equal(again.score_features(q), old.score_features(q))
    if not kill:
        assert bank.count == 48  # the object is back to the bank on disk
    grown = extend_bank(bank if not kill else FeatureBank(root), EXT, more, shard_rows=16)
    once = _fit(tmp_path / "once", first + more)
    assert grown.count == 96
    np.testing.assert_array_equal(FeatureBank(root).load(), once.load())
    a, b = KNNScorer(EXT, FeatureBank(root), k=3), KNNScorer(EXT, FeatureBank(once.root), k=3)
    assert a.threshold == b.threshold and a.threshold_source == "saved at fit"
    np.testing.assert_array_equal(a.score_features(q), b.score_features(q))
    saved = json.loads((root / "threshold.json").read_text())
    assert saved["bank"] == {"count": 96, "shards": [s["file"] for s in grown.meta["shards"]]}
    listed = {sh["file"] for sh in grown.meta["shards"]} | {grown.meta["calibration"]}
    assert {p.name for p in root.glob("*.npy")} == listed  # the old calibration file is gone


def test_a_threshold_saved_for_other_vectors_is_recalibrated(tmp_path: Path) -> None:
    """A bank grown after its calibration (what a killed --extend of an earlier gen_ad left):
    its saved threshold is not used for the grown bank."""
    root = tmp_path / "bank"
    bank = _fit(root, _batches(48, 0))
    bank.append(EXT(_batches(8, 3)[0]).numpy())  # bank.json grows, the threshold does not
    grown = FeatureBank(root)
    with pytest.warns(UserWarning, match=r"does not belong to its vectors: its threshold was "
                                         r"calibrated on 48 vectors in 3 shard\(s\), the bank "
                                         r"holds 56 in 4"):
        sc = KNNScorer(EXT, grown, k=3)
    _, scores = calibrate_bank(KNNIndex(grown), 3, calib_size=20)
    assert sc.threshold == calibrate(scores, method="iqr")
    assert sc.threshold_source is not None and "re-calibrated at load" in sc.threshold_source


def _as_version_1(root: Path) -> None:
    """Rewrite a bank as an earlier gen_ad left it: no threshold in bank.json, calibration.npy
    and threshold.json beside it."""
    meta = json.loads((root / "bank.json").read_text())
    table = np.load(root / meta.pop("calibration"))
    np.save(root / "calibration.npy", table)
    rec = meta.pop("threshold")
    rec.pop("bank")
    meta["version"] = 1
    (root / "bank.json").write_text(json.dumps(meta))
    (root / "threshold.json").write_text(json.dumps(rec))


def test_banks_of_an_earlier_gen_ad(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    _fit(root, _batches(48, 0))
    _as_version_1(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc = KNNScorer(EXT, FeatureBank(root), k=3)  # its pair checks out: used as saved
    assert sc.threshold is not None and sc.threshold_source == "saved at fit"
    assert sc.threshold.value == json.loads((root / "threshold.json").read_text())["value"]
    old = FeatureBank(root)
    old.append(EXT(_batches(8, 3)[0]).numpy())  # an interrupted --extend of that version
    with pytest.warns(UserWarning, match="not calibrated on the 56 vectors it holds"):
        KNNScorer(EXT, FeatureBank(root), k=3)
    (root / "threshold.json").unlink()  # an interrupted fit of that version
    with pytest.raises(CheckpointError, match="incomplete bank at .*re-run `gen-ad knn fit`"):
        FeatureBank(root)
    check_no_bank(root)  # may be fitted over
    bank = _fit(root, _batches(48, 0))
    assert not (root / "calibration.npy").exists()  # its files are swept at the commit
    listed = {sh["file"] for sh in bank.meta["shards"]} | {bank.meta["calibration"]}
    assert {p.name for p in root.glob("*.npy")} == listed


class Kill(BaseException):
    """A SIGKILL at a rename: nothing after it runs (the staged write's clean-up is off)."""


def _renames(monkeypatch: pytest.MonkeyPatch, kill_at: int = 0, after: bool = False) -> list[int]:
    """Count ``os.replace`` calls; at the ``kill_at``-th, stop just before or after it."""
    real, calls = os.replace, [0]

    def replace(src: Any, dst: Any) -> None:
        calls[0] += 1
        if calls[0] == kill_at and not after:
            raise Kill
        real(src, dst)
        if calls[0] == kill_at:
            raise Kill

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(FeatureBank, "abort", lambda self: None, raising=False)
    return calls


def _as_read(root: Path, q: torch.Tensor) -> tuple[Any, ...] | None:
    """What a reader gets from ``root``: ``None`` (no bank), or count, threshold and scores
    (with no warning: a threshold that does not match its bank would warn)."""
    try:
        bank = FeatureBank(root)
    except CheckpointError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc = KNNScorer(EXT, bank, k=3)
    return bank.count, sc.threshold, sc.score_features(q).tolist()


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_write_killed_at_any_rename_leaves_the_old_bank_or_the_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: bool) -> None:
    first, more, q = _batches(48, 0), _batches(48, 1), EXT(_batches(8, 2)[0])
    base = tmp_path / "base"
    _fit(base, first)
    shutil.copytree(base, tmp_path / "ref")
    with monkeypatch.context() as mp:
        n_fit = _renames(mp)
        _fit(tmp_path / "fit-ref", first)
    with monkeypatch.context() as mp:
        n_extend = _renames(mp)
        extend_bank(FeatureBank(tmp_path / "ref"), EXT, more, shard_rows=16)
    old, new = _as_read(base, q), _as_read(tmp_path / "ref", q)
    assert old is not None and new is not None and old[0] == 48 and new[0] == 96
    for n in range(1, n_fit[0] + 1):
        root = tmp_path / f"fit-{n}"
        with monkeypatch.context() as mp, pytest.raises(Kill):
            _renames(mp, n, after)
            _fit(root, first)
        assert _as_read(root, q) in (None, old), f"fit killed at rename {n}"
    for n in range(1, n_extend[0] + 1):
        root = tmp_path / f"extend-{n}"
        shutil.copytree(base, root)
        with monkeypatch.context() as mp, pytest.raises(Kill):
            _renames(mp, n, after)
            extend_bank(FeatureBank(root), EXT, more, shard_rows=16)
        assert _as_read(root, q) in (old, new), f"extend killed at rename {n}"
    assert n_fit[0] >= 8 and n_extend[0] >= 9  # shards, calibration, moves, bank.json, ...
