"""``gen-ad knn fit`` and ``gen-ad knn score``: the KNN baseline on folders of patches.

``fit`` embeds a folder of normal patches into a :class:`~gen_ad.baselines.knn.FeatureBank` (or
grows one) and calibrates its label-free threshold; ``score`` scores a folder against a bank
through the evaluation engine (:mod:`gen_ad.app.evaluate`), with the data rules and the
``scores.csv`` format of ``gen-ad score``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gen_ad.app.evaluate import (
    bank_scorer,
    normal_dataset,
    resolve_device,
    score_dataset,
    scoring_dataset,
    write_outputs,
)
from gen_ad.baselines.extractors import build_extractor, describe
from gen_ad.baselines.knn import (
    META,
    FeatureBank,
    Reduction,
    SearchSettings,
    build_bank,
    extend_bank,
    extractor_from_info,
)
from gen_ad.scoring.thresholds import Threshold
from gen_ad.utils.lock import writes_folder


def _normal_loader(root: str | os.PathLike[str], size: int, batch_size: int,
                   workers: int) -> DataLoader:
    return DataLoader(normal_dataset(root, size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=torch.cuda.is_available())


@writes_folder("out", "bank folder")
def fit_folder(extractor_name: str, normal: str | os.PathLike[str], out: str | os.PathLike[str],
               weights: str | None = None, random_init: bool = False, tiny: bool = False,
               k: int = 200, reduction: Reduction = "mean",
               settings: SearchSettings | None = None, size: int | None = None,
               batch_size: int = 64, workers: int = 2, device: str = "auto",
               calib_size: int = 5000, extend: bool = False, seed: int = 0) -> FeatureBank:
    """Build (or with ``extend`` grow) a bank from a folder of normal patches.

    A folder with class subfolders uses only ``normal/``; a flat folder uses all its images.
    """
    device = resolve_device(device)
    root = Path(out).expanduser()
    if extend and (root / META).is_file():
        bank = FeatureBank(root)
        ext = extractor_from_info(bank.meta["extractor"], device, weights)
        size = size or int(bank.meta["extractor"].get("load_size", ext.input_size))
        loader = _normal_loader(normal, size, batch_size, workers)
        return extend_bank(bank, ext, loader, total=len(loader))
    ext = build_extractor(extractor_name, weights=weights, random_init=random_init,
                          device=device, tiny=tiny, seed=seed)
    size = size or ext.input_size
    info = {**describe(ext.spec), "dim": ext.dim, "input_size": ext.input_size,
            "load_size": size, "random_init": random_init, "tiny": tiny, "seed": seed,
            "weights": None if weights is None else str(Path(weights).expanduser().resolve())}
    loader = _normal_loader(normal, size, batch_size, workers)
    return build_bank(ext, loader, out, info, k=k, reduction=reduction, settings=settings,
                      total=len(loader), calib_size=calib_size, seed=seed)


def fit_summary(bank: FeatureBank) -> str:
    """The line ``gen-ad knn fit`` prints: the bank and its threshold."""
    thr = Threshold.load(bank.root / "threshold.json")
    return (f"bank: {bank.root} ({bank.count} x {bank.dim}, extractor "
            f"{bank.meta['extractor']['name']}); threshold (Q3+1.5 IQR of {thr.n} leave-one-out "
            f"normal scores): {thr.value:.6g}")


@writes_folder("out", "knn score output folder")
def score_folder(bank_dir: str | os.PathLike[str], data: str | os.PathLike[str],
                 out: str | os.PathLike[str], batch_size: int = 64, workers: int = 2,
                 device: str = "auto", weights: str | None = None,
                 memory_budget_mb: float | None = None, index: str | None = None,
                 nprobe: int | None = None, size: int | None = None,
                 n_boot: int = 2000) -> dict[str, Any]:
    """Score every patch under ``data`` against a bank; the engine writes ``scores.csv``,
    ``flagged.csv`` (rows above the bank's threshold, highest first) and ``metrics.json``.

    Returns:
        The metrics (``method``, ``n``, ``flagged``, ``threshold``, AUROC/AUPR with CIs when
        ``data`` holds normal and anomalous classes).
    """
    device = resolve_device(device)
    ls = bank_scorer(bank_dir, device=device, weights=weights, memory_budget_mb=memory_budget_mb,
                     index=index, nprobe=nprobe)
    ds = scoring_dataset(data, size or ls.size)
    scored = score_dataset(ls.scorer, ds, batch_size=batch_size, device=device,
                           num_workers=workers)
    return write_outputs(Path(out).expanduser(), scored, None, method=ls.scorer.name,
                         threshold=ls.threshold, n_boot=n_boot)
