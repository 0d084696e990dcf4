"""One evaluation for every method: ``gen-ad benchmark --config configs/benchmark/<name>.yaml``.

A benchmark config lists methods, each either a trained run (run folder + scorer name + keyword
arguments) or the KNN baseline (extractor, weights or random init, ``k``, normal bank folder).
:func:`prepare_methods` turns each entry into an :class:`~gen_ad.scoring.base.AnomalyScorer`;
from then on every method goes through the same code (:func:`evaluate_method`): fit (calibration
only) on its normal fit folder, label-free threshold on the normal validation scores (no image
scored against a KNN bank that holds it: :func:`threshold_scores`), scores and maps of the same
test split, AUROC/AUPR with bootstrap CIs (plus per-class, pixel and at-threshold metrics),
latency per patch, and example reconstructions/maps of the same images.
Generators (trained runs) also get FID/KID against the normal validation images (the threshold
set's files, read as each run trained: size, resize mode, stain normalisation).

Outputs in ``out``: ``results.json``, a self-contained ``report.html`` (figures embedded as PNG
data URIs), ``figures/*.png`` and ``methods/<name>/`` (``scores.csv`` ..., and ``method.json``,
written last: what a re-run with ``reuse`` checks before taking the method from there instead
of computing it, :mod:`gen_ad.app.benchmark_reuse`) and ``generators/`` (each run's FID/KID
record, reused alike: :mod:`gen_ad.app.fid_reuse`).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gen_ad.app.benchmark_reuse import (
    MethodOutcome,
    method_outcomes,
    prune_figures,
    shortcut_summary,
)
from gen_ad.app.evaluate import (
    PreparedMethod,
    dataset_paths,
    detection_metrics,
    image_batches,
    knn_scorer,
    normal_dataset,
    resolve_device,
    run_scorers,
    score_dataset,
    scoring_dataset,
    summary_line,
)
from gen_ad.app.fid import run_images
from gen_ad.app.shortcut import ShortcutConfig, shortcut_methods
from gen_ad.baselines.knn import shared_files, shared_indices
from gen_ad.config import check, load_config, to_dict
from gen_ad.data.folders import ResizeMode, subset
from gen_ad.errors import CheckpointError, ConfigError, DataError, GenAdError
from gen_ad.metrics.pixel_threshold import NormalPixels
from gen_ad.report.html import generator_cell, render_report
from gen_ad.scoring.thresholds import calibrate
from gen_ad.training.runs import Run, load_run
from gen_ad.utils.io import sweep_temporaries, write_json, write_text
from gen_ad.utils.lock import folder_lock
from gen_ad.utils.paths import names_a_folder

FID_UNAVAILABLE = "n/a (Inception weights not available offline)"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # fullmatch: no trailing newline

# ----------------------------------------------------------------------------- config schema


@dataclass
class BenchDataConfig:
    """The split every method is evaluated on.

    Attributes:
        test: folder with normal and anomalous class subfolders.
        val: folder of normal validation patches (fitting/calibration and the FID reference).
        masks: optional ground-truth mask folder mirroring ``test`` (pixel metrics).
        classes: test class folders to use (default: all that hold images).
        normal_classes: class folders with label 0.
        size: patch size for methods without their own (KNN); runs use their training size.
        limit: score at most this many test patches (seeded random subset); ``None`` = all.
        val_limit: use at most this many validation patches (a seeded random choice); the
            FID real set is the same choice.
    """

    test: str = ""
    val: str = ""
    masks: str | None = None
    classes: list[str] | None = None
    normal_classes: list[str] = field(default_factory=lambda: ["normal"])
    size: int = 64
    limit: int | None = None
    val_limit: int | None = 512

    def validate(self, prefix: str) -> None:
        check(bool(self.test), f"{prefix}.test", "is required (folder of test patches)")
        check(bool(self.val), f"{prefix}.val", "is required (folder of normal validation patches)")
        check(self.size >= 8, f"{prefix}.size", f"must be >= 8, got {self.size}")
        check(self.limit is None or self.limit > 1, f"{prefix}.limit", "must be > 1")
        check(self.val_limit is None or self.val_limit > 1, f"{prefix}.val_limit", "must be > 1")
        check(len(self.normal_classes) > 0, f"{prefix}.normal_classes", "must not be empty")


@dataclass
class KNNMethodConfig:
    """The KNN baseline on frozen features (see :mod:`gen_ad.baselines.knn`).

    Attributes:
        extractor: registered extractor name (``virchow2``, ``uni``, ``resnet50``, ...).
        weights: local weights file/folder (default: the caches).
        random_init: random weights (no download); the report labels the method accordingly.
        tiny: tiny network variant (tests).
        k / reduction / metric: neighbours, ``mean`` or ``kth``, ``l2`` or ``cosine``.
        bank: folder of normal patches embedded into the feature bank (required; best kept
            apart from ``data.val``, whose scores set the threshold: when ``data.val`` is the
            bank the threshold comes from the bank's leave-one-out scores, and ``data.val``
            images also in the bank are left out of the threshold set, see
            :func:`threshold_scores`).
        bank_limit: embed at most this many bank patches.
        size: patch loading size (default ``data.size``; the extractor resizes to its input).
        seed: seed of a random initialisation.
    """

    extractor: str = "resnet50"
    weights: str | None = None
    random_init: bool = False
    tiny: bool = False
    k: int = 200
    reduction: Literal["mean", "kth"] = "mean"
    metric: Literal["l2", "cosine"] = "l2"
    bank: str = ""
    bank_limit: int | None = None
    size: int | None = None
    seed: int = 0

    def validate(self, prefix: str) -> None:
        check(self.k >= 1, f"{prefix}.k", f"must be >= 1, got {self.k}")
        check(bool(self.bank), f"{prefix}.bank", "is required (folder of normal patches for the "
              "feature bank, apart from data.val)")
        check(self.bank_limit is None or self.bank_limit > self.k, f"{prefix}.bank_limit",
              f"must exceed k={self.k}")
        check(self.size is None or self.size >= 8, f"{prefix}.size", "must be >= 8")


@dataclass
class MethodConfig:
    """One method: a trained run's scorer (``run`` + ``scorer``) or the KNN baseline (``knn``).

    Attributes:
        name: label in the report (default: the scorer name, or ``knn-<extractor>``).
        run: run folder (``checkpoints/<run>``).
        scorer: one scorer the run offers (default: its only one).
        kwargs: keyword arguments for the run's scorers (e.g. ``{steps: 200}``).
        knn: the KNN baseline settings.
        note: free text shown next to the method in the report.
        batch_size: scoring batch size (default: the benchmark's).
    """

    name: str | None = None
    run: str | None = None
    scorer: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    knn: KNNMethodConfig | None = None
    note: str | None = None
    batch_size: int | None = None

    def validate(self, prefix: str) -> None:
        check((self.run is None) != (self.knn is None), prefix,
              "give exactly one of 'run' (a trained run) or 'knn' (the KNN baseline)")
        check(self.knn is None or (self.scorer is None and not self.kwargs), prefix,
              "'scorer' and 'kwargs' belong to run methods, not to 'knn'")
        check(self.name is None or bool(_NAME_RE.fullmatch(self.name)), f"{prefix}.name",
              "use letters, digits and . _ + - only")
        check(self.batch_size is None or self.batch_size > 0, f"{prefix}.batch_size",
              "must be positive")
        if self.knn is not None:
            self.knn.validate(f"{prefix}.knn")


@dataclass
class FIDConfig:
    """FID/KID of each generator against the normal validation images.

    Attributes:
        enabled: compute it at all.
        n: generated samples per generator.
        n_real: real images, a seeded random choice of ``data.val``'s normal patches, chosen
            as the threshold set is; ``None``: ``data.val_limit`` (then exactly the threshold
            set). Set it apart when thresholds use few patches: FID is biased upwards by small
            sets, on both sides. They are read as each run trained (size, resize mode and
            stain normalisation).
        kid: also compute KID (better for small sets).
        inception_weights: Inception-v3 weights file (default: torch hub cache).
        random_init_fallback: without Inception weights, report the Fréchet distance of a
            random-initialised Inception (labelled ``fd_inception-v3-random``, not FID).
        batch_size: sampling/extraction batch size.
    """

    enabled: bool = True
    n: int = 500
    n_real: int | None = None
    kid: bool = True
    inception_weights: str | None = None
    random_init_fallback: bool = False
    batch_size: int = 64

    def validate(self, prefix: str) -> None:
        check(self.n >= 2, f"{prefix}.n", f"must be >= 2, got {self.n}")
        check(self.n_real is None or self.n_real >= 2, f"{prefix}.n_real",
              f"must be >= 2, got {self.n_real}")
        check(self.batch_size > 0, f"{prefix}.batch_size", "must be positive")


@dataclass
class BenchmarkConfig:
    """``configs/benchmark/<name>.yaml``.

    Attributes:
        out: output folder.
        title: report title.
        data: the test split and normal validation folder.
        methods: the methods to compare.
        n_boot / seed: bootstrap resamples and seed of the 95% CIs.
        threshold / fpr: label-free threshold rule on normal validation scores.
        pixel_fpr: pixel FPR of the label-free map threshold (metrics/pixel_threshold.py).
        batch_size / device: scoring batch size; ``auto``, ``cpu``, ``cuda``, ...
        examples: test images shown per method (same images for every method).
        fid: generator quality settings.
    """

    out: str = "checkpoints/benchmark"
    title: str = "gen_ad benchmark"
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    methods: list[MethodConfig] = field(default_factory=list)
    n_boot: int = 2000
    seed: int = 0
    threshold: Literal["iqr", "fpr"] = "iqr"
    fpr: float = 0.05
    pixel_fpr: float = 0.01
    batch_size: int = 32
    device: str = "auto"
    examples: int = 6
    fid: FIDConfig = field(default_factory=FIDConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)

    def validate(self, prefix: str) -> None:
        check(len(self.methods) > 0, "methods", "list at least one method")
        self.shortcut.validate("shortcut")
        for i, m in enumerate(self.methods):
            m.validate(f"methods[{i}]")
        names = [method_name(m) for m in self.methods]
        for i, n in enumerate(names):  # names it derives: they become folders under methods/
            check(names_a_folder(n),
                  f"methods[{i}].name", f"the derived name {n!r} cannot name a folder; set "
                  "'name' (letters, digits and . _ + - only)")
        folded = [n.casefold() for n in names]  # one folder on macOS/Windows file systems
        dup = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
        check(not dup, "methods", f"duplicate method names {dup} (letter case aside: they would "
              "share one folder under methods/ on macOS and Windows); set 'name' to tell them "
              "apart")
        check(self.n_boot >= 0, "n_boot", "must be >= 0")
        check(0.0 < self.fpr < 1.0, "fpr", "must be in (0, 1)")
        check(0.0 < self.pixel_fpr < 1.0, "pixel_fpr", "must be in (0, 1)")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(0 <= self.examples <= 16, "examples", "must be in [0, 16]")


def method_name(m: MethodConfig) -> str:
    """The report label of a method entry."""
    if m.name:
        return m.name
    if m.knn is not None:
        return f"knn-{m.knn.extractor}" + ("-random-init" if m.knn.random_init else "")
    return m.scorer or Path(str(m.run)).name


def load_benchmark_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                          ) -> BenchmarkConfig:
    """Load and validate a benchmark YAML (``key.sub=value`` overrides allowed)."""
    return load_config(BenchmarkConfig, path, overrides)


# ----------------------------------------------------------------------------- methods


def _random_init_notes(kwargs: dict[str, Any]) -> list[str]:
    """A warning per ``*random_init=true`` scorer option (e.g. a random-init LPIPS trunk)."""
    out = []
    for k, v in sorted(kwargs.items()):
        if "random_init" in k and v is True:
            net = k.replace("_random_init", "").replace("random_init", "").strip("_") or "a"
            out.append(f"{k}=true: the {net.upper()} network inside this scorer has RANDOM "
                       "weights (pretrained weights unavailable), so its maps and scores are "
                       "not those of the published method")
    return out


def _lpips_notes(scorer: Any) -> list[str]:
    """Which LPIPS network a scorer runs on (installed real weights, a fallback, random init)."""
    from gen_ad.inversion.lpips_net import lpips_source

    src = lpips_source(scorer)
    return [f"LPIPS network: {src}"] if src else []


def _prepare_run(m: MethodConfig, cfg: BenchmarkConfig, device: str,
                 runs: dict[str, Run]) -> PreparedMethod:
    path = str(m.run)
    if path not in runs:
        try:
            runs[path] = load_run(path, device=device)
        except CheckpointError as e:
            made_by = (" (the runs under checkpoints/demo/ are made by `gen-ad demo`, or `make "
                       "demo`)" if Path(path).as_posix().startswith("checkpoints/demo/") else "")
            raise CheckpointError(f"method '{method_name(m)}': {e}{made_by}") from e
    run = runs[path]
    found = run_scorers(run, m.scorer, device=device, scorer_kwargs=m.kwargs)
    names = list(found)
    if m.scorer is None and len(names) > 1:
        raise ConfigError(f"run {path} offers several scorers ({', '.join(names)}); set "
                          "'scorer' for this method")
    ls = found[names[0]]
    desc = f"{run.family.name} run {path} (step {run.step}), scorer '{names[0]}'"
    if m.kwargs:
        desc += ", " + ", ".join(f"{k}={v}" for k, v in sorted(m.kwargs.items()))
    notes = _random_init_notes(m.kwargs) + _lpips_notes(ls.scorer)
    return PreparedMethod(method_name(m), "generative", desc, notes, ls.scorer, ls.size,
                          cfg.data.val, cfg.data.val_limit, m.batch_size or cfg.batch_size, run,
                          path, resize=ls.resize)


def _prepare_knn(m: MethodConfig, cfg: BenchmarkConfig, device: str) -> PreparedMethod:
    k = m.knn
    assert k is not None
    ls = knn_scorer(k.extractor, device=device, weights=k.weights, random_init=k.random_init,
                    tiny=k.tiny, k=k.k, reduction=k.reduction, metric=k.metric, seed=k.seed)
    src = getattr(ls.scorer, "extractor", None)
    src = getattr(src, "weights_source", None)
    weights = ("random-init weights" if k.random_init else f"weights {src}" if src
               else "no network, no weights")
    desc = (f"KNN baseline: {'tiny ' if k.tiny else ''}{k.extractor} features ({weights}), "
            f"k={k.k}, {k.reduction} {k.metric} distance, bank: {k.bank}")
    notes = []
    if k.random_init:
        notes.append(f"extractor '{k.extractor}' is RANDOMLY INITIALISED (no pretrained weights): "
                     "a pipeline check, not the foundation-model baseline")
    if k.tiny:
        notes.append("tiny test variant of the extractor")
    return PreparedMethod(method_name(m), "knn", desc, notes, ls.scorer, k.size or cfg.data.size,
                          k.bank, k.bank_limit, m.batch_size or cfg.batch_size)


def check_inputs(cfg: BenchmarkConfig, methods: list[PreparedMethod], split: SplitCache) -> None:
    """Fail before any scoring (and before the output folder is made): every method's test,
    fit and validation sets must list images (the datasets are built once, in ``split``), and a
    KNN bank must hold more than ``k`` images (its leave-one-out calibration needs ``k + 1``)."""
    for pm in methods:
        split.test(pm.size, pm.resize)
        fit = split.normal(pm.fit_root, pm.size, pm.fit_limit, pm.resize)
        split.normal(cfg.data.val, pm.size, cfg.data.val_limit, pm.resize)
        k = getattr(pm.scorer, "k", None)
        if pm.kind == "knn" and isinstance(k, int) and len(fit) <= k:  # type: ignore[arg-type]
            raise ConfigError(f"method '{pm.name}': k={k} needs a bank of at least {k + 1} "
                              f"images; {pm.fit_root} gives {len(fit)}"  # type: ignore[arg-type]
                              " (lower knn.k or give a larger knn.bank / knn.bank_limit)")


def prepare_methods(cfg: BenchmarkConfig, device: str) -> list[PreparedMethod]:
    """Build every method's scorer before any scoring (a bad entry fails early)."""
    runs: dict[str, Run] = {}
    out = []
    for m in cfg.methods:
        pm = _prepare_knn(m, cfg, device) if m.knn is not None else _prepare_run(m, cfg, device,
                                                                                  runs)
        if m.note:
            pm.notes.append(m.note)
        out.append(pm)
    return out


# ----------------------------------------------------------------------------- data


class SplitCache:
    """The test and normal datasets at each size and resize mode, built once (same files for
    every method; a method reads them as its run trained, ``data.resize``)."""

    def __init__(self, cfg: BenchDataConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self._test: dict[tuple[int, ResizeMode], Dataset] = {}
        self._normal: dict[tuple[str, int, int | None, ResizeMode], Dataset] = {}

    def test(self, size: int, resize: ResizeMode = "resize") -> Dataset:
        """The test split at ``size`` read by ``resize`` (the same seeded subset for all)."""
        key = (size, resize)
        if key not in self._test:
            c = self.cfg
            ds: Dataset = scoring_dataset(c.test, size, normal_classes=c.normal_classes,
                                          classes=c.classes, masks=c.masks, resize=resize)
            if len(set(ds.labels)) != 2:  # type: ignore[attr-defined]
                raise DataError(f"the test folder {c.test} needs normal ({c.normal_classes}) and "
                                "anomalous class folders")
            if c.limit is not None and c.limit < len(ds):  # type: ignore[arg-type]
                ds = subset(ds, c.limit, self.seed)
            self._test[key] = ds
        return self._test[key]

    def normal(self, root: str, size: int, limit: int | None,
               resize: ResizeMode = "resize") -> Dataset:
        """Normal patches of ``root``: its normal class folders when it has them, else all."""
        key = (root, size, limit, resize)
        if key not in self._normal:
            self._normal[key] = normal_dataset(root, size, normal_classes=self.cfg.normal_classes,
                                               limit=limit, resize=resize)
        return self._normal[key]


def example_indices(labels: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` test indices, anomalous first then normal (about half each), seeded."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_pos = min(len(pos), max(n - len(neg), (n + 1) // 2))
    n_neg = min(len(neg), n - n_pos)
    pick = [np.sort(rng.choice(a, k, replace=False)) for a, k in ((pos, n_pos), (neg, n_neg))]
    return [int(i) for i in np.concatenate(pick)]


def _batches(ds: Dataset, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    for b in image_batches(ds, batch_size):
        yield b.to(device)


# ----------------------------------------------------------------------------- evaluation


def evaluate_method(pm: PreparedMethod, split: SplitCache, cfg: BenchmarkConfig, device: str,
                    examples: list[int] | None = None) -> MethodOutcome:
    """Fit, calibrate, score and measure one method (the same code for every method).

    Args:
        pm: the method.
        split: datasets of the benchmark.
        cfg: the benchmark config (threshold rule, bootstrap, examples).
        device: where scoring runs.
        examples: test indices to show (default: chosen from this method's labels).
    """
    t0 = time.perf_counter()
    fit_ds = split.normal(pm.fit_root, pm.size, pm.fit_limit, pm.resize)
    pm.scorer.fit(_batches(fit_ds, pm.batch_size, device))
    fit_s = time.perf_counter() - t0
    val_ds = split.normal(cfg.data.val, pm.size, cfg.data.val_limit, pm.resize)
    pixels = NormalPixels(cfg.pixel_fpr, source=f"normal validation images of {cfg.data.val}")
    val_scores, how = threshold_scores(pm, fit_ds, val_ds, device, pixels)
    th = calibrate(val_scores, method=cfg.threshold, fpr=cfg.fpr)
    test_ds = split.test(pm.size, pm.resize)
    scored = score_dataset(pm.scorer, test_ds, batch_size=pm.batch_size, device=device,
                           spill_dir=cfg.out if Path(cfg.out).is_dir() else None)
    metrics = detection_metrics(scored, th, n_boot=cfg.n_boot, seed=cfg.seed,
                                pixel_threshold=pixels.result())
    has_maps = scored.maps is not None
    scored.drop_maps()  # the metrics hold what the outputs need; the examples are re-scored
    metrics["overlap_with_test"] = overlap_with_test(fit_ds, val_ds, test_ds)
    metrics.update(how)
    idx = examples if examples is not None else example_indices(scored.labels, cfg.examples,
                                                                cfg.seed)
    ex = None
    if idx:
        images = torch.stack([test_ds[i]["image"] for i in idx])
        with torch.no_grad():
            ex = (images, pm.scorer.score(images.to(device)).cpu())
    return MethodOutcome(pm, scored, val_scores, th, metrics, ex, idx, fit_s, has_maps)


def threshold_scores(pm: PreparedMethod, fit_ds: Dataset, val_ds: Dataset, device: str,
                     pixels: NormalPixels | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The normal scores the threshold is calibrated on, and what ``metrics.json`` records of
    them: ``overlap_fit_val`` (threshold images the method was also fitted on, same resolved
    file) and ``threshold_scores`` (``val``, ``fit_leave_one_out`` or ``val_without_fit``).
    ``pixels`` receives the maps of the same images (none for leave-one-out scores).

    A scorer whose fit memorises its images (a KNN bank: :meth:`AnomalyScorer.fit_scores` is
    not ``None``) would find an overlapping image at distance 0 and bias the threshold low, so
    (as :func:`~gen_ad.app.evaluate.calibrate_scorer` does) when every threshold image is in
    the bank its leave-one-out scores are used, and on a partial overlap the shared images are
    left out of the threshold set. Other scorers are fair on the images they were fitted on.
    """
    shared = shared_indices(dataset_paths(val_ds) or [], dataset_paths(fit_ds) or [])
    held_out = pm.scorer.fit_scores()
    how: dict[str, Any] = {"overlap_fit_val": len(shared), "threshold_scores": "val"}
    if held_out is not None and shared:
        if len(shared) == len(val_ds):  # type: ignore[arg-type]
            how["threshold_scores"] = "fit_leave_one_out"
            if pixels is not None:
                pixels.unavailable("the threshold set is the bank's leave-one-out scores")
            return np.asarray(held_out, dtype=np.float64).reshape(-1), how
        keep = [i for i in range(len(val_ds)) if i not in shared]  # type: ignore[arg-type]
        val_ds = Subset(val_ds, keep)
        how["threshold_scores"] = "val_without_fit"
    val = score_dataset(pm.scorer, val_ds, batch_size=pm.batch_size, device=device,
                        keep_maps=False, map_sink=pixels)
    return val.scores, how


def overlap_with_test(fit_ds: Dataset, val_ds: Dataset, test_ds: Dataset) -> dict[str, int]:
    """How many images a method fit on (its KNN bank, or a generator's calibration set) and
    how many threshold images are also test images (same resolved file)."""
    test = dataset_paths(test_ds) or []
    return {name: shared_files(dataset_paths(ds) or [], test)
            for name, ds in (("fit", fit_ds), ("val", val_ds))}


def overlap_warnings(outcomes: list[MethodOutcome]) -> list[str]:
    """A warning for each method whose fit or threshold images include test images, and for
    each whose threshold set lost images it was fitted on (:func:`threshold_scores`)."""
    out = []
    for o in outcomes:
        ov = o.metrics.get("overlap_with_test", {})
        if ov.get("fit"):
            out.append(f"{o.method.name}: {ov['fit']} of the images it was fitted on (a KNN "
                       "bank finds them at distance 0) are test images: its metrics are biased")
        if ov.get("val"):
            out.append(f"{o.method.name}: {ov['val']} threshold (data.val) images are test "
                       "images: the threshold and flagged counts are biased")
        if o.metrics.get("threshold_scores") == "val_without_fit":
            out.append(f"{o.method.name}: {o.metrics['overlap_fit_val']} threshold (data.val) "
                       "images are also in its bank (it finds them at distance 0): left out of "
                       f"the threshold set ({len(o.val_scores)} used)")
    return out


# ----------------------------------------------------------------------------- FID / KID


def _fid_extractor(fc: FIDConfig, device: str) -> tuple[Any, str | None]:
    """Inception (or the labelled random-init fallback), or ``(None, reason)``."""
    from gen_ad.errors import WeightsNotFoundError
    from gen_ad.metrics.inception import load_inception

    try:
        return load_inception(fc.inception_weights, device=device), None
    except WeightsNotFoundError:
        if fc.random_init_fallback:
            return load_inception(device=device, random_init=True), None
        return None, FID_UNAVAILABLE
    except CheckpointError as e:  # a damaged or wrong file: keep the methods' results
        warnings.warn(f"FID/KID not computed: {e}", stacklevel=2)
        return None, "n/a (the Inception weights could not be read; see the warning)"


def _training_fid(run_path: str) -> dict[str, Any] | None:
    """The last record of a run's ``fid.jsonl`` (periodic FID during training), if any."""
    import json

    p = Path(run_path) / "fid.jsonl"
    if not p.is_file():
        return None
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _fid_label(ext: Any) -> str:
    if ext.is_inception:
        return "FID (Inception-v3)"
    if ext.name.startswith("inception-v3-random"):
        return ("Fréchet distance of a RANDOM-INIT Inception (not FID; Inception weights "
                "unavailable offline)")
    return f"Fréchet distance of '{ext.name}' (not FID: not a known FID Inception)"


def _fid_reference(pm: PreparedMethod, cfg: BenchmarkConfig, split: SplitCache,
                   ext: Any) -> Any:
    """Real statistics of a generator: the normal validation files the threshold set uses (the
    same seeded choice; ``fid.n_real`` of them when set), read as its run trained."""
    from gen_ad.metrics.fid import real_stats, stain_transform

    n_real = cfg.data.val_limit if cfg.fid.n_real is None else cfg.fid.n_real
    files = dataset_paths(split.normal(cfg.data.val, pm.size, n_real, pm.resize))
    stain, ref = getattr(pm.run, "stain", None), getattr(pm.run, "stain_ref", None)
    transform = stain_transform(stain, ref) if stain is not None and ref is not None else None
    return real_stats(cfg.data.val, ext, batch_size=cfg.fid.batch_size, max_images=n_real,
                      size=pm.size, resize=pm.resize, classes=cfg.data.normal_classes,
                      files=files, transform=transform)


def generator_quality(methods: list[PreparedMethod], cfg: BenchmarkConfig, device: str,
                      split: SplitCache | None = None, *,
                      reuse: bool = False) -> dict[str, dict[str, Any]]:
    """FID/KID of each distinct generator (run) against the normal validation images.

    Args:
        methods / cfg / device: the benchmark's methods, config and device.
        split: the benchmark's datasets (default: built from ``cfg``), whose normal validation
            subset is the FID real set.
        reuse: take a run's values from its record under ``<out>/generators/`` when computed
            with the same settings (:mod:`gen_ad.app.fid_reuse`); computed values are stored
            either way.
    Returns:
        ``{run path: record}``; a record has ``status`` (``ok``, ``n/a``, ``error`` or ``off``),
        the metric values (``fid`` or ``fd_inception-v3-random``, ``kid_mean`` ...), a
        human ``label``, when the run logged one, ``training_log`` (last ``fid.jsonl`` row),
        and for values, ``computed`` (ISO time) and ``reused``.
    """
    from gen_ad.app.fid_reuse import FidRecords

    split = split or SplitCache(cfg.data, cfg.seed)
    runs = {pm.run_path: pm for pm in methods if pm.run is not None and pm.run_path is not None}
    book = FidRecords(cfg, split, device, reuse) if cfg.fid.enabled and runs else None
    loaded: list[tuple[Any, str | None]] = []  # the extractor, loaded once, when needed
    out: dict[str, dict[str, Any]] = {}
    for path, pm in runs.items():
        found = book.take(pm) if book is not None else None
        if found is None:
            if book is not None and not loaded:
                loaded.append(_fid_extractor(cfg.fid, device))
            ext, reason = loaded[0] if loaded else (None, "disabled in the config")
            found = _run_fid(pm, cfg, split, ext, reason)
            found = book.keep(pm, found) if book is not None else found
        out[path] = {"run": path, "training_log": _training_fid(path), **found}
    return out


def _run_fid(pm: PreparedMethod, cfg: BenchmarkConfig, split: SplitCache, ext: Any,
             reason: str | None) -> dict[str, Any]:
    """FID/KID of one run with extractor ``ext`` (``None``: off or n/a for ``reason``)."""
    from gen_ad.metrics.fid import distances, fake_features

    if ext is None:
        return {"status": "off" if not cfg.fid.enabled else "n/a", "label": str(reason)}
    # the sample set depends on the seed, not the batch size (at or above 32 images)
    sample = run_images(pm.run, batch_size=cfg.fid.batch_size)
    try:
        ref = _fid_reference(pm, cfg, split, ext)
        feats = fake_features(sample, ext, n=cfg.fid.n, batch_size=cfg.fid.batch_size,
                              seed=cfg.seed, generator_device="cpu")
        return {**distances(ref, feats, ext, kid=cfg.fid.kid), "status": "ok",
                "label": _fid_label(ext)}
    except GenAdError as e:
        return {"status": "error", "label": f"error: {e}"}


# ----------------------------------------------------------------------------- outputs


def _environment(device: str) -> dict[str, Any]:
    import os

    from gen_ad.utils.provenance import environment

    env = environment(device)
    env.update(torch=torch.__version__, cpu_count=os.cpu_count())  # threads: in environment()
    return env


def _method_record(o: MethodOutcome, gq: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pm, s = o.method, o.scored
    return {
        "name": pm.name, "kind": pm.kind, "description": pm.description, "notes": pm.notes,
        "run": pm.run_path, "size": pm.size, "batch_size": pm.batch_size,
        "ms_per_patch": s.ms_per_image, "fit_seconds": o.fit_seconds,
        "has_maps": o.has_maps, "threshold": o.threshold.to_dict(),
        "n_val": int(len(o.val_scores)), "metrics": o.metrics,
        "generator": gq.get(pm.run_path) if pm.run_path else None,
        "scores_csv": f"methods/{pm.name}/scores.csv", "computed": o.computed,
        "reused": o.reused,
    }


def write_figures(outcomes: list[MethodOutcome], fig_dir: Path) -> dict[str, str]:
    """ROC, PR, per-method histograms and example grids; returns ``{key: file name}``."""
    from gen_ad.report.figures import image_grid, pr_figure, roc_figure, score_histogram

    curves = {o.method.name: (o.scored.scores, o.scored.labels) for o in outcomes}
    figs = {"roc": roc_figure(curves, fig_dir / "roc.png", title="ROC (test split)"),
            "pr": pr_figure(curves, fig_dir / "pr.png", title="Precision-recall (test split)")}
    for o in outcomes:
        n = o.method.name
        figs[f"hist/{n}"] = score_histogram(o.scored.scores, o.scored.labels,
                                            fig_dir / f"hist-{n}.png",
                                            threshold=o.threshold.value,
                                            title=f"{n}: test scores (dashed: threshold)")
        if o.examples is not None:
            images, sb = o.examples
            labels = o.scored.labels[o.example_index]
            titles = [f"{'anom' if y else 'normal'} {v:.3g}"
                      for y, v in zip(labels, sb.scores.tolist())]
            figs[f"examples/{n}"] = image_grid(images, fig_dir / f"examples-{n}.png",
                                               recon=sb.recon, maps=sb.maps, col_titles=titles)
    return {k: v.name for k, v in figs.items()}


def run_benchmark(cfg: BenchmarkConfig, progress: bool = True, *,
                  reuse: bool = False) -> dict[str, Any]:
    """Evaluate every method of ``cfg`` on its split; write results.json and report.html.

    ``reuse``: take each method whose ``methods/<name>/method.json`` records the same settings
    (and each run's FID/KID whose ``generators/`` record does) from there instead of computing
    it (``gen-ad benchmark`` does, unless ``--fresh``).

    Returns:
        The results dict (also in ``<out>/results.json``); ``results["report"]`` is the HTML path.
    """

    device = resolve_device(cfg.device)
    methods, split = prepare_methods(cfg, device), SplitCache(cfg.data, cfg.seed)
    check_inputs(cfg, methods, split)  # a bad entry fails before anything is written
    with folder_lock(cfg.out, "benchmark output folder"):
        sweep_temporaries(Path(cfg.out) / "methods")  # the lock sweeps out/ and its subfolders
        return benchmark_methods(cfg, methods, device, progress, split, reuse=reuse)


def _clear_tables(out: Path, progress: bool) -> None:
    """Remove an earlier run's ``results.json`` and ``report.html`` before any method runs, so
    an interrupted run never leaves them beside its own ``methods/`` outputs (they are rebuilt
    from the methods' records), and when an interrupted run is found, a line says so."""
    found = [n for n in ("results.json", "report.html") if (out / n).is_file()]
    if progress and not found and (out / "methods").is_dir() and any((out / "methods").iterdir()):
        print(f"[benchmark] {out} holds method outputs but no results.json (an interrupted "
              "run?)", flush=True)
    for name in found:
        (out / name).unlink(missing_ok=True)


def benchmark_methods(cfg: BenchmarkConfig, methods: list[PreparedMethod], device: str,
                      progress: bool = True, split: SplitCache | None = None, *,
                      reuse: bool = False) -> dict[str, Any]:
    """Evaluate prepared methods (any scorers) on ``cfg``'s split and write the outputs.

    :func:`run_benchmark` calls it with the methods of the config; a caller may also pass its
    own :class:`PreparedMethod` objects (e.g. a new scorer) to compare them the same way.
    ``split``: the datasets already built (default: built here). ``reuse``: reuse each method
    and each run's FID/KID finished earlier with the same settings
    (:mod:`gen_ad.app.benchmark_reuse`, :mod:`gen_ad.app.fid_reuse`; a caller's own scorer is
    identified by its class, name and description, not its code). Every record is written
    either way; the tables are built from the requested methods only.
    """
    out = Path(cfg.out)
    split = split or SplitCache(cfg.data, cfg.seed)
    check_inputs(cfg, methods, split)
    methods = [*methods, *shortcut_methods(cfg, methods, split, device)]  # colour baseline
    _clear_tables(out, progress)
    outcomes = method_outcomes(cfg, methods, split, device, reuse=reuse,
                               evaluate=evaluate_method,
                               entries={method_name(m): m for m in cfg.methods},
                               progress=progress)
    shortcut = shortcut_summary(cfg, outcomes, split, device, progress)
    gq = generator_quality(methods, cfg, device, split, reuse=reuse)
    figures = write_figures(outcomes, out / "figures")
    prune_figures(out / "figures", figures)
    first = outcomes[0].metrics
    results: dict[str, Any] = {
        "title": cfg.title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(device),
        "test": {"root": cfg.data.test, "n": first["n"], "n_normal": first["n_normal"],
                 "n_anomalous": first["n_anomalous"], "masks": cfg.data.masks,
                 "val": cfg.data.val},
        "methods": [_method_record(o, gq) for o in outcomes],
        "generators": gq, "figures": {k: f"figures/{v}" for k, v in figures.items()},
        "shortcut": shortcut, "warnings": [*overlap_warnings(outcomes), *shortcut["warnings"]],
        "config": to_dict(cfg),
    }
    write_json(out / "results.json", _json_clean(results))
    report = out / "report.html"
    write_text(report, render_report(results, out))
    results["report"] = str(report)
    return results


def _json_clean(obj: Any) -> Any:
    """Non-finite floats -> ``None``, numpy scalars -> Python (results.json is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per method: the engine's summary line plus generator quality."""
    lines = []
    for m in results["methods"]:
        mt = m["metrics"]
        line = summary_line({**mt, "method": m["name"], "n": mt["n"],
                             "ms_per_image": m["ms_per_patch"]})
        if m.get("generator"):
            text = re.sub(r"<[^>]+>", " ", generator_cell(m["generator"]))
            line += ", generator: " + " ".join(text.split())
        lines.append(line)
    return lines + [f"WARNING {w}" for w in results.get("warnings", [])]
