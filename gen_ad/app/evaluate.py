"""The one evaluation engine: every command that scores (``score``, ``knn score``, ``benchmark``,
``slide``) goes through it.

1. **Load** a scorer: from a run folder (:func:`run_scorers`), a KNN bank (:func:`bank_scorer`) or
   a KNN config (:func:`knn_scorer`); :func:`load_scorer` picks one of a run or a bank.
2. **Fit / calibrate** it on normal images (:func:`calibrate_scorer`): ``fit`` may only calibrate,
   then a label-free threshold on the normal scores.
3. **Score** a dataset in batches (:func:`score_dataset`); datasets follow one set of rules
   (:func:`scoring_dataset`, :func:`normal_dataset`): class subfolders, ``normal_classes`` are
   label 0, a ``masks/`` folder (as ``gen-ad synth`` writes) holds ground truth and is no class.
4. **Write** one ``scores.csv`` format for every method and command (:data:`SCORE_COLUMNS`), score
   components in ``terms.csv``, ``flagged.csv``, map PNGs and ``metrics.json``
   (:func:`write_outputs`), and print one summary line (:func:`summary_line`).
"""

from __future__ import annotations

import csv
import io
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from gen_ad.baselines.extractors import build_extractor
from gen_ad.baselines.knn import (
    FeatureBank,
    KNNScorer,
    SearchSettings,
    bank_settings,
    extractor_from_info,
)
from gen_ad.data.folders import (
    PatchFolder,
    ResizeMode,
    discover_classes,
    find_mask_root,
    subset,
)
from gen_ad.errors import ConfigError, DataError
from gen_ad.metrics.detection import evaluate_scores
from gen_ad.metrics.pixel_threshold import NormalPixels, at_pixel_threshold, fpr_label
from gen_ad.report.html import ci_text
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.scoring.maps import save_map_png
from gen_ad.scoring.store import MEMORY_BYTES, MapStore
from gen_ad.scoring.thresholds import Threshold, calibrate
from gen_ad.training.runs import Run, load_run
from gen_ad.utils.io import write_json, write_text
from gen_ad.utils.workers import worker_init

SCORE_COLUMNS = ("path", "label", "class", "score", "flagged")


