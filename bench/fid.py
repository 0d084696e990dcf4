"""Benchmark FID feature extraction (images/s on CPU and GPU) and the real-statistics cache.

Prints one JSON line. Uses the real Inception weights when they are available locally
(``--inception-weights`` or the torch hub cache, never downloaded here) and a random-initialised
Inception otherwise (``"weights": "random-init"``): the speed is the same, the values are not FID.

    python bench/fid.py [--n 256] [--size 64] [--batch-size 64] [--device cpu|cuda] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gen_ad.metrics import fid
from gen_ad.metrics import inception as inc
from gen_ad.utils.hardware import cpu_name
from gen_ad.utils.io import write_bytes

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import machine  # noqa: E402


def _write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` smooth random RGB PNGs (compressible like tissue patches, unlike pure noise)."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for i in range(n):
        f = rs.rand(3, 2) * 12
        img = np.stack([0.5 + 0.5 * np.sin(f[c, 0] * xx + f[c, 1] * yy + rs.rand() * 6)
                        for c in range(3)], -1)
        buf = _png_bytes((img * 255).round().astype(np.uint8))
        write_bytes(folder / f"{i:05d}.png", buf)


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _extractor(weights: str | None, device: str,
               layer: str) -> tuple[inc.FeatureExtractor, str]:
    """Real Inception if its weights are local, else random-init (labelled)."""
    path = weights or (str(inc.inception_cache_path())
                       if inc.inception_cache_path().is_file() else None)
    if path is not None:
        return inc.load_inception(path, device=device, layer=layer), "real"
    return inc.load_inception(device=device, random_init=True, layer=layer), "random-init"


def _images_per_s(ext: inc.FeatureExtractor, n: int, size: int, batch: int) -> float:
    """Throughput of the extractor alone on uint8 batches already in memory (after a warm-up)."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    ext(x[: min(2, batch)])
    sync = torch.cuda.synchronize if ext.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch, n - done)
        ext(x[:b])
        done += b
    sync()
    return n / (time.perf_counter() - t0)


def _cache_timing(ext: inc.FeatureExtractor, folder: Path, batch: int) -> dict[str, float]:
    """First ``real_stats`` call (decode + features + write) vs second (hash + read)."""
    t0 = time.perf_counter()
    first = fid.real_stats(folder, ext, batch_size=batch)
    t1 = time.perf_counter()
    second = fid.real_stats(folder, ext, batch_size=batch)
    t2 = time.perf_counter()
    assert not first.cache_hit and second.cache_hit
    return {"cache_first_s": round(t1 - t0, 4), "cache_second_s": round(t2 - t1, 4),
            "cache_saved_s": round((t1 - t0) - (t2 - t1), 4),
            "cache_speedup": round((t1 - t0) / max(t2 - t1, 1e-9), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="images per measurement")
    ap.add_argument("--size", type=int, default=64, help="image side (Inception resizes to 299)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda if any)")
    ap.add_argument("--inception-weights", default=None)
    ap.add_argument("--layer", default="2048", choices=inc.INCEPTION_LAYERS,
                    help="Inception layer (2048 = FID; the smoke run uses 64)")
    ap.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.size, args.batch_size, args.layer = 4, 32, 4, "64"
    devices = [args.device] if args.device else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    rec: dict[str, Any] = {
        "bench": "fid", "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": {"n": args.n, "size": args.size, "batch_size": args.batch_size,
                     "layer": args.layer, "devices": devices, "smoke": args.smoke}}
    old_cache = os.environ.get("GEN_AD_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GEN_AD_CACHE"] = str(Path(tmp) / "cache")  # a cold, private cache
        try:
            folder = Path(tmp) / "real"
            _write_images(folder, args.n, args.size)
            for dev in devices:
                ext, rec["weights"] = _extractor(args.inception_weights, dev, args.layer)
                rec[f"{torch.device(dev).type}_images_per_s"] = round(
                    _images_per_s(ext, args.n, args.size, args.batch_size), 2)
                if dev == devices[-1]:
                    rec["cache_device"] = dev
                    rec.update(_cache_timing(ext, folder, args.batch_size))
        finally:
            if old_cache is None:
                os.environ.pop("GEN_AD_CACHE", None)
            else:
                os.environ["GEN_AD_CACHE"] = old_cache
    rec["hardware"] = machine(devices[-1])
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
