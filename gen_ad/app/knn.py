"""``gen-ad knn fit`` and ``gen-ad knn score``: the KNN baseline on folders of patches.

``fit`` embeds a folder of normal patches into a :class:`~gen_ad.baselines.knn.FeatureBank` (or
grows one) and calibrates its label-free threshold; ``score`` scores a folder against a bank
through the evaluation engine (:mod:`gen_ad.app.evaluate`), with the data rules and the
``scores.csv`` format of ``gen-ad score``. ``score`` may search with another ``k`` than the bank
was fitted with, and may take its threshold from held-out normal patches instead of the bank's
leave-one-out scores; ``metrics.json`` records which (``k``, ``threshold_source``).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from gen_ad.app.evaluate import (
    LoadedScorer,
    bank_scorer,
    dataset_paths,
    limited,
    normal_dataset,
    resolve_device,
    score_dataset,
    scoring_dataset,
    write_outputs,
)
from gen_ad.app.score import clear_outputs
from gen_ad.baselines.bank import saved_threshold
from gen_ad.baselines.extractors import (
    build_extractor,
    describe,
    extractor_names,
    get_spec,
    training_resolution,
    weights_identity,
)
from gen_ad.baselines.knn import (
    META,
    FeatureBank,
    KNNScorer,
    Precision,
    Reduction,
    SearchSettings,
    bank_settings,
    build_bank,
    check_no_bank,
    extend_bank,
    extractor_from_info,
    resolved,
    shared_files,
)
from gen_ad.errors import CheckpointError, ConfigError, DataError
from gen_ad.scoring.thresholds import Threshold, calibrate
from gen_ad.utils.lock import writes_folder
from gen_ad.utils.workers import worker_init


def _normal_loader(ds: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init(workers))


def new_images(ds: Dataset, bank: FeatureBank, folder: str | os.PathLike[str]) -> Dataset:
    """The images of ``ds`` whose file is not in ``bank`` yet (the count skipped is printed).

    Raises:
        DataError: every image of ``folder`` is in the bank already.
    """
    known = {resolved(p) for p in bank.paths if p}
    paths: list[str] = ds.paths  # type: ignore[attr-defined]
    keep = [j for j, p in enumerate(paths) if resolved(p) not in known]
    if not keep:
        raise DataError(f"all {len(paths)} images of {folder} are in the bank at {bank.root} "
                        "already: nothing to add")
    if len(keep) < len(paths):
        print(f"skipping {len(paths) - len(keep)} of {len(paths)} images of {folder}: already "
              "in the bank")
        return Subset(ds, keep)
    return ds


@writes_folder("out", "bank folder")
def fit_folder(extractor_name: str, normal: str | os.PathLike[str], out: str | os.PathLike[str],
               weights: str | None = None, random_init: bool = False, tiny: bool = False,
               k: int = 200, reduction: Reduction = "mean",
               settings: SearchSettings | None = None, size: int | None = None,
               batch_size: int = 64, workers: int = 2, device: str = "auto",
               calib_size: int = 5000, extend: bool = False, seed: int = 0,
               precision: Precision = "fp32") -> FeatureBank:
    """Build (or with ``extend`` grow) a bank from a folder of normal patches.

    A folder with class subfolders uses only ``normal/``; a flat folder uses all its images.
    Extending skips images already in the bank and embeds in the bank's recorded precision
    (``precision`` applies to a new bank); the weights file must be the one it was fitted with.
    The bank records the weights file, its sha256 and size (``weights_identity``). Nothing is
    published before the end: an interrupted fit leaves no bank at ``out``, an interrupted
    extend the previous bank with its threshold (:mod:`gen_ad.baselines.bank`); a failed fit
    that created ``out`` leaves no folder there either (:mod:`gen_ad.utils.lock`). A new
    bank's ``k`` is checked against the images found before the extractor is loaded
    (:func:`check_bank_k`: ``k`` must be below their number, one warning above a quarter).
    """
    device = resolve_device(device)
    root = Path(out).expanduser()
    if extend and (root / META).is_file():
        bank = FeatureBank(root)
        ext = extractor_from_info(bank.meta["extractor"], device, weights)
        size = size or int(bank.meta["extractor"].get("load_size", ext.input_size))
        loader = _normal_loader(new_images(normal_dataset(normal, size), bank, normal),
                                batch_size, workers)
        resources = None if settings is None else bank_settings(  # the bank's metric, index
            bank, memory_budget_mb=settings.memory_budget_mb, backend=settings.backend,
            use_gpu=settings.use_gpu)
        return extend_bank(bank, ext, loader, total=len(loader), settings=resources)
    check_no_bank(root)  # before loading the extractor or reading a single image
    check_bank_k(k, count_normal_images(normal), normal)  # before embedding a single image
    ext = build_extractor(extractor_name, weights=weights, random_init=random_init,
                          device=device, tiny=tiny, seed=seed)
    size = size or ext.input_size
    info = {**describe(ext.spec), "dim": ext.dim, "input_size": ext.input_size,
            "load_size": size, "random_init": random_init, "tiny": tiny, "seed": seed,
            "weights": None if weights is None else str(Path(weights).expanduser().resolve()),
            "weights_identity": weights_identity(ext, random_init, seed)}
    loader = _normal_loader(normal_dataset(normal, size), batch_size, workers)
    return build_bank(ext, loader, out, info, k=k, reduction=reduction, settings=settings,
                      total=len(loader), calib_size=calib_size, seed=seed, precision=precision)


def count_normal_images(normal: str | os.PathLike[str]) -> int:
    """How many image files :func:`~gen_ad.app.evaluate.normal_dataset` would read from
    ``normal`` (its ``normal/`` class when it has one, else all), counted without decoding."""
    from gen_ad.data.folders import discover_classes

    with warnings.catch_warnings():  # normal_dataset gives discover_classes' warnings once
        warnings.simplefilter("ignore")
        found, _ = discover_classes(normal)
    return len(found["normal"]) if "normal" in found else sum(map(len, found.values()))


def check_bank_k(k: int, n: int, normal: str | os.PathLike[str]) -> None:
    """Refuse a ``k`` the ``n`` normal images cannot serve (leave-one-out needs ``k`` others);
    warn, in one line, when ``k`` is more than a quarter of them.

    Raises:
        DataError: ``k >= n``.
    """
    if k >= n:
        raise DataError(f"{normal} holds {n} normal images; k={k} needs at least {k + 1} "
                        f"(use more normal data or a smaller --k, e.g. --k {_sqrt_k(n)})")
    if 4 * k > n:
        warnings.warn(f"k={k} is {k / n:.0%} of the {n} normal images of {normal}: each score "
                      "averages the distances to most of the bank, so it measures distance to "
                      f"the bank as a whole more than to the nearest normal patches (a smaller "
                      f"--k, e.g. {_sqrt_k(n)} = round(sqrt({n})), keeps it local)", stacklevel=3)


def _sqrt_k(n: int) -> int:
    return max(1, min(n - 1, round(math.sqrt(n))))


def extractors_line() -> str:
    """The registered extractors, and which need ``gen-ad weights install`` or no weights."""
    specs = [get_spec(n) for n in extractor_names()]
    installed = [s.name for s in specs if s.installed]
    no_weights = [s.name for s in specs if not (s.installed or s.hf_repo or s.url)]
    return (f"{', '.join(s.name for s in specs)} (needing `gen-ad weights install`: "
            f"{', '.join(installed)}; no weights: {', '.join(no_weights)})")


def fit_summary(bank: FeatureBank) -> str:
    """The lines ``gen-ad knn fit`` prints: the bank, its weights and precision, the training
    resolution of its extractor, and its threshold."""
    thr, _ = saved_threshold(bank)
    if thr is None:  # a fit or an extend commits its threshold with the bank
        raise CheckpointError(f"{bank.root} holds no threshold: re-run `gen-ad knn fit`")
    info = bank.meta["extractor"]
    return (f"bank: {bank.root} ({bank.count} x {bank.dim}, extractor {info['name']}, weights "
            f"{_weights_line(info)}, {info.get('precision', 'unrecorded')} embeddings)\n"
            f"extractor {info['name']}: {training_resolution(get_spec(info['name']))}\n"
            f"threshold (Q3+1.5 IQR of {thr.n} leave-one-out normal scores): {thr.value:.6g}")


def _weights_line(info: dict[str, Any]) -> str:
    rec = info.get("weights_identity") or {}
    if rec.get("kind") == "file":
        return f"{rec['file']} (sha256 {str(rec['sha256'])[:12]}...)"
    if rec.get("kind") == "random-init" or info.get("random_init"):
        return "RANDOM-INIT (no pretrained weights)"
    return "none" if rec.get("kind") == "none" else "unrecorded"


def knn_threshold(ls: LoadedScorer, *, k: int | None = None,
                  normal: str | os.PathLike[str] | None = None, method: str = "iqr",
                  fpr: float = 0.05, batch_size: int = 64, device: str = "cpu",
                  workers: int = 0) -> tuple[Threshold, str]:
    """Set the search's ``k`` and pick the threshold of a bank scorer.

    The bank's saved threshold (``Q3 + 1.5 IQR`` of leave-one-out scores at the fitted ``k``;
    re-calibrated at load when it was saved for other vectors) is kept when nothing changes;
    another ``k`` or rule re-runs the leave-one-out calibration in memory (the bank folder is not
    written); ``normal`` calibrates on those held-out normal patches' scores instead (the bank is
    searched, never refitted).

    Returns:
        ``(threshold, source)``: the threshold and one line saying where it came from.
    """
    sc = ls.scorer
    assert isinstance(sc, KNNScorer) and sc.index is not None
    fitted_k = sc.k
    if k is not None:
        if k >= sc.index.count:
            raise ConfigError(f"--k {k} needs more than {k} bank vectors; the bank has "
                              f"{sc.index.count}")
        sc.k = int(k)
    if normal is not None:
        nds = normal_dataset(normal, ls.size, resize=ls.resize)
        scored = score_dataset(sc, nds, batch_size=batch_size, device=device, keep_maps=False,
                               num_workers=workers)
        return (calibrate(scored.scores, method=method, fpr=fpr),
                f"{method} of {len(scored.scores)} held-out normal patches ({normal}), k={sc.k}")
    if sc.k == fitted_k and method == "iqr" and ls.threshold is not None:
        return ls.threshold, (f"iqr of the bank's leave-one-out scores (k={sc.k}, "
                              f"{sc.threshold_source or 'saved at fit'})")
    st = sc.index.source.settings if isinstance(sc.index.source, FeatureBank) else {}
    sc.calib_size, sc.seed = int(st.get("calib_size", 5000)), int(st.get("seed", 0))
    sc.calibrate()
    assert sc.calib_scores is not None
    return (calibrate(sc.calib_scores, method=method, fpr=fpr),
            f"{method} of {len(sc.calib_scores)} bank leave-one-out scores, k={sc.k} "
            f"(re-calibrated; the bank was fitted with k={fitted_k})")


@writes_folder("out", "knn score output folder")
def score_folder(bank_dir: str | os.PathLike[str], data: str | os.PathLike[str],
                 out: str | os.PathLike[str], batch_size: int = 64, workers: int = 2,
                 device: str = "auto", weights: str | None = None,
                 memory_budget_mb: float | None = None, index: str | None = None,
                 nprobe: int | None = None, size: int | None = None,
                 n_boot: int = 2000, k: int | None = None,
                 normal: str | os.PathLike[str] | None = None, threshold_method: str = "iqr",
                 fpr: float = 0.05, limit: int | None = None) -> dict[str, Any]:
    """Score every patch under ``data`` against a bank; the engine writes ``scores.csv``,
    ``flagged.csv`` (rows above the threshold, highest first) and ``metrics.json``.

    ``k``, ``normal``, ``threshold_method`` and ``fpr``: see :func:`knn_threshold`; ``limit``:
    score only this many patches, a seeded random choice (as ``gen-ad score --limit``).

    Returns:
        The metrics (``method``, ``n``, ``k``, ``flagged``, ``threshold``, ``threshold_source``,
        AUROC/AUPR with CIs when ``data`` holds normal and anomalous classes).
    """
    device = resolve_device(device)
    ls = bank_scorer(bank_dir, device=device, weights=weights, memory_budget_mb=memory_budget_mb,
                     index=index, nprobe=nprobe)
    if size is not None:
        ls.size = size
    thr, source = knn_threshold(ls, k=k, normal=normal, method=threshold_method, fpr=fpr,
                                batch_size=batch_size, device=device, workers=workers)
    full = scoring_dataset(data, ls.size, resize=ls.resize)  # as the bank was read (resize)
    ds, extra = limited(full, limit)
    assert isinstance(ls.scorer, KNNScorer)
    overlap = bank_overlap(FeatureBank(bank_dir).paths, dataset_paths(ds) or [])
    scored = score_dataset(ls.scorer, ds, batch_size=batch_size, device=device,
                           num_workers=workers)
    clear_outputs(out)  # no stale flagged.csv / metrics.json of an earlier run beside these
    return write_outputs(Path(out).expanduser(), scored, None, method=ls.scorer.name,
                         threshold=thr, n_boot=n_boot,
                         extra={"k": ls.scorer.k, "threshold_source": source,
                                "images_also_in_bank": overlap, **extra})


def bank_overlap(bank_paths: list[str], query_paths: list[str]) -> int:
    """How many query images are bank images too (same resolved file), with a warning: each
    finds itself at distance 0, so its score is biased low (and so are the percentages of a
    group analysis that scores the slides the bank came from)."""
    n = shared_files(query_paths, bank_paths)
    if n:
        warnings.warn(f"{n} of {len(query_paths)} images to score are in the KNN bank itself: "
                      "each finds itself at distance 0 and scores too low (metrics.json "
                      "'images_also_in_bank'); build the bank from other images or slides",
                      stacklevel=2)
    return n
