"""Benchmark the KNN baseline: exact search against its peers, bank build rate, bounded memory.

Prints one JSON line. The default (``--only peers``) is the side-by-side of issue 17: gen_ad's exact
search (:class:`gen_ad.baselines.search.ExactKNN`: fp32 candidates + float64 re-rank, memory
budget 1 TiB so that it keeps the bank resident as the peers do) against a plain fp32 matmul +
topk with the bank resident (one fused ``torch.addmm`` with the bank's norms precomputed once, as
ours does) and against faiss' flat search (faiss-gpu on CUDA when installed, faiss-cpu otherwise),
on the same clustered Gaussian bank, after one warm-up call each, interleaved over ``--rounds``
rounds (best round each, as the machine may be shared), with every method's neighbours compared
to a float64 brute force. ``ours``, ``peer`` (the faster of the two peers), ``ratio`` (ours / peer
queries/s) sit at the top level; ``peers.settings`` says what each method ran with (faiss'
thread count included). Sizes: 200k x 768, k = 200, 200 queries on CPU; 1M x 768, k = 200, 1000
and 100 queries on CUDA.

``--only all`` adds the older sections:

* ``build``: patches/s through random-initialised extractors of several sizes (ViT-S/B/L and
  ResNet-50 on CPU; every registered extractor on a GPU), bf16 autocast on GPU;
* ``search``: queries/s at ``k`` for an ``N x D`` bank (clustered Gaussian vectors): exact flat vs
  IVF (nprobe tuned to recall@k >= 0.95, measured recall reported), CPU and GPU when present;
* ``bounded``: an exact search over the bank on disk with a memory budget smaller than the bank,
  run in a fresh process whose peak RSS is reported next to its RSS before searching.

    python bench/knn.py [--device cpu|cuda] [--n N] [--dim 768] [--k 200] [--rounds 3]
                        [--only peers|all|build|search|bounded] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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
from gen_ad.baselines.search import ArraySource, ExactKNN, faiss_has_gpu, order_by_distance

sys.path.append(str(Path(__file__).resolve().parent))  # bench/_common.py when loaded by path
from _common import best, interleaved_rounds, machine  # noqa: E402


def _status_mb(key: str = "VmRSS") -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in MiB, from /proc."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
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


# ----------------------------------------------------------------------------- ours vs peers


def clustered_torch(n: int, dim: int, seed: int, device: torch.device,
                    n_centers: int = 256) -> torch.Tensor:
    """``[n, dim]`` float32: 256 fixed Gaussian centres + N(0, 0.5^2) noise, on ``device``."""
    centers = torch.randn(n_centers, dim, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator(device=device).manual_seed(seed)
    which = torch.randint(0, n_centers, (n,), generator=g, device=device)
    return centers.to(device)[which] + 0.5 * torch.randn(n, dim, generator=g, device=device)


def float64_reference(q: torch.Tensor, bank: torch.Tensor, k: int,
                      block: int = 65536) -> torch.Tensor:
    """Neighbour indices ``[Q, k]`` from float64 products, in (distance, index) order."""
    q64 = q.double()
    qn = q64.pow(2).sum(1, keepdim=True)
    best_d = best_i = None
    for s in range(0, len(bank), block):
        b64 = bank[s:s + block].double()
        d = qn + b64.pow(2).sum(1)[None] - 2.0 * (q64 @ b64.T)
        v, i = torch.topk(d, min(k, len(b64)), dim=1, largest=False)
        i = i + s
        if best_d is not None:
            v, i = torch.cat([best_d, v], 1), torch.cat([best_i, i], 1)
        best_d, best_i = order_by_distance(v, i, k)
    assert best_i is not None
    return best_i


OURS_BUDGET = 1 << 40  # bytes: ours keeps the whole bank resident, as the peers do


def _peer_settings(faiss: Any, ours: ExactKNN, device: torch.device) -> dict[str, Any]:
    """What each method was run with (the figures depend on it)."""
    threads = faiss.omp_get_max_threads() if faiss is not None else None
    return {
        "ours": {"class": "ExactKNN", "memory_budget_bytes": OURS_BUDGET,
                 "bank_resident": bool(ours.resident),
                 "candidates": ("faiss flat search (fp32)" if ours.faiss is not None
                                else "torch.addmm(-||b||^2/2, q, bank^T) + topk (fp32)"),
                 "rerank": "float64, in (distance, index) order",
                 "faiss_threads": threads if ours.faiss is not None else None},
        "plain_matmul_topk": {"op": "torch.addmm(-||b||^2/2, q, bank^T) then torch.topk",
                              "norms": "precomputed once", "dtype": "float32",
                              "bank_resident": True, "torch_threads": torch.get_num_threads()},
        "faiss_flat": (None if faiss is None else
                       {"op": ("IndexFlatL2 on the GPU" if device.type == "cuda"
                               else "faiss.knn (flat L2)"), "dtype": "float32",
                        "threads": threads, "version": getattr(faiss, "__version__", None)}),
    }


def _peers(bank: torch.Tensor, device: torch.device, k: int) -> dict[str, Any]:
    """Search functions ``q [Q, D] on device -> idx [Q, k]``: ours and the peers."""
    faiss = _faiss()
    ours = ExactKNN(ArraySource(bank.cpu().numpy()), device=device,
                    memory_budget_bytes=OURS_BUDGET)
    neg_half_sq = bank.pow(2).sum(1).div_(-2)  # precomputed once, as ours does

    def plain(q: torch.Tensor) -> torch.Tensor:  # fp32, the bank resident, one fused product:
        # rank by q.b - ||b||^2 / 2 = (||q||^2 - ||q - b||^2) / 2
        return torch.topk(torch.addmm(neg_half_sq, q, bank.T), k, dim=1).indices

    fns: dict[str, Any] = {"ours": lambda q: torch.from_numpy(ours.search(q, k)[1]),
                           "plain_matmul_topk": plain}
    if faiss is not None:
        if device.type == "cuda" and faiss_has_gpu(faiss):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0,
                                           faiss.IndexFlatL2(bank.shape[1]))
            index.add(bank.cpu().numpy())
            fns["faiss_gpu_flat"] = lambda q: torch.from_numpy(index.search(q.cpu().numpy(), k)[1])
        elif device.type == "cpu":
            b_np = bank.numpy()
            fns["faiss_cpu_flat"] = lambda q: torch.from_numpy(faiss.knn(q.numpy(), b_np, k)[1])
    return {"fns": fns, "ours": ours, "settings": _peer_settings(faiss, ours, device)}


def bench_peers(n: int, dim: int, k: int, n_queries: Sequence[int], rounds: int,
                device: torch.device) -> dict[str, Any]:
    """Queries/s of ours vs the peers (best of interleaved rounds), neighbours vs float64."""
    bank = clustered_torch(n, dim, 0, device)
    setup = _peers(bank, device, k)
    rows = []
    for nq in n_queries:
        q = clustered_torch(nq, dim, 999, device)
        ref = float64_reference(q, bank, k).cpu()
        same = {}
        for name, fn in setup["fns"].items():  # warm-up (resident copies, faiss index)
            same[name] = float((fn(q).cpu() == ref).all(dim=1).double().mean())
        seconds = interleaved_rounds({name: (lambda f=fn, q=q: f(q)) for name, fn
                                      in setup["fns"].items()}, rounds, device)
        qps = {name: round(nq / dt, 2) for name, dt in best(seconds).items()}
        peer = max((v, name) for name, v in qps.items() if name != "ours")
        rows.append({"queries": nq, "qps": qps, "faster_peer": peer[1],
                     "ratio_vs_faster_peer": round(qps["ours"] / peer[0], 3),
                     "identical_to_float64": same,
                     "round_qps": {name: [round(nq / dt, 2) for dt in v]
                                   for name, v in seconds.items()}})
    return {"rows": rows, "widened_queries": setup["ours"].stats["widened"],
            "ours_backend": "faiss" if setup["ours"].faiss is not None else "torch",
            "settings": setup["settings"]}


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


def older_sections(args: argparse.Namespace) -> dict[str, Any]:
    """The build / IVF search / bounded-memory sections (``--only all|build|search|bounded``)."""
    gpu = torch.cuda.is_available()
    n, queries, exact_queries, nlist, budget = (args.n_older, 1000, args.exact_queries, 1024,
                                                512.0)
    if args.smoke:
        n, queries, exact_queries, nlist, budget = 20_000, 100, 50, 64, 1.0
        names, tiny, nb, bs = ["dino-vits16", "resnet50"], True, 2, 4
    else:
        names, tiny, nb, bs = ["dino-vits16", "phikon", "uni", "resnet50"], False, 2, 8
    out: dict[str, Any] = {"older_settings": {"n": n, "queries": queries, "nlist": nlist,
                                              "exact_queries": exact_queries, "budget_mb": budget}}
    if args.only in ("all", "build"):
        out["build"] = bench_build(names, nb, bs, tiny, "cpu")
        if gpu:
            out["build"] += bench_build(extractor_names(), 10, 64, tiny, "cuda")
    faiss = _faiss()
    tmp = Path(tempfile.mkdtemp(prefix="gen_ad_knn_bench_"))
    try:
        bank = _write_bank(tmp / "bank", n, args.dim, chunk=100_000)
        if args.only in ("all", "bounded"):
            out["bounded"] = bench_bounded(bank, exact_queries, args.k, budget)
        if args.only in ("all", "search"):
            out["search"] = bench_search(bank, queries, exact_queries, args.k, nlist, False)
            if gpu and faiss is not None and hasattr(faiss, "StandardGpuResources"):
                out["search"] += bench_search(bank, queries, exact_queries, args.k, nlist, True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None,
                    help="bank vectors (default 200k on CPU, 1M on CUDA)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--queries", type=int, nargs="+", default=None,
                    help="query counts (default 200 on CPU; 1000 100 on CUDA)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-older", type=int, default=1_000_000, help="bank of the older sections")
    ap.add_argument("--exact-queries", type=int, default=200,
                    help="exact-search queries of the older sections")
    ap.add_argument("--only", choices=("peers", "all", "build", "search", "bounded"),
                    default="peers")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (1_000_000 if cuda else 200_000)
    queries = args.queries or ([1000, 100] if cuda else [200])
    if args.smoke:
        n, args.dim, args.k, queries, args.rounds = 5000, 32, 20, [50], 1
    faiss = _faiss()
    rec: dict[str, Any] = {
        "bench": "knn", "smoke": args.smoke,
        "settings": {"n": n, "dim": args.dim, "k": args.k, "queries": queries,
                     "rounds": args.rounds, "device": str(device),
                     "data": "clustered gaussian (256 centres)", "only": args.only,
                     "ours_memory_budget_bytes": OURS_BUDGET},
    }
    if args.only in ("all", "peers"):
        peers = bench_peers(n, args.dim, args.k, queries, args.rounds, device)
        first = peers["rows"][0]
        rec.update({"ours": {"qps": first["qps"]["ours"], "queries": first["queries"]},
                    "peer": {"name": first["faster_peer"],
                             "qps": first["qps"][first["faster_peer"]]},
                    "ratio": first["ratio_vs_faster_peer"], "peers": peers})
    if args.only != "peers":
        rec.update(older_sections(args))
    rec["hardware"] = {**machine(device),
                       "faiss": getattr(faiss, "__version__", None) if faiss else None,
                       "faiss_threads": faiss.omp_get_max_threads() if faiss else None}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
