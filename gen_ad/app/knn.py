"""``gen-ad knn fit`` and ``gen-ad knn score``: the KNN baseline on folders of patches.

``fit`` embeds a folder of normal patches into a :class:`~gen_ad.baselines.knn.FeatureBank` (or
grows one) and calibrates its label-free threshold; ``score`` scores a folder against a bank.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_ad.baselines.knn import (
    META,
    FeatureBank,
    KNNScorer,
    Reduction,
    SearchSettings,
    bank_settings,
    build_bank,
    extend_bank,
    extractor_from_info,
)
from gen_ad.utils.io import write_json
from gen_ad.utils.lock import writes_folder


def _loader(root: str | os.PathLike[str], size: int, batch_size: int, workers: int,
            normal_only: bool) -> Any:
    from torch.utils.data import DataLoader

    from gen_ad.data.folders import PatchFolder, discover_classes

    classes = None
    if normal_only:
        found, flat = discover_classes(root)
        classes = None if flat or "normal" not in found else ["normal"]
    ds = PatchFolder(root=root, size=size, classes=classes)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


@writes_folder("out", "bank folder")
def fit_folder(extractor_name: str, normal: str | os.PathLike[str], out: str | os.PathLike[str],
               weights: str | None = None, random_init: bool = False, tiny: bool = False,
               k: int = 200, reduction: Reduction = "mean",
               settings: SearchSettings | None = None, size: int | None = None,
               batch_size: int = 64, workers: int = 2, device: str = "cpu",
               calib_size: int = 5000, extend: bool = False, seed: int = 0) -> FeatureBank:
    """Build (or with ``extend`` grow) a bank from a folder of normal patches.

    A folder with class subfolders uses only ``normal/``; a flat folder uses all its images.
    """
    root = Path(out).expanduser()
    if extend and (root / META).is_file():
        bank = FeatureBank(root)
        ext = extractor_from_info(bank.meta["extractor"], device, weights)
        size = size or int(bank.meta["extractor"].get("load_size", ext.input_size))
        loader = _loader(normal, size, batch_size, workers, normal_only=True)
        return extend_bank(bank, ext, loader, total=len(loader))
    from gen_ad.baselines.extractors import build_extractor, describe

    ext = build_extractor(extractor_name, weights=weights, random_init=random_init,
                          device=device, tiny=tiny, seed=seed)
    size = size or ext.input_size
    info = {**describe(ext.spec), "dim": ext.dim, "input_size": ext.input_size,
            "load_size": size, "random_init": random_init,
            "tiny": tiny, "seed": seed,
            "weights": None if weights is None else str(Path(weights).expanduser().resolve())}
    loader = _loader(normal, size, batch_size, workers, normal_only=True)
    return build_bank(ext, loader, out, info, k=k, reduction=reduction, settings=settings,
                      total=len(loader), calib_size=calib_size, seed=seed)


@writes_folder("out", "knn score output folder")
def score_folder(bank_dir: str | os.PathLike[str], data: str | os.PathLike[str],
                 out: str | os.PathLike[str], batch_size: int = 64, workers: int = 2,
                 device: str = "cpu", weights: str | None = None,
                 memory_budget_mb: float | None = None, index: str | None = None,
                 nprobe: int | None = None, size: int | None = None) -> dict[str, Any]:
    """Score every patch under ``data``; write ``scores.csv`` and ``flagged.csv`` into ``out``.

    ``scores.csv`` columns: ``path,label,cls,score,flagged`` (label 0 normal, 1 anomalous, from
    the class folder). ``flagged.csv``: the rows above the bank's threshold, highest first.
    Returns a summary (count, flagged, threshold, AUROC when both labels are present).
    """
    bank = FeatureBank(bank_dir)
    st = bank.settings
    settings = bank_settings(bank, memory_budget_mb=memory_budget_mb, index=index, nprobe=nprobe)
    ext = extractor_from_info(bank.meta["extractor"], device, weights)
    scorer = KNNScorer(ext, bank, k=int(st.get("k", 200)), reduction=st.get("reduction", "mean"),
                       settings=settings)
    size = size or int(bank.meta["extractor"].get("load_size", ext.input_size))
    loader = _loader(data, size, batch_size, workers, normal_only=False)
    scores, paths, labels, classes = [], [], [], []
    for batch in loader:
        scores.append(scorer.score(batch["image"]).scores.numpy())
        paths.extend(batch["path"])
        labels.extend(int(v) for v in batch["label"])
        classes.extend(batch["cls"])
    s = np.concatenate(scores).astype(np.float64)
    thr = scorer.threshold.value if scorer.threshold is not None else math.inf
    return _write_scores(Path(out).expanduser(), s, paths, labels, classes, thr)


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _write_scores(out: Path, s: np.ndarray, paths: list[str], labels: list[int],
                  classes: list[str], thr: float) -> dict[str, Any]:
    from gen_ad.utils.io import write_text

    flagged = s > thr
    rows = [f"{_csv_field(p)},{y},{_csv_field(c)},{v:.6g},{int(f)}"
            for p, y, c, v, f in zip(paths, labels, classes, s, flagged)]
    header = "path,label,cls,score,flagged"
    write_text(out / "scores.csv", "\n".join([header, *rows]) + "\n")
    order = [i for i in np.argsort(-s, kind="stable") if flagged[i]]
    write_text(out / "flagged.csv", "\n".join([header, *(rows[i] for i in order)]) + "\n")
    summary: dict[str, Any] = {"count": int(len(s)), "flagged": int(flagged.sum()),
                               "threshold": float(thr)}
    y = np.asarray(labels)
    if len(np.unique(y)) == 2:
        from gen_ad.metrics.detection import auroc

        summary["auroc"] = auroc(s, y)
    write_json(out / "summary.json", summary)
    return summary
