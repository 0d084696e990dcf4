"""DataLoader workers under the ``spawn`` start method (the default on macOS and Windows): the
datasets the training, cache, scoring and KNN paths build must pickle, and everything a worker
imports to rebuild them must be import-safe. Run for real, in a fresh process whose start
method is ``spawn``, with one worker per loader."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPT = '''
import multiprocessing as mp
import sys


def main(root: str, cache: str) -> None:
    import torch

    from gen_ad.app.evaluate import image_batches, normal_dataset, scoring_dataset
    from gen_ad.app.knn import _normal_loader
    from gen_ad.config import DataConfig
    from gen_ad.data import build_dataset
    from gen_ad.training.loop import make_loader

    assert mp.get_start_method() == "spawn"
    ref = f"{root}/normal/n0.png"
    training = {
        "stain+subset": DataConfig(train=root, size=32, stain_norm="reinhard", stain_ref=ref,
                                   subset=3),
        "cache": DataConfig(train=root, size=32, cache=cache, num_workers=1),  # built by 1 worker
    }
    for name, cfg in training.items():
        ds = build_dataset(cfg, "train")
        batches = make_loader(ds, batch=2, seed=0, rank=0, world=1, start=0, num_workers=1)
        batch = next(batches)
        assert batch["image"].shape == (2, 3, 32, 32), name
        del batches  # persistent workers: shut them down
        print("train", name, flush=True)
    scored = next(image_batches(scoring_dataset(root, 32), 4, None, num_workers=1))
    assert scored.shape == (4, 3, 32, 32) and torch.isfinite(scored).all()
    print("score", flush=True)
    bank = next(iter(_normal_loader(normal_dataset(root, 32, limit=3), 3, 1)))
    assert bank["image"].shape == (3, 3, 32, 32)
    print("knn", flush=True)


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    main(sys.argv[1], sys.argv[2])
'''


def _folder(root: Path) -> Path:
    for cls in ("normal", "tumor"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            rgb = np.clip(np.random.default_rng(i).normal(190, 30, (32, 32, 3)), 0, 255)
            rgb[6:26, 6:26] = (110, 50, 150)  # tissue-coloured: a usable stain reference
            Image.fromarray(rgb.astype(np.uint8)).save(root / cls / f"{cls[0]}{i}.png")
    return root


@pytest.mark.slow  # ~70 s on 2 cores (each spawned worker imports torch); the pickling test
# below is the fast guard of the same property
def test_loaders_work_with_spawned_workers(tmp_path: Path,
                                           checkout_env: Callable[..., dict[str, str]]) -> None:
    script = tmp_path / "spawn_loaders.py"
    script.write_text(SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(_folder(tmp_path / "data")),
                           str(tmp_path / "cache")], capture_output=True, text=True,
                          encoding="utf-8", timeout=600, cwd=tmp_path,
                          env=checkout_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["train", "stain+subset", "train", "cache", "score", "knn"], \
        proc.stdout


def test_every_training_dataset_pickles(tmp_path: Path) -> None:
    """What a spawned worker receives, for every kind of training dataset (synthetic included)."""
    from gen_ad.config import DataConfig
    from gen_ad.data import build_dataset

    root = str(_folder(tmp_path / "data"))
    for cfg in (DataConfig(train="synthetic", size=32, synthetic=4),
                DataConfig(train=root, size=32, subset=3),
                DataConfig(train=root, size=32, cache=str(tmp_path / "cache"))):
        ds = build_dataset(cfg, "train")
        again = pickle.loads(pickle.dumps(ds))
        assert torch.equal(again[1]["image"], ds[1]["image"])
