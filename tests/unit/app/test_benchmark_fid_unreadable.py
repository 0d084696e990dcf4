"""A damaged or wrong Inception file makes the benchmark's FID n/a with a warning; it no longer
aborts the run after every method was evaluated (results.json was already removed then)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gen_ad.metrics.inception as inception
from gen_ad.app.benchmark import FIDConfig, _fid_extractor
from gen_ad.errors import CheckpointError


def test_unreadable_inception_weights_give_fid_na_and_a_warning(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def damaged(*args: object, **kwargs: object) -> object:
        raise CheckpointError(f"{tmp_path / 'pt_inception.pth'} is damaged (truncated)")

    monkeypatch.setattr(inception, "load_inception", damaged)
    with pytest.warns(UserWarning, match="FID/KID not computed: .*damaged"):
        extractor, reason = _fid_extractor(FIDConfig(), "cpu")
    assert extractor is None and reason is not None and reason.startswith("n/a")
