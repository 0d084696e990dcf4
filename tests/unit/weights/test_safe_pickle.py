"""The NumPy-only unpickler: arrays in dicts load; anything else is refused before it runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from gen_ad.errors import CheckpointError
from gen_ad.weights.safe_pickle import load_array_file, load_arrays


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does
        return (os.system, (f"touch {self.marker}",))


def test_nested_dicts_of_arrays_load_flattened() -> None:
    tree = {"Net_0": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                                 "bias": np.zeros(2, np.float32)}},
            "Head": {"k": np.ones((1, 1, 4, 1), np.float64)}}
    out = load_arrays(pickle.dumps(tree, protocol=3))
    assert set(out) == {"Net_0/Conv_0/kernel", "Net_0/Conv_0/bias", "Head/k"}
    np.testing.assert_array_equal(out["Net_0/Conv_0/kernel"], tree["Net_0"]["Conv_0"]["kernel"])
    assert out["Head/k"].dtype == np.float64


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_os_system_pickle_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": np.zeros(3), "x": _Evil(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match="refusing global"):
        load_array_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"w": [np.zeros(2)]},                        # a list container
    {"w": np.array([1, "a"], dtype=object)},     # an object array
    {1: np.zeros(2)},                            # a non-string key
    np.zeros(2),                                 # not a dict at the root
    {"w": 3.0},                                  # a plain number as a leaf
])
def test_anything_but_dicts_of_numeric_arrays_is_refused(tmp_path: Path, payload) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(pickle.dumps(payload, protocol=3))
    with pytest.raises(CheckpointError, match="not a pickle of NumPy arrays only"):
        load_array_file(path)


def test_truncated_pickle_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.ckpt"
    path.write_bytes(pickle.dumps({"w": np.zeros(100)}, protocol=3)[:-20])
    with pytest.raises(CheckpointError):
        load_array_file(path)
