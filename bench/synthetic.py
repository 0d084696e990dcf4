"""Throughput of the procedural H&E generator on one CPU thread; prints one JSON line.

Usage: ``python bench/synthetic.py [--smoke] [--n N] [--sizes 64 256] [--anomaly-fraction F]``.
Reports patches/s by CPU time (the work done by the one thread, robust to other processes on a
shared machine) and by wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gen_ad.data.synthetic import generate
from gen_ad.utils.hardware import cpu_name

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import machine  # noqa: E402


def _measure(n: int, size: int, fraction: float, repeats: int) -> dict[str, float]:
    generate(min(n, 8), size, seed=123, anomaly_fraction=fraction)  # warm-up
    best_cpu, best_wall = float("inf"), float("inf")
    for r in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        generate(n, size, seed=r, anomaly_fraction=fraction)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return {"patches_per_s_cpu": round(n / max(best_cpu, 1e-9), 1),
            "patches_per_s_wall": round(n / max(best_wall, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny run (used by the tests)")
    p.add_argument("--n", type=int, default=1024,
                   help="patches at 64 px (scaled by area for other sizes)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--anomaly-fraction", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes, n, repeats = ([32], 16, 1) if args.smoke else (args.sizes, args.n, args.repeats)
    results = {}
    for size in sizes:
        n_size = max(4, n * 64 * 64 // (size * size))
        results[str(size)] = {"n": n_size, **_measure(n_size, size, args.anomaly_fraction, repeats)}
    record = {
        "bench": "synthetic", "smoke": args.smoke, "anomaly_fraction": args.anomaly_fraction,
        "threads": torch.get_num_threads(), "results": results,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "settings": {"n": n, "sizes": sizes, "repeats": repeats,
                     "anomaly_fraction": args.anomaly_fraction, "smoke": args.smoke},
        "hardware": machine(),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
