"""The demo's data step on file systems without hard links (FAT/exFAT drives, network shares)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from gen_ad.app import demo


def test_demo_data_copies_masks_where_links_fail(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")  # what FAT/exFAT and some shares say

    monkeypatch.setattr(os, "link", no_links)
    sz = dataclasses.replace(demo.demo_size(fast=True), n_train=4, n_val=4, n_test=6, size=16)
    paths = demo.make_data(tmp_path, sz)
    src = sorted((paths["test"] / "masks").glob("*.png"))
    dst = sorted((paths["masks"] / "anomalous").glob("*.png"))
    assert src and [p.name for p in dst] == [p.name for p in src]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(src, dst))
