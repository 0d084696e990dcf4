"""Benchmark memory against folder size: reading a patch folder for training.

For folders of ``N`` PNG patches (``--sizes``), each variant runs one pass over the data through a
DataLoader in a forked process whose peak-RSS mark is reset first (``/proc/self/clear_refs``), and
reports its peak resident memory above the start (``peak_increase_mib``), its seconds (decoding
included) and, at the end, its anonymous (not file-backed) resident memory:

* ``folder``: :class:`~gen_ad.data.folders.PatchFolder`, decoding files at every read;
* ``cache_build``: the first :func:`~gen_ad.data.cache.cached_folder` call (decodes into the cache);
* ``cache`` (ours): later calls, reading the memory-mapped uint8 cache (``data.cache``);
* ``preallocated_uint8`` (peer): every decoded patch written in place into one preallocated uint8
  tensor ``[N,S,S,3]`` (what the cache holds, but in anonymous memory), converted to float per
  batch, as a careful user would write;
* ``preallocated_float32`` (peer): the same into one preallocated float32 tensor ``[N,3,S,S]``;
* ``stacked_float32`` (the peer of the first version, kept as a labelled extra): a list of float32
  tensors ``torch.stack``-ed, so two float32 copies exist at the peak.

Prints one JSON line; ``ours`` / ``peer`` / ``ratio`` compare ``cache`` with the competent peer
(``preallocated_uint8`` or ``preallocated_float32``) of the lowest peak at the largest folder (peak
RSS increase in MiB, lower is better), and ``growth_mib_per_1k`` gives each variant's slope of that
increase against the folder size. What the cache offers over the uint8 tensor is not less memory
(both hold the same bytes) but where they live: file-backed pages the kernel can reclaim and that
every DataLoader worker and every process on the machine shares, and no decoding at start-up after
the first run (``seconds``).

    python bench/memory.py [--sizes 2000 8000 32000] [--size 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import machine  # noqa: E402

VARIANTS = ("folder", "cache_build", "cache", "preallocated_uint8", "preallocated_float32",
            "stacked_float32")
PEERS = ("preallocated_uint8", "preallocated_float32")  # the competent ones
PEER_LAYOUT = {"preallocated_uint8": "uint8 [N,S,S,3], filled in place, float per batch",
               "preallocated_float32": "float32 [N,3,S,S], filled in place",
               "stacked_float32": "list of float32 [3,S,S] tensors, torch.stack (first version)"}


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
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


def _tensor_pass(images: torch.Tensor, batch: int, uint8: bool) -> int:
    """One pass over an in-memory tensor; uint8 ``[N,S,S,3]`` batches become float ``[-1,1]``."""
    seen = 0
    for (b,) in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images),
                                            batch_size=batch):
        x = b.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0) if uint8 else b
        seen += len(x)
    return seen


def _in_memory(variant: str, root: str, size: int) -> int:
    """A peer: decode every patch into memory, then one pass."""
    from gen_ad.data.folders import PatchFolder

    ds = PatchFolder(root=root, size=size)
    if variant == "stacked_float32":
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    elif variant == "preallocated_float32":
        images = torch.empty((len(ds), 3, size, size), dtype=torch.float32)
        for i in range(len(ds)):
            images[i] = ds[i]["image"]
    else:  # preallocated_uint8: the bytes the cache holds, in anonymous memory
        images = torch.empty((len(ds), size, size, 3), dtype=torch.uint8)
        for i in range(len(ds)):
            images[i] = torch.from_numpy(ds.rgb8(i))
    return _tensor_pass(images, 256, uint8=variant == "preallocated_uint8")


def _child(variant: str, root: str, cache: str, size: int, conn: Any) -> None:
    from gen_ad.data.cache import cached_folder
    from gen_ad.data.folders import PatchFolder

    try:
        # reset the peak-RSS mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        pass
    before = _status_mib("VmRSS")
    t = time.perf_counter()
    if variant == "folder":
        seen = _one_pass(PatchFolder(root=root, size=size), 256)
    elif variant in ("cache_build", "cache"):
        seen = _one_pass(cached_folder(cache, root=root, size=size, classes=["normal"]), 256)
    else:  # the peers
        seen = _in_memory(variant, root, size)
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


def _rows(sizes: Sequence[int], size: int) -> list[dict[str, Any]]:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gen_ad_mem_bench_"))
    try:
        for n in sizes:
            root = write_folder(tmp / f"data{n}", n, size)
            row: dict[str, Any] = {"n": n, "folder_mib": round(n * size * size * 3 / 2**20, 1)}
            for v in VARIANTS:
                row[v] = measure(v, root, tmp / "cache", size)
            rows.append(row)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``ours`` / ``peer`` / ``ratio`` at the largest folder against the best competent peer."""
    last = rows[-1]
    growth = {v: _slope(rows, v) for v in VARIANTS}
    ours = last["cache"]["peak_increase_mib"]
    peer = min(PEERS, key=lambda v: last[v]["peak_increase_mib"])

    def fig(v: str) -> dict[str, Any]:
        return {"variant": v, "peak_increase_mib": last[v]["peak_increase_mib"],
                "mib_per_1k": growth[v], "anon_rss_end_mib": last[v]["anon_rss_end_mib"],
                "seconds": last[v]["seconds"]}

    return {"ours": fig("cache"), "peer": {**fig(peer), "layout": PEER_LAYOUT[peer]},
            "peers": {v: {**fig(v), "layout": PEER_LAYOUT[v]} for v in PEERS},
            "ratio": round(ours / max(last[peer]["peak_increase_mib"], 1e-9), 3),
            "ratio_meaning": f"peak-RSS increase of ours / the best competent peer's ({peer}) "
                             "at the largest folder (lower is better)",
            "stacked_float32_list": {**fig("stacked_float32"),
                                     "note": "the first version's peer (two float32 copies at "
                                             "the peak): not a competent peer, kept for the "
                                             "committed lines that used it",
                                     "ratio": round(ours / max(
                                         last["stacked_float32"]["peak_increase_mib"], 1e-9),
                                                    3)},
            "growth_mib_per_1k": growth}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--size", type=int, default=64, help="patch side in pixels")
    ap.add_argument("--smoke", action="store_true", help="tiny folders (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.size = [50, 200], 32
    rows = _rows(a.sizes, a.size)
    rec = {"bench": "memory", "smoke": a.smoke,
           "settings": {"sizes": a.sizes, "patch": a.size, "format": "png", "batch": 256,
                        "workers": 0, "variants": list(VARIANTS),
                        "peer_layouts": PEER_LAYOUT},
           **_summary(rows), "rows": rows, "hardware": machine()}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
