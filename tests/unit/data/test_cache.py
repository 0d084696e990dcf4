"""The memory-mapped patch cache returns exactly the folder's items, is built once, and follows
the folder's content."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.config import DataConfig
from gen_ad.data import build_dataset
from gen_ad.data.cache import PatchCache, cached_folder
from gen_ad.data.folders import PatchFolder


def _folder(root: Path, n_normal: int = 7, n_tumor: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in (("normal", n_normal), ("tumor", n_tumor)):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(40 + i % 3, 36, 3), dtype=np.uint8)
            where = root / cls / ("sub" if i % 2 else "") / f"p{i}.png"
            Image.fromarray(arr).save(where)
    return root


def _assert_same_items(a: object, b: object) -> None:
    assert len(a) == len(b)  # type: ignore[arg-type]
    for i in range(len(a)):  # type: ignore[arg-type]
        x, y = a[i], b[i]  # type: ignore[index]
        assert set(x) == set(y)
        assert torch.equal(x["image"], y["image"])
        assert (x["label"], x["path"], x["cls"]) == (y["label"], y["path"], y["cls"])


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_returns_the_folders_tensors(tmp_path: Path, workers: int) -> None:
    root = _folder(tmp_path / "data")
    kw = dict(root=root, size=32, classes=["normal", "tumor"], normal_classes=["normal"])
    folder = PatchFolder(**kw)
    cache = cached_folder(tmp_path / "cache", workers=workers, **kw)
    assert isinstance(cache, PatchCache) and len(cache) == 10
    _assert_same_items(folder, cache)
    assert cache.labels == folder.labels
    assert cache[-1]["path"] == folder[9]["path"]
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives
    assert clone._maps is None and torch.equal(clone[3]["image"], folder[3]["image"])


def test_cache_is_built_once_and_follows_the_content(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    kw = dict(root=root, size=32, classes=["normal"])
    first = cached_folder(tmp_path / "cache", **kw)
    stamp = os.stat(first.folder / "images.u8").st_mtime_ns
    again = cached_folder(tmp_path / "cache", **kw)
    assert again.folder == first.folder
    assert os.stat(again.folder / "images.u8").st_mtime_ns == stamp  # opened, not rebuilt
    other_size = cached_folder(tmp_path / "cache", **{**kw, "size": 16})
    assert other_size.folder != first.folder and other_size[0]["image"].shape == (3, 16, 16)
    target = root / "normal" / "p0.png"
    Image.fromarray(np.zeros((40, 36, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a changed file: new key, new cache
    changed = cached_folder(tmp_path / "cache", **kw)
    assert changed.folder != first.folder
    _assert_same_items(PatchFolder(**kw), changed)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_build_dataset_uses_the_cache(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    cfg = DataConfig(train=str(root), size=24, cache=str(tmp_path / "cache"))
    ds = build_dataset(cfg)
    assert isinstance(ds, PatchCache)
    _assert_same_items(build_dataset(DataConfig(train=str(root), size=24)), ds)


def test_memory_bench_smoke_prints_one_json_line(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("memory.py")
    assert rec["bench"] == "memory" and [r["n"] for r in rec["rows"]] == [50, 200]
    assert all(r["cache"]["items"] == r["n"] for r in rec["rows"])
    assert rec["ours"]["peak_increase_mib"] >= 0 and rec["ratio"] > 0
    # the ratio is against the best competent peer, the stacked float32 list only an extra
    last = rec["rows"][-1]
    assert rec["peer"]["variant"] in ("preallocated_uint8", "preallocated_float32")
    assert rec["peer"]["peak_increase_mib"] == min(last[v]["peak_increase_mib"]
                                                   for v in rec["peers"])
    assert all(last[v]["items"] == last["n"] for v in rec["settings"]["variants"])
    assert "stacked_float32_list" in rec and "commit" in rec["hardware"]


def test_a_cache_installed_meanwhile_by_another_process_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes build the same cache: the second to rename finds the first's in place
    (the rename fails with ENOTEMPTY), checks it and uses it, dropping its own temporary copy
    (the launch died on that error before)."""
    from gen_ad.data.cache import build_cache

    folder = PatchFolder(root=_folder(tmp_path / "data"), size=16, classes=["normal"])
    where = tmp_path / "cache" / "k"
    real = os.replace

    def racing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == where:  # just before our folder is renamed into place
            monkeypatch.setattr(os, "replace", real)
            build_cache(folder, where, "key")  # the other process finishes first
        real(src, dst)

    monkeypatch.setattr(os, "replace", racing)
    cache = build_cache(folder, where, "key")
    assert cache.folder == where
    _assert_same_items(folder, cache)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k"]  # no temporary left


def test_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    kw = dict(root=root, size=16, classes=["normal"])
    first = cached_folder(tmp_path / "cache", **kw)
    images = first.folder / "images.u8"
    images.write_bytes(images.read_bytes()[:100])  # truncated (a disk filled up, a bad copy)
    with pytest.warns(UserWarning, match="incomplete or stale: rebuilding"):
        again = cached_folder(tmp_path / "cache", **kw)
    assert again.folder == first.folder
    _assert_same_items(PatchFolder(**kw), again)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.folder.name]


def test_a_killed_builds_folder_is_removed_once_abandoned(tmp_path: Path) -> None:
    """A build killed midway leaves ``.<key>.tmp-<pid>-*``; the next build removes it when its
    process is gone and it has not changed for an hour (not a live build elsewhere)."""
    import subprocess
    import sys

    root = _folder(tmp_path / "data")
    kw = dict(root=root, size=16, classes=["normal"])
    first = cached_folder(tmp_path / "cache", **kw)
    name = first.folder.name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    old_dead = tmp_path / "cache" / f".{name}.tmp-{dead}-0123abcd"
    new_dead = tmp_path / "cache" / f".{name}.tmp-{dead}-4567abcd"  # touched just now
    alive = tmp_path / "cache" / f".{name}.tmp-{os.getpid()}-89abcdef"  # a live process's
    for p in (old_dead, new_dead, alive):
        p.mkdir()
        (p / "images.u8").write_bytes(b"x")
    for p in (old_dead, alive):
        for q in (p / "images.u8", p):
            os.utime(q, (1_000_000, 1_000_000))
    from gen_ad.data.cache import remove_dir

    remove_dir(first.folder)  # force a rebuild
    with pytest.warns(UserWarning, match="removed 1 abandoned patch-cache build"):
        cached_folder(tmp_path / "cache", **kw)
    assert not old_dead.exists() and new_dead.exists() and alive.exists()