def resolve_device(device: str | None) -> str:
    """``auto`` (or ``None``) -> ``cuda`` when available, else ``cpu``; other names unchanged."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    from gen_ad.utils.hardware import check_device

    return check_device(str(device))


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedScorer:
    """A scorer with the input size it expects, a label and what came with it.

    Attributes:
        scorer: the :class:`AnomalyScorer`.
        size: input side in pixels.
        label: human label (method name, or ``knn <extractor>``).
        threshold: a saved label-free threshold (a KNN bank's), else ``None``.
        run: the trained run behind a generative scorer, else ``None``.
        resize: how patches are brought to ``size`` (``resize`` or ``center_crop``): a run's
            ``data.resize``, so queries and calibration patches are read as training read them.
    """

    scorer: AnomalyScorer
    size: int
    label: str
    threshold: Threshold | None = None
    run: Run | None = None
    resize: ResizeMode = "resize"


@dataclass
class PreparedMethod:
    """A method ready to evaluate: its scorer plus what the report says about it.

    Attributes:
        name / kind / description / notes: report labels (kind: ``generative`` or ``knn``).
        scorer: the :class:`AnomalyScorer`.
        size: input size of the scorer.
        fit_root: normal folder the scorer is fitted (calibrated) on.
        fit_limit: at most this many fit images.
        batch_size: scoring batch size.
        run: the run object behind a generative method (FID), else ``None``.
        run_path: its folder.
        resize: how patches are brought to ``size`` (a run's ``data.resize``); the test, fit
            and threshold sets are all read this way.
    """

    name: str
    kind: str
    description: str
    notes: list[str]
    scorer: AnomalyScorer
    size: int
    fit_root: str
    fit_limit: int | None
    batch_size: int
    run: Any = None
    run_path: str | None = None
    resize: ResizeMode = "resize"


def run_scorers(run: str | os.PathLike[str] | Run, method: str | None = None, *,
                device: str = "cpu", scorer_kwargs: dict[str, Any] | None = None,
                ) -> dict[str, LoadedScorer]:
    """The scorers of a trained run: ``method`` (checked) or all it offers.

    ``scorer_kwargs`` are the family's typed scorer options (a bad key is a ConfigError). Each
    carries the run's ``data.size`` and ``data.resize`` (``resize`` for a run saved without it).
    """
    r = run if isinstance(run, Run) else load_run(run, device=device)
    scorers = r.scorers(**(scorer_kwargs or {}))
    names = select_scorer(scorers, method)
    size, resize = int(r.cfg.data.size), run_resize(r)
    return {n: LoadedScorer(scorers[n], size, n, run=r, resize=resize) for n in names}


def run_resize(run: Run) -> ResizeMode:
    """How ``run`` brought its training patches to ``data.size`` (``resize`` when its saved
    config does not say)."""
    mode: ResizeMode = getattr(run.cfg.data, "resize", "resize")
    return mode


def bank_scorer(bank: str | os.PathLike[str], *, device: str = "cpu",
                weights: str | None = None, **search: Any) -> LoadedScorer:
    """The KNN scorer of a bank written by ``gen-ad knn fit`` (its extractor, k, threshold).

    ``search``: non-``None`` :class:`~gen_ad.baselines.knn.SearchSettings` overrides.
    """
    fb = FeatureBank(bank)
    info = fb.meta["extractor"]
    ext = extractor_from_info(info, device, weights)
    st = fb.settings
    sc = KNNScorer(ext, fb, k=int(st.get("k", 200)), reduction=st.get("reduction", "mean"),
                   settings=bank_settings(fb, **search))
    size = int(info.get("load_size", ext.input_size))
    rnd = " (random-init extractor)" if info.get("random_init") else ""
    return LoadedScorer(sc, size, f"knn {info['name']}{rnd}", threshold=sc.threshold)


def knn_scorer(extractor: str, *, device: str = "cpu", weights: str | None = None,
               random_init: bool = False, tiny: bool = False, k: int = 200,
               reduction: str = "mean", metric: str = "l2", size: int | None = None,
               seed: int = 0) -> LoadedScorer:
    """An unfitted KNN scorer from a KNN config (its bank is built by :meth:`KNNScorer.fit`)."""
    ext = build_extractor(extractor, weights=weights, random_init=random_init, device=device,
                          tiny=tiny, seed=seed)
    sc = KNNScorer(ext, k=k, reduction=reduction,  # type: ignore[arg-type]
                   settings=SearchSettings(metric=metric), seed=seed)  # type: ignore[arg-type]
    return LoadedScorer(sc, size or ext.input_size, f"knn {extractor}")


def load_scorer(*, run: str | os.PathLike[str] | None = None,
                bank: str | os.PathLike[str] | None = None, method: str | None = None,
                device: str = "cpu", scorer_kwargs: dict[str, Any] | None = None) -> LoadedScorer:
    """One ready scorer from a trained run (``run`` + ``method``) or a KNN bank (``bank``)."""
    if (run is None) == (bank is None):
        raise ConfigError("give exactly one of a run (--run) or a KNN bank (--bank)")
    if bank is not None:
        return bank_scorer(bank, device=device)
    found = run_scorers(str(run), method, device=device, scorer_kwargs=scorer_kwargs)
    if len(found) > 1:
        raise ConfigError(f"run {run} offers several scorers ({', '.join(found)}); pick one "
                          "with --method")
    return next(iter(found.values()))


# ----------------------------------------------------------------------------- data rules


def scoring_dataset(root: str | os.PathLike[str], size: int, *,
                    normal_classes: Sequence[str] = ("normal",),
                    classes: Sequence[str] | None = None,
                    masks: str | os.PathLike[str] | None = None,
                    resize: ResizeMode = "resize") -> PatchFolder:
    """A folder to score: class subfolders (``normal_classes`` are label 0); ground-truth masks
    from ``masks`` or ``root/masks`` (which is then no class); patches (and masks) brought to
    ``size`` by ``resize`` (the scorer's: a run's ``data.resize``)."""
    masks = masks or find_mask_root(root)
    return PatchFolder(root=str(root), size=size, classes=classes,
                       normal_classes=tuple(normal_classes),
                       mask_root=str(masks) if masks else None, resize=resize)


def normal_dataset(root: str | os.PathLike[str], size: int, *,
                   normal_classes: Sequence[str] = ("normal",),
                   limit: int | None = None, seed: int = 0,
                   resize: ResizeMode = "resize") -> Dataset:
    """Normal patches of ``root``: its normal class folders when it has them, else all its images
    (a flat folder, or, with a warning naming them, class folders none of which is normal, such
    as one folder per slide); at most ``limit`` of them, a seeded random choice
    (:func:`limit_items`); brought to ``size`` by ``resize``, as the queries are."""
    found, flat = discover_classes(root)
    normal = [c for c in normal_classes if c in found]
    if not flat and not normal:
        warnings.warn(f"{root} has none of the normal classes ({', '.join(normal_classes)}): "
                      f"using all its class folders as normal ({', '.join(found)}); pass "
                      "--normal-classes if some of them are not", stacklevel=2)
    classes = None if flat or not normal else normal
    ds: Dataset = PatchFolder(root=str(root), size=size, classes=classes,
                              normal_classes=tuple(normal or found), resize=resize)
    return limit_items(ds, limit, seed)


def limit_items(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """At most ``limit`` items of ``dataset``: a seeded random choice in dataset order, so a
    sorted folder's first slides or classes do not stand for the whole of it."""
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return subset(dataset, limit, seed)


def limited(dataset: Dataset, limit: int | None) -> tuple[Dataset, dict[str, Any]]:
    """:func:`limit_items` (seed 0) and what ``metrics.json`` records of it: ``{"limit": {"n",
    "of", "seed"}}`` when ``limit`` is given, else ``{}``."""
    ds = limit_items(dataset, limit)
    if limit is None:
        return ds, {}
    return ds, {"limit": {"n": len(ds), "of": len(dataset), "seed": 0}}  # type: ignore[arg-type]


def dataset_paths(ds: Dataset) -> list[str] | None:
    """File paths of a dataset's items (through subsets); ``None`` without files (synthetic)."""
    if isinstance(ds, Subset):
        base = dataset_paths(ds.dataset)
        return None if base is None else [base[i] for i in ds.indices]
    paths = getattr(ds, "paths", None)
    return None if paths is None else list(paths)


def is_labelled(ds: Dataset) -> bool:
    """Whether a dataset's items carry real labels (through subsets); see
    :attr:`~gen_ad.data.folders.PatchFolder.labelled`."""
    if isinstance(ds, Subset):
        return is_labelled(ds.dataset)
    return bool(getattr(ds, "labelled", True))


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoredSet:
    """Scores of a whole dataset, in dataset order.

    Attributes:
        paths / classes: per-image file path and class name.
        labels: ``[N]`` 0 normal / 1 anomalous (meaningless when not ``labelled``).
        scores: ``[N]`` float, higher = more anomalous.
        terms: named ``[N]`` score components.
        maps: ``[N,H,W]`` float32 maps when the method has them and they were kept, else
            ``None``: a :class:`~gen_ad.scoring.store.MapStore` (in memory for small sets, in a
            temporary file for large ones; read with ``maps[i]``, ``maps.read(a, b)``,
            ``np.asarray(maps)``).
        masks: ``[N,H,W]`` bool ground-truth masks (a store) when the dataset has them, else
            ``None``.
        seconds: wall time of scoring (for latency per patch).
        labelled: False when the images carry no class (a flat folder, slide tiles): no
            metrics, and ``scores.csv`` leaves ``label`` empty.
    """

    paths: list[str]
    classes: list[str]
    labels: np.ndarray
    scores: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    maps: MapStore | None = None
    masks: MapStore | None = None
    seconds: float = 0.0
    labelled: bool = True

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(len(self.paths), 1)

    def drop_maps(self) -> None:
        """Free the maps and masks (memory or temporary files) once the metrics are computed."""
        for store in (self.maps, self.masks):
            if store is not None:
                store.close()
        self.maps = self.masks = None


def image_batches(dataset: Dataset, batch_size: int = 32, limit: int | None = None,
                  num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield ``[B,3,H,W]`` image tensors in ``[-1,1]`` from a dataset of item dicts."""
    dataset = limit_items(dataset, limit)
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            worker_init_fn=worker_init(num_workers)):
        yield batch["image"]


def score_dataset(scorer: AnomalyScorer, dataset: Dataset, *, batch_size: int = 32,
                  device: str | torch.device = "cpu", keep_maps: bool = True,
                  num_workers: int = 0, progress: bool = True,
                  spill_dir: str | os.PathLike[str] | None = None,
                  memory_bytes: int = MEMORY_BYTES,
                  map_sink: NormalPixels | None = None, desc: str = "score") -> ScoredSet:
    """Score every image of ``dataset`` (items as produced by :mod:`gen_ad.data`).

    Maps and masks go batch by batch into :class:`~gen_ad.scoring.store.MapStore` objects (at
    most ``memory_bytes`` each in memory, a larger set into a temporary file in ``spill_dir``);
    reconstructions are not kept. Only one batch of maps is alive at a time. ``map_sink``
    also receives each batch's maps (kept or not): a normal set's pixel threshold. ``desc``:
    the progress bar's first word (``calibrate`` for the normal images)."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("nothing to score: the dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        worker_init_fn=worker_init(num_workers))
    # Per-image state lives in arrays allocated once for all n images, filled batch by batch:
    # no object is kept per batch (a batch's small score tensors, kept while its large
    # temporaries were freed around them, pinned the C heap and grew it by KBs per image).
    paths: list[str] = [""] * n
    classes: list[str] = [""] * n
    labels = np.zeros(n, dtype=np.int64)
    scores: dict[str, np.ndarray] = {}  # {"score": [n]}
    terms: dict[str, np.ndarray] = {}  # named [n] score components
    stores: dict[str, MapStore | None] = {}
    done = 0
    if map_sink is not None:
        map_sink.begin(n)
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"{desc} {scorer.name}", disable=not progress, leave=False):
        out = scorer.score(batch["image"].to(device)).cpu()
        bad = ~torch.isfinite(out.scores)
        if bool(bad.any()):
            first = list(batch["path"])[int(bad.nonzero()[0])]
            raise DataError(f"{scorer.name} gave {int(bad.sum())} non-finite score(s) in a batch "
                            f"(first: {first}); nothing was written")
        stop = done + len(out.scores)
        paths[done:stop] = list(batch["path"])
        classes[done:stop] = list(batch.get("cls", ["?"] * len(batch["path"])))
        labels[done:stop] = [int(v) for v in batch["label"]]
        _put_columns(scores, {"score": out.scores}, done, n)
        _put_columns(terms, out.terms, done, n)
        done = stop
        _keep(stores, "maps", out.maps if keep_maps else None, n, spill_dir, memory_bytes)
        if map_sink is not None:
            map_sink.add(out.maps)
        _keep(stores, "masks", batch.get("mask"), n, spill_dir, memory_bytes)
    seconds = time.perf_counter() - t0
    del paths[done:], classes[done:]  # (none left when the loader gave len(dataset) items)
    return ScoredSet(paths, classes, labels[:done], scores["score"][:done],
                     {k: terms[k][:done] for k in sorted(terms)},
                     _complete(stores, "maps", n), _complete(stores, "masks", n), seconds,
                     is_labelled(dataset))


def _put_columns(columns: dict[str, np.ndarray], batch: dict[str, torch.Tensor], start: int,
                 n: int) -> None:
    """Copy a batch's ``[B]`` values into ``columns[key][start:start+B]``, one ``[n]`` array per
    key, allocated at the first batch (``start == 0``). As
    :meth:`~gen_ad.scoring.base.ScoreBatch.cat` concatenates them: a key missing from any batch
    is dropped, and a batch of another dtype promotes its column (:func:`torch.promote_types`),
    so the values are bitwise those of the concatenation."""
    for key in [k for k in columns if k not in batch]:
        del columns[key]
    for key, values in batch.items():
        v = values.numpy()
        col = columns.get(key)
        if col is None:
            if start > 0:  # not in every batch
                continue
            col = columns[key] = np.empty(n, dtype=v.dtype)
        elif col.dtype != v.dtype:
            wide = torch.promote_types(torch.from_numpy(col[:0]).dtype, values.dtype)
            col = columns[key] = col.astype(torch.empty(0, dtype=wide).numpy().dtype)
        col[start:start + len(v)] = v


def _keep(stores: dict[str, MapStore | None], key: str, batch: torch.Tensor | None, n: int,
          spill_dir: str | os.PathLike[str] | None, memory_bytes: int) -> None:
    """Append a batch of maps (float32) or masks (bool) to ``stores[key]``; a batch without
    them marks the set as incomplete (``None`` in the store's place)."""
    if batch is None:
        stores[key] = None
        return
    if key not in stores:
        dtype = np.float32 if key == "maps" else np.bool_
        stores[key] = MapStore(n, dtype, memory_bytes=memory_bytes, spill_dir=spill_dir)
    store = stores[key]
    if store is not None:
        store.append(batch > 0.5 if key == "masks" else batch)


def _complete(stores: dict[str, MapStore | None], key: str, n: int) -> MapStore | None:
    """The store of ``key`` when every image put its item in it, else ``None``."""
    store = stores.get(key)
    if store is None or len(store) != n:
        if store is not None:
            store.close()
        return None
    return store


def calibrate_scorer(scorer: AnomalyScorer, normal: Dataset, *, batch_size: int = 32,
                     device: str | torch.device = "cpu", method: str = "iqr", fpr: float = 0.05,
                     limit: int | None = None, num_workers: int = 0,
                     pixels: NormalPixels | None = None) -> Threshold:
    """Fit ``scorer`` on normal images, then calibrate a label-free threshold on their scores.

    The scores used for the threshold come from the same normal images after fitting; a scorer
    that stores them (a KNN bank) gives its leave-one-out scores instead
    (:meth:`AnomalyScorer.fit_scores`), so no image is its own neighbour. ``pixels`` receives
    the same images' maps (their pixel threshold).
    """
    scorer.fit(b.to(device) for b in image_batches(normal, batch_size, limit, num_workers))
    held_out = scorer.fit_scores()
    if held_out is not None:
        if pixels is not None:
            pixels.unavailable("the image threshold comes from the bank's leave-one-out scores "
                               "(no maps)")
        return calibrate(held_out, method=method, fpr=fpr)
    normal = limit_items(normal, limit)  # the images fit saw
    scored = score_dataset(scorer, normal, batch_size=batch_size, device=device, keep_maps=False,
                           num_workers=num_workers, map_sink=pixels, desc="calibrate")
    return calibrate(scored.scores, method=method, fpr=fpr)


def display_max(maps: MapStore, n_values: int = 1_000_000) -> float:
    """The examples' colour-scale top: the 99th percentile of the first ``n_values`` map values
    (only the images holding them are read)."""
    first = maps.read(0, -(-n_values // max(maps.shape[1] * maps.shape[2], 1)))
    values = np.array(first.reshape(-1)[:n_values], dtype=np.float32)  # a writable copy
    return float(torch.quantile(torch.from_numpy(values), 0.99))


def write_examples(out_dir: Path, scored: ScoredSet, dataset: Dataset, n: int = 8) -> list[Path]:
    """Write map PNGs (overlay + raw, and reconstruction when present) of the ``n`` highest- and
    ``n`` lowest-scoring images into ``out_dir/maps/``."""
    if scored.maps is None or n <= 0:
        return []
    order = np.argsort(-scored.scores, kind="stable")
    picks = [("top", r, int(i)) for r, i in enumerate(order[:n])]
    picks += [("bottom", r, int(i)) for r, i in enumerate(order[::-1][:n])]
    vmax = display_max(scored.maps)
    written = []
    for tag, rank, i in picks:
        stem = Path(scored.paths[i]).stem
        base = out_dir / "maps" / f"{tag}-{rank + 1:02d}_{stem}"
        image = dataset[i]["image"]
        save_map_png(f"{base}_overlay.png", scored.maps[i], image, vmin=0.0, vmax=vmax)
        save_map_png(f"{base}_raw.png", scored.maps[i], vmin=0.0, vmax=vmax)
        written.append(Path(f"{base}_overlay.png"))
    return written


# ----------------------------------------------------------------------------- outputs


def _fmt(v: float) -> str:
    """Shortest text that reads back as the same float (``gen-ad groups`` re-applies the
    threshold to these values, so rounding could flip a score right at it)."""
    return repr(float(v))


def scores_csv(scored: ScoredSet, threshold: Threshold | None = None,
               rows: Sequence[int] | None = None) -> str:
    """``scores.csv`` text, the same columns for every method: :data:`SCORE_COLUMNS` (``flagged``
    is 0/1 above the threshold, empty without one; ``label`` is empty for unlabelled images);
    ``rows`` selects and orders the rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_COLUMNS)
    flags = threshold.apply(scored.scores) if threshold is not None else None
    for i in range(len(scored.paths)) if rows is None else rows:
        flag = "" if flags is None else int(flags[i])
        label = int(scored.labels[i]) if scored.labelled else ""
        w.writerow([scored.paths[i], label, scored.classes[i], _fmt(scored.scores[i]), flag])
    return buf.getvalue()


def terms_csv(scored: ScoredSet) -> str:
    """``terms.csv`` text: ``path`` and one column per named score component."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = sorted(scored.terms)
    w.writerow(["path", *names])
    for i, p in enumerate(scored.paths):
        w.writerow([p, *(_fmt(scored.terms[t][i]) for t in names)])
    return buf.getvalue()


def detection_metrics(scored: ScoredSet, threshold: Threshold | None = None, *,
                      n_boot: int = 2000, seed: int = 0,
                      pixel_threshold: dict[str, Any] | None = None) -> dict[str, Any]:
    """AUROC/AUPR with CIs (plus per-class, pixel and at-threshold metrics) when ``scored`` holds
    both labels, else ``{}``; with ``pixel_threshold`` (a
    :class:`~gen_ad.metrics.pixel_threshold.NormalPixels` record) and maps, that record as
    ``pixel_threshold`` and, with masks, the test pixels at it as ``pixel.at_pixel_threshold``.
    """
    out = _image_and_pixel(scored, threshold, n_boot, seed)
    if pixel_threshold is None or scored.maps is None:
        return out
    out["pixel_threshold"] = pixel_threshold
    if "pixel" in out and pixel_threshold.get("status") == "ok":
        out["pixel"]["at_pixel_threshold"] = at_pixel_threshold(
            scored.maps, scored.masks, scored.labels, pixel_threshold["value"])
    return out


def _image_and_pixel(scored: ScoredSet, threshold: Threshold | None, n_boot: int,
                     seed: int) -> dict[str, Any]:
    """The image-level and pixel metrics of :func:`detection_metrics`."""
    if not scored.labelled or len(set(scored.labels.tolist())) != 2:
        return {}
    anomalous = {c for c, y in zip(scored.classes, scored.labels) if y == 1}
    pixel = scored.maps is not None and scored.masks is not None
    return evaluate_scores(scored.scores, scored.labels,
                           classes=scored.classes if len(anomalous) > 1 else None,
                           threshold=threshold, maps=scored.maps if pixel else None,
                           masks=scored.masks if pixel else None, n_boot=n_boot, seed=seed)


def write_outputs(out_dir: str | os.PathLike[str], scored: ScoredSet, dataset: Dataset | None, *,
                  method: str, threshold: Threshold | None = None, n_examples: int = 8,
                  n_boot: int = 2000, seed: int = 0,
                  metrics: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None,
                  pixel_threshold: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``scores.csv``, ``terms.csv`` (when the method has score components),
    ``flagged.csv`` (rows above the threshold, highest first), example maps of ``dataset`` and
    ``metrics.json``; returns the metrics dict.

    ``metrics``: detection metrics already computed (else :func:`detection_metrics`, with
    ``pixel_threshold``); ``extra``: further entries for ``metrics.json`` (settings the numbers
    depend on)."""
    out = Path(out_dir)
    write_text(out / "scores.csv", scores_csv(scored, threshold))
    if scored.terms:
        write_text(out / "terms.csv", terms_csv(scored))
    found = detection_metrics(scored, threshold, n_boot=n_boot, seed=seed,
                              pixel_threshold=pixel_threshold) if metrics is None else metrics
    metrics = {"method": method, "n": len(scored.paths), "ms_per_image": scored.ms_per_image,
               **(extra or {})}
    if "stain_unchanged" in scored.terms:  # a stain-normalised run: images left in own stain
        metrics["stain_unchanged"] = int(scored.terms["stain_unchanged"].sum())
    if threshold is not None:
        flagged = threshold.apply(scored.scores)
        order = [int(i) for i in np.argsort(-scored.scores, kind="stable") if flagged[i]]
        write_text(out / "flagged.csv", scores_csv(scored, threshold, order))
        metrics["threshold"] = threshold.to_dict()
        metrics["flagged"] = len(order)
    if dataset is not None:
        write_examples(out, scored, dataset, n_examples)
    metrics.update(found)
    write_json(out / "metrics.json", metrics)
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """The one human line of every scoring command: method, n, latency, flagged, AUROC/AUPR
    (and pixel AUROC/AUPRO when masks exist)."""
    parts = [f"{metrics['method']}: {metrics['n']} images, {metrics['ms_per_image']:.1f} ms/image"]
    if "flagged" in metrics:
        parts.append(f"{metrics['flagged']} above threshold {metrics['threshold']['value']:.6g}")
    for key in ("auroc", "aupr"):
        m = metrics.get(key)
        if isinstance(m, dict) and m.get("value") is not None:
            parts.append(f"{key.upper()} {ci_text(m)}")
    pixel = metrics.get("pixel") or {}
    if pixel.get("aupro") is not None:
        parts.append(f"pixel AUROC {pixel['auroc']:.3f}, AUPRO {pixel['aupro']:.3f}")
        parts.append(pixel_dice_text(metrics))
    if metrics.get("stain_unchanged"):
        parts.append(f"{metrics['stain_unchanged']} left in their own stain (too little tissue "
                     "to normalise: terms.csv stain_unchanged)")
    return ", ".join(parts)


def pixel_dice_text(metrics: dict[str, Any]) -> str:
    """``Dice @ 1% pixel FPR (label-free) 0.301 (best Dice 0.412: an upper bound, uses the
    labels)``, or why there is no such Dice (an older record: not recorded)."""
    pixel = metrics.get("pixel") or {}
    record = metrics.get("pixel_threshold")
    best = pixel.get("best_dice")
    best_text = "–" if best is None else f"{best:.3f}"
    if not isinstance(record, dict):
        return f"Dice @ pixel FPR: n/a (not recorded), best Dice {best_text} (upper bound)"
    name = f"Dice @ {fpr_label(record['fpr'])} pixel FPR (label-free)"
    at = pixel.get("at_pixel_threshold")
    if record.get("status") != "ok" or not at:
        return f"{name}: n/a ({record.get('reason', 'no masks')}), best Dice {best_text}"
    dice = "–" if at.get("dice") is None else f"{at['dice']:.3f}"
    return (f"{name} {dice} at map > {record['value']:.4g} (best Dice {best_text}: an upper "
            "bound, uses the labels)")


def select_scorer(scorers: dict[str, AnomalyScorer], method: str | None) -> list[str]:
    """Names of the scorers to run: ``method`` (checked) or all of them."""
    if not scorers:
        raise DataError("this run offers no anomaly scorers (was its second stage trained?)")
    if method is None:
        return list(scorers)
    if method not in scorers:
        raise DataError(f"unknown method '{method}' for this run (available: "
                        f"{', '.join(scorers)})")
    return [method]
