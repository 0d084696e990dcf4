"""Guards of the evaluation engine: limited normal sets are seeded random choices, class folders
without a normal class warn, non-finite scores stop the run, test images in a method's fit or
threshold sets are counted and warned about."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.app.benchmark import dataset_paths, overlap_with_test
from gen_ad.app.evaluate import normal_dataset, score_dataset, scoring_dataset
from gen_ad.errors import DataError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch


def _folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / cls / f"{cls}_{j:02d}.png")
    return root


def test_a_limited_normal_set_is_a_seeded_random_choice(tmp_path: Path) -> None:
    root = _folder(tmp_path / "val", {"normal": 30})
    a = dataset_paths(normal_dataset(root, 16, limit=8))
    assert a is not None and len(a) == 8
    assert a == dataset_paths(normal_dataset(root, 16, limit=8))  # seeded
    assert a != sorted(str(p) for p in (root / "normal").iterdir())[:8]  # not the first 8
    assert a == sorted(a)  # in folder order


def test_class_folders_without_a_normal_class_warn(tmp_path: Path) -> None:
    root = _folder(tmp_path / "val", {"benign": 3, "tumor": 2})
    with pytest.warns(UserWarning, match="none of the normal classes.*benign, tumor"):
        ds = normal_dataset(root, 16)
    assert len(ds) == 5  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(normal_dataset(root, 16, normal_classes=("benign",))) == 3  # type: ignore


class _Nan(AnomalyScorer):
    name = "nan"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        s = x.mean(dim=(1, 2, 3))
        s[-1] = float("nan")
        return ScoreBatch(s)


def test_non_finite_scores_stop_the_evaluation(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"normal": 4})
    with pytest.raises(DataError, match="non-finite score.*normal_03.png"):
        score_dataset(_Nan(), scoring_dataset(root, 16), batch_size=4, progress=False)


def test_overlap_of_fit_and_threshold_sets_with_the_test_set(tmp_path: Path) -> None:
    test = _folder(tmp_path / "test", {"normal": 6, "tumor": 4})
    other = _folder(tmp_path / "other", {"normal": 5})
    test_ds = scoring_dataset(test, 16)
    got = overlap_with_test(normal_dataset(test, 16), normal_dataset(other, 16), test_ds)
    assert got == {"fit": 6, "val": 0}


def test_run_resize_mode_defaults_for_older_runs() -> None:
    """A run's scorers read patches with its data.resize; a config saved without the key (an
    older gen_ad) keeps the default whole-image rescale."""
    from types import SimpleNamespace

    from gen_ad.app.evaluate import run_resize
    from gen_ad.config import DataConfig, from_dict

    def run(**data: object) -> Any:
        return SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(**{"size": 32, **data})))

    assert run_resize(run(resize="center_crop")) == "center_crop"
    assert run_resize(run()) == "resize"
    assert run_resize(run(**vars(from_dict(DataConfig, {"size": 32})))) == "resize"
