"""Benchmark memory against folder size: reading a patch folder for training.

For folders of ``N`` PNG patches (``--sizes``), each variant runs one pass over the data through a
DataLoader in a forked process whose peak-RSS mark is reset first (``/proc/self/clear_refs``), and
reports its peak resident memory above the start (``peak_increase_mib``) and, at the end, its
anonymous (non file-backed) resident memory:

* ``folder``: :class:`~gen_ad.data.folders.PatchFolder`, decoding files at every read;
* ``cache_build``: the first :func:`~gen_ad.data.cache.cached_folder` call (decodes into the cache);
* ``cache``: later calls, reading the memory-mapped uint8 cache (``data.cache``);
* ``in_memory`` (the peer): every decoded patch held in one float32 tensor, as a user would write
  to make reading fast.

Prints one JSON line; ``ours`` / ``peer`` / ``ratio`` compare ``cache`` with ``in_memory`` at the
largest folder (peak RSS increase in MiB, lower is better), and ``growth_mib_per_1k`` gives each
variant's slope of that increase against the folder size.

    python bench/memory.py [--sizes 2000 8000 32000] [--size 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gen_ad.utils.hardware import cpu_name


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random-texture RGB PNG patches ``size x size`` under ``root/normal``."""
    rng = np.random.default_rng(seed)
    (root / "normal").mkdir(parents=True)
    base = rng.integers(0, 256, size=(64, size, size, 3), dtype=np.uint8)
    for i in range(n):
        arr = np.roll(base[i % 64], shift=i // 64, axis=0)
        Image.fromarray(arr).save(root / "normal" / f"p{i:07d}.png", compress_level=1)
    return root


def _one_pass(ds: Any, batch: int) -> int:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0)
    return sum(len(b["image"]) for b in loader)


def _child(variant: str, root: str, cache: str, size: int, conn: Any) -> None:
    from gen_ad.data.cache import cached_folder
    from gen_ad.data.folders import PatchFolder

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    except OSError:
        pass
    before = _status_mib("VmRSS")
    t = time.perf_counter()
    if variant == "folder":
        seen = _one_pass(PatchFolder(root=root, size=size), 256)
    elif variant in ("cache_build", "cache"):
        seen = _one_pass(cached_folder(cache, root=root, size=size, classes=["normal"]), 256)
    else:  # in_memory: the peer
        ds = PatchFolder(root=root, size=size)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        ds_mem = torch.utils.data.TensorDataset(images)
        seen = sum(len(b[0]) for b in torch.utils.data.DataLoader(ds_mem, batch_size=256))
    conn.send({"variant": variant, "items": seen, "seconds": round(time.perf_counter() - t, 2),
               "rss_before_mib": round(before, 1), "peak_rss_mib": round(_status_mib("VmHWM"), 1),
               "peak_increase_mib": round(_status_mib("VmHWM") - before, 1),
               "anon_rss_end_mib": round(_status_mib("RssAnon"), 1)})
    conn.close()


def measure(variant: str, root: Path, cache: Path, size: int) -> dict[str, Any]:
    """Run ``variant`` in a forked process and return its memory figures."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(variant, str(root), str(cache), size, send))
    p.start()
    res = recv.recv()
    p.join()
    return res


def _slope(rows: list[dict[str, Any]], variant: str) -> float:
    xs = [r["n"] for r in rows]
    ys = [r[variant]["peak_increase_mib"] for r in rows]
    return round(float(np.polyfit(xs, ys, 1)[0]) * 1000, 2) if len(xs) > 1 else float("nan")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--size", type=int, default=64, help="patch side in pixels")
    ap.add_argument("--smoke", action="store_true", help="tiny folders (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.size = [50, 200], 32
    variants = ("folder", "cache_build", "cache", "in_memory")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gen_ad_mem_bench_"))
    try:
        for n in a.sizes:
            root = write_folder(tmp / f"data{n}", n, a.size)
            row: dict[str, Any] = {"n": n, "folder_mib": round(n * a.size * a.size * 3 / 2**20, 1)}
            for v in variants:
                row[v] = measure(v, root, tmp / "cache", a.size)
            rows.append(row)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    last = rows[-1]
    ours, peer = last["cache"]["peak_increase_mib"], last["in_memory"]["peak_increase_mib"]
    rec = {"bench": "memory", "smoke": a.smoke,
           "settings": {"sizes": a.sizes, "patch": a.size, "format": "png", "batch": 256,
                        "workers": 0},
           "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "python": platform.python_version()},
           "ours": {"variant": "cache", "peak_increase_mib": ours},
           "peer": {"variant": "in_memory", "peak_increase_mib": peer},
           "ratio": round(ours / max(peer, 1e-9), 3),
           "ratio_meaning": "peak-RSS increase of ours / the peer's at the largest folder "
                            "(lower is better)",
           "growth_mib_per_1k": {v: _slope(rows, v) for v in variants},
           "rows": rows}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
