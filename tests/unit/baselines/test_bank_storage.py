"""Issue 16 on KNN banks: bank.json never points outside the bank, shards are checked against
what bank.json records, and shard names are never reused (concurrent or repeated --extend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gen_ad.baselines.knn import FeatureBank
from gen_ad.errors import CheckpointError


def _bank(root: Path) -> FeatureBank:
    bank = FeatureBank.create(root, 4, {"name": "test"})
    bank.append(np.arange(12, dtype=np.float32).reshape(3, 4), ["a", "b", "c"])
    bank.append(np.ones((2, 4), np.float32), ["d", "e"])
    return bank


def _edit(root: Path, **changes: object) -> None:
    meta = json.loads((root / "bank.json").read_text())
    meta.update(changes)
    (root / "bank.json").write_text(json.dumps(meta))


def test_shard_names_are_unique_and_the_bank_reloads(tmp_path: Path) -> None:
    bank = _bank(tmp_path / "b")
    names = [s["file"] for s in bank.meta["shards"]]
    assert len(set(names)) == 2 and all(n.startswith("features-") for n in names)
    again = FeatureBank(tmp_path / "b")
    np.testing.assert_array_equal(again.load()[:3], np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("rel", ["../outside.npy", "ABS", "sub/x.npy"])
def test_shards_outside_the_bank_are_refused(tmp_path: Path, rel: str) -> None:
    bank = _bank(tmp_path / "b")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((3, 4), np.float32))
    shards = bank.meta["shards"]
    shards[0]["file"] = str(outside) if rel == "ABS" else rel
    _edit(tmp_path / "b", shards=shards)
    with pytest.raises(CheckpointError, match="refusing the shard path"):
        FeatureBank(tmp_path / "b")
    assert outside.is_file()


def test_damaged_or_inconsistent_banks_are_refused(tmp_path: Path) -> None:
    bank = _bank(tmp_path / "b")
    shard = tmp_path / "b" / bank.meta["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="missing or damaged|holds"):
        FeatureBank(tmp_path / "b")
    shard.write_bytes(data)
    _edit(tmp_path / "b", count=6)
    with pytest.raises(CheckpointError, match="6 vectors recorded, 5 in shards"):
        FeatureBank(tmp_path / "b")
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing or damaged"):
        FeatureBank(tmp_path / "b")
