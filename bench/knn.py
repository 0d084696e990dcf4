"""Benchmark the KNN baseline: bank build rate, search speed, and bounded memory.

Prints one JSON line with:

* ``build``: patches/s through random-initialised extractors of several sizes (ViT-S/B/L and
  ResNet-50 on CPU; every registered extractor on a GPU), bf16 autocast on GPU;
* ``search``: queries/s at ``k`` for an ``N x D`` bank (clustered Gaussian vectors): exact flat vs
  IVF (nprobe tuned to recall@k >= 0.95, measured recall reported), CPU and GPU when present;
* ``bounded``: an exact search over the bank on disk with a memory budget smaller than the bank,
  run in a fresh process whose peak RSS is reported next to its RSS before searching.

    python bench/knn.py [--n 1000000] [--dim 768] [--k 200] [--budget-mb 512] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_ad.baselines.extractors import build_extractor, extractor_names
from gen_ad.baselines.knn import FeatureBank, KNNIndex, SearchSettings, _faiss
from gen_ad.utils.hardware import cpu_name


def _status_mb(key: str = "VmRSS") -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in MiB, from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clustered(n: int, dim: int, seed: int, n_centers: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).normal(size=(n_centers, dim)).astype(np.float32)
    x = centers[rng.integers(0, n_centers, n)]
    x += 0.5 * rng.standard_normal(size=(n, dim), dtype=np.float32)
    return x


def bench_build(names: Sequence[str], n_batches: int, batch: int, tiny: bool,
                device: str) -> list[dict[str, Any]]:
    """Patches/s of random-initialised extractors on 96x96 inputs (resized inside)."""
    out = []
    for name in names:
        ext = build_extractor(name, random_init=True, tiny=tiny, device=device)
        x = torch.rand(batch, 3, 96, 96, device=device) * 2 - 1
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
               else torch.autocast("cpu", enabled=False))
        with torch.no_grad(), ctx:
            ext(x)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n_batches):
                ext(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
        params = sum(p.numel() for p in ext.parameters())
        out.append({"extractor": name, "device": device, "params_m": round(params / 1e6, 1),
                    "dim": ext.dim, "input": ext.input_size,
                    "patches_per_s": round(n_batches * batch / dt, 2)})
        del ext
    return out


def _write_bank(root: Path, n: int, dim: int, chunk: int) -> FeatureBank:
    bank = FeatureBank.create(root, dim, {"name": "synthetic"}, {"k": 200})
    for i, s in enumerate(range(0, n, chunk)):
        bank.append(_clustered(min(chunk, n - s), dim, seed=i))
    return bank


def _timed_search(index: KNNIndex, q: np.ndarray, k: int) -> tuple[float, np.ndarray, float]:
    index.search(q[:2], k)  # build (and IVF-tune) outside the timing
    t = time.perf_counter()
    _, ids = index.search(q, k)
    dt = time.perf_counter() - t
    return len(q) / dt, ids, dt


def bench_search(bank: FeatureBank, n_queries: int, n_exact: int, k: int, nlist: int,
                 use_gpu: bool) -> list[dict[str, Any]]:
    """Exact vs IVF queries/s over the whole bank held in memory."""
    q = _clustered(n_queries, bank.dim, seed=999)
    big = 1 << 20  # MiB: hold the whole bank in one faiss index
    exact = KNNIndex(bank, SearchSettings(memory_budget_mb=big, use_gpu=use_gpu))
    t = time.perf_counter()
    qps_e, ids_e, dt_e = _timed_search(exact, q[:n_exact], k)
    build_e = time.perf_counter() - t - dt_e
    rows = [{"index": "flat", "gpu": use_gpu, "queries": n_exact, "qps": round(qps_e, 2),
             "load_s": round(build_e, 1)}]
    del exact
    ivf = KNNIndex(bank, SearchSettings(index="ivf", nlist=nlist, memory_budget_mb=big,
                                        use_gpu=use_gpu))
    t = time.perf_counter()
    qps_i, ids_i, dt_i = _timed_search(ivf, q, k)
    build_i = time.perf_counter() - t - dt_i
    recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids_e, ids_i)]))
    rows.append({"index": "ivf", "gpu": use_gpu, "queries": n_queries, "qps": round(qps_i, 2),
                 "nlist": nlist, "nprobe": ivf.tuned.get("nprobe"),
                 "recall_at_k_vs_exact": round(recall, 4), "build_s": round(build_i, 1)})
    return rows


def _bounded_child(root: str, n_queries: int, k: int, budget: float, conn: Any) -> None:
    bank = FeatureBank(root)
    q = _clustered(n_queries, bank.dim, seed=999)
    before = _status_mb("VmRSS")
    index = KNNIndex(bank, SearchSettings(memory_budget_mb=budget, use_gpu=False))
    t = time.perf_counter()
    index.search(q, k)
    dt = time.perf_counter() - t
    peak = _status_mb("VmHWM")  # ru_maxrss would include the parent's RSS at fork time
    conn.send({"rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
               "in_memory_index": index.in_memory, "qps": round(n_queries / dt, 2)})
    conn.close()


def bench_bounded(bank: FeatureBank, n_queries: int, k: int, budget: float) -> dict[str, Any]:
    """Streamed exact search in a fresh process: peak RSS vs the bank size and budget."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_bounded_child, args=(str(bank.root), n_queries, k, budget, send))
    p.start()
    res = recv.recv()
    p.join()
    bank_mb = bank.count * bank.dim * 4 / 2**20
    return {"bank_mb": round(bank_mb, 1), "budget_mb": budget, "queries": n_queries, **res}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="bank vectors")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--queries", type=int, default=1000, help="IVF queries")
    ap.add_argument("--exact-queries", type=int, default=200)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--budget-mb", type=float, default=512.0)
    ap.add_argument("--only", choices=("all", "build", "search", "bounded"), default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.dim, args.k, args.queries, args.exact_queries = 20_000, 32, 20, 100, 50
        args.nlist, args.budget_mb = 64, 1.0
    gpu = torch.cuda.is_available()
    if args.smoke:
        names, tiny, nb, bs = ["dino-vits16", "resnet50"], True, 2, 4
    else:
        names, tiny, nb, bs = ["dino-vits16", "phikon", "uni", "resnet50"], False, 2, 8
    build: list[dict[str, Any]] = []
    search: list[dict[str, Any]] = []
    bounded: dict[str, Any] = {}
    if args.only in ("all", "build"):
        build = bench_build(names, nb, bs, tiny, "cpu")
        if gpu:
            build += bench_build(extractor_names(), 10, 64, tiny, "cuda")
    faiss = _faiss()
    tmp = Path(tempfile.mkdtemp(prefix="gen_ad_knn_bench_"))
    try:
        bank = _write_bank(tmp / "bank", args.n, args.dim, chunk=100_000)
        if args.only in ("all", "bounded"):
            bounded = bench_bounded(bank, args.exact_queries, args.k, args.budget_mb)
        if args.only in ("all", "search"):
            search = bench_search(bank, args.queries, args.exact_queries, args.k, args.nlist,
                                  False)
        if (args.only in ("all", "search") and gpu and faiss is not None
                and hasattr(faiss, "StandardGpuResources")):
            search += bench_search(bank, args.queries, args.exact_queries, args.k, args.nlist,
                                   True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = {
        "bench": "knn", "smoke": args.smoke,
        "settings": {"n": args.n, "dim": args.dim, "k": args.k, "queries": args.queries,
                     "exact_queries": args.exact_queries, "nlist": args.nlist,
                     "budget_mb": args.budget_mb, "data": "clustered gaussian (256 centres)"},
        "hardware": {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                     "threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if gpu else None,
                     "torch": torch.__version__, "python": platform.python_version(),
                     "faiss": getattr(faiss, "__version__", None) if faiss else None},
        "build": build, "search": search, "bounded": bounded,
    }
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
