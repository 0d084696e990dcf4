"""Benchmark the evaluation engine against the number of scored images: peak memory and time.

``N`` synthetic images (``--size`` px, a square anomaly with its mask in every fourth) are scored
by a box-blur residual scorer (model cost negligible) through the real engine
(:func:`~gen_ad.app.evaluate.score_dataset`, then :func:`~gen_ad.app.evaluate.detection_metrics`
with pixel metrics and 2000 bootstrap resamples), each variant in a forked process whose peak-RSS
mark is reset first (``/proc/self/clear_refs``):

* ``ours``: the engine's defaults: maps and masks streamed into stores (a temporary file beyond
  256 MB), pixel metrics streamed in chunks beyond ``EXACT_PIXELS`` pixels;
* ``in_memory_exact`` (the previous behaviour's algorithm): every map and mask kept in memory and
  the exact pooled pixel metrics (one sort of all pixels) at any size. The previous version also
  concatenated a list of batches (a second copy at the end of scoring), not reproduced here.

Prints one JSON line: per ``N`` and variant the peak-RSS increase (MiB) and seconds per stage,
``heap_after_score_mib`` (resident memory scoring left behind beyond the stores' in-memory maps
and masks: the per-image results, heap the allocator kept, and about 14 MiB of one-off
first-call allocations), the pixel AUROC of each, and ``ours`` / ``peer`` / ``ratio`` (peak-RSS
increase at the largest ``N``).

    python bench/evaluation.py [--sizes 2000 8000 32000] [--size 32] [--n-boot 2000] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import machine  # noqa: E402

from gen_ad.scoring.base import AnomalyScorer, ScoreBatch  # noqa: E402

VARIANTS = ("ours", "in_memory_exact")


class Tiles(Dataset):
    """``n`` seeded noise images; every fourth has a bright square and its mask."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, self.size, self.size, generator=g) * 0.4 - 0.2
        mask = torch.zeros(self.size, self.size)
        if i % 4 == 0:
            r = 2 + i % 5
            c = (i * 7) % (self.size - 2 * r) + r
            img[:, c - r:c + r, c - r:c + r] += 0.8
            mask[c - r:c + r, c - r:c + r] = 1.0
        return {"image": img, "label": int(i % 4 == 0), "path": f"t/{i:07d}.png",
                "cls": "tumor" if i % 4 == 0 else "normal", "mask": mask}


class Blur(AnomalyScorer):
    """Reconstruction = 5x5 box blur; map = mean absolute residual; score = max + noise."""

    name = "blur"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        recon = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
        maps = (x - recon).abs().mean(1)
        noise = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(len(x)))
        return ScoreBatch(maps.flatten(1).amax(1) + 0.3 * noise, maps, recon)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(variant: str, n: int, size: int, n_boot: int, conn: Any) -> None:
    from gen_ad.app import evaluate as ev
    from gen_ad.metrics import localisation

    torch.set_num_threads(1)
    kw: dict[str, Any] = {}
    if variant == "in_memory_exact":
        kw["memory_bytes"] = 2**62
        localisation.EXACT_PIXELS = 2**62  # type: ignore[misc]
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")  # reset VmHWM
    except OSError:
        pass
    before = _status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as spill:
        t = time.perf_counter()
        scored = ev.score_dataset(Blur(), Tiles(n, size), batch_size=256, progress=False,
                                  spill_dir=spill, **kw)
        t_score, peak_score = time.perf_counter() - t, _status_mib("VmHWM") - before
        stored = sum(st.count * st.item_bytes for st in (scored.maps, scored.masks)
                     if st is not None and not st.spilled) / 2**20
        heap_score = _status_mib("VmRSS") - before - stored  # what scoring left beyond stores
        t = time.perf_counter()
        metrics = ev.detection_metrics(scored, n_boot=n_boot)
        t_metrics = time.perf_counter() - t
    conn.send({"variant": variant, "score_s": round(t_score, 2), "metrics_s": round(t_metrics, 2),
               "peak_after_score_mib": round(peak_score, 1),
               "heap_after_score_mib": round(heap_score, 1),
               "peak_increase_mib": round(_status_mib("VmHWM") - before, 1),
               "pixel_auroc": metrics["pixel"]["auroc"], "aupro": metrics["pixel"]["aupro"],
               "streamed": "approximation" in metrics["pixel"]})
    conn.close()


def measure(variant: str, n: int, size: int, n_boot: int) -> dict[str, Any]:
    """Run ``variant`` at ``n`` images in a forked process and return its figures."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(variant, n, size, n_boot, send))
    p.start()
    res = recv.recv()
    p.join()
    return res


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true", help="tiny sets (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.size, a.n_boot = [64, 256], 16, 50
    rows = [{"n": n, "pixels": n * a.size * a.size,
             **{v: measure(v, n, a.size, a.n_boot) for v in VARIANTS}} for n in a.sizes]
    last = rows[-1]
    ours, peer = last["ours"]["peak_increase_mib"], last["in_memory_exact"]["peak_increase_mib"]
    rec = {"bench": "evaluation", "smoke": a.smoke,
           "settings": {"sizes": a.sizes, "image": a.size, "n_boot": a.n_boot, "batch": 256,
                        "scorer": "5x5 box-blur residual", "variants": list(VARIANTS)},
           "ours": {"n": last["n"], **last["ours"]},
           "peer": {"n": last["n"], **last["in_memory_exact"]},
           "ratio": round(ours / max(peer, 1e-9), 3),
           "ratio_meaning": "peak-RSS increase of ours / in_memory_exact at the largest N "
                            "(lower is better)",
           "rows": rows, "hardware": machine()}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
