"""Running ``gen-ad benchmark`` again: each method finished with the same settings is reused.

A benchmark can take hours (StyleGAN2 projection, diffusion reconstruction), so every method's
results are kept in ``<out>/methods/<name>/`` with a record of what they were computed under:

- the evaluation engine's files (``scores.csv``, ``terms.csv``, ``flagged.csv``,
  ``metrics.json``);
- ``outcome.npz``: what the report is drawn from (test scores, labels and score components in
  test order, the normal validation scores behind the threshold, the example images with their
  reconstructions and maps);
- ``method.json``, written **last**: the settings (:func:`method_settings`: the run's export
  manifest or the extractor's weights, scorer and options, the test, fit and threshold images
  (names, sizes, times), threshold rule, pixel-threshold FPR, bootstrap, examples,
  stain-shift settings, device, deterministic mode, gen_ad's version and sources:
  :func:`~gen_ad.utils.identity.code_identity`) and their sha256, the threshold, metrics,
  timings, the stain-shift record and the sha256 of every other file of the folder.

A method is computed by removing its ``method.json`` first and writing it again after every
other file (:func:`compute_method`): a run killed at any point leaves a folder without one,
which the next run computes again without reading anything in it. With ``reuse``
(:func:`method_outcomes`), a method whose ``method.json`` records the same settings and whose
files still have the recorded sha256 is reused (one stderr line saying when it was computed);
every other method is computed again (one stderr line saying why). Maps are never kept: a
reused method has its metrics, and the report its examples. ``results.json``, ``report.html``
and ``figures/`` are rebuilt from the requested methods only; the folder of a method no longer
requested is left on disk (a stderr line says so) and listed nowhere.

Only gen_ad's own code is covered by the code identity: a caller's own scorer
(:func:`~gen_ad.app.benchmark.benchmark_methods` with its own methods) is identified by its
class, name, description and notes, so reuse is off unless asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gen_ad.app.evaluate import PreparedMethod, ScoredSet, dataset_paths, write_outputs
from gen_ad.app.score import ENGINE_OUTPUTS, clear_outputs
from gen_ad.app.shortcut import COLOUR_KIND
from gen_ad.config import to_dict
from gen_ad.scoring.base import ScoreBatch, batch_dependent
from gen_ad.scoring.thresholds import Threshold
from gen_ad.utils.identity import code_identity, settings_changed, settings_digest
from gen_ad.utils.io import write_bytes, write_json

if TYPE_CHECKING:
    from gen_ad.app.benchmark import BenchmarkConfig, SplitCache
    from gen_ad.app.shortcut import Normalisers

#: ``evaluate_method(pm, split, cfg, device, examples)`` of :mod:`gen_ad.app.benchmark`.
Evaluate = Callable[[PreparedMethod, "SplitCache", "BenchmarkConfig", str, "list[int] | None"],
                    "MethodOutcome"]

RECORD = "method.json"
ARRAYS = "outcome.npz"
_FILES = (*ENGINE_OUTPUTS, ARRAYS)  # what a record may list (names inside the method folder)
_COLOUR_KEYS = ("colour_baseline", "bank", "bank_limit", "k", "seed")
_STAIN_KEYS = ("normalise", "jitter", "limit", "seed")
_NOT_SETTINGS = ("name", "note", "batch_size")  # a label, free text, how fast
_FIGURE_RE = re.compile(r"(?:roc|pr|hist-.+|examples-.+)\.png")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class MethodOutcome:
    """Everything measured for one method.

    Attributes:
        method: the prepared method.
        scored: test scores (and maps) in test-set order.
        val_scores: ``[M]`` normal validation scores (threshold calibration).
        threshold: the label-free threshold.
        metrics: :func:`~gen_ad.metrics.detection.evaluate_scores` output.
        examples: ``(images [E,3,H,W], ScoreBatch with recon/maps)`` of the example images.
        example_index: their test indices.
        fit_seconds: time of ``fit`` (calibration).
        has_maps: whether the method gave maps (they are dropped once the metrics are computed:
            every method's maps of a large test set would not fit in memory together).
        stain_shift: the stain-shift record (:func:`~gen_ad.app.shortcut.stain_shift`) or None.
        computed / reused: when the results were computed (ISO time), and whether this run
            read them back from ``methods/<name>/`` (:mod:`gen_ad.app.benchmark_reuse`).
    """

    method: PreparedMethod
    scored: Any
    val_scores: np.ndarray
    threshold: Any
    metrics: dict[str, Any]
    examples: tuple[torch.Tensor, ScoreBatch] | None
    example_index: list[int]
    fit_seconds: float
    has_maps: bool = False
    stain_shift: dict[str, Any] | None = None
    computed: str | None = None
    reused: bool = False



# ----------------------------------------------------------------------------- settings


def _file_identity(path: str | None) -> dict[str, Any] | None:
    """:func:`gen_ad.utils.identity.file_identity` (resolved path, size, mtime), or None."""
    from gen_ad.utils.identity import file_identity

    return None if path is None else file_identity(path)


def _stat(path: str | None) -> list[Any] | None:
    """``[size, mtime_ns]`` of a file (``None`` for no file)."""
    found = _file_identity(path)
    return None if found is None else [found.get("size"), found.get("mtime_ns")]


def _items(ds: Dataset) -> list[list[Any]] | None:
    """``[path, class, label, mask path]`` of every item (through subsets), else ``None``."""
    if isinstance(ds, Subset):
        base = _items(ds.dataset)
        return None if base is None else [base[i] for i in ds.indices]
    samples = getattr(ds, "samples", None)
    if samples is not None:
        return [[s.path, s.cls, s.label, s.mask] for s in samples]
    paths = dataset_paths(ds)
    return None if paths is None else [[p, None, None, None] for p in paths]


class Identities:
    """File identities of one benchmark run, each dataset listed once (a test split of many
    thousand patches is shared by every method), and the code identity."""

    def __init__(self) -> None:
        self.code = code_identity()
        self._listings: dict[int, tuple[Dataset, dict[str, Any]]] = {}

    def listing(self, ds: Dataset) -> dict[str, Any]:
        """``{"n", "sha256"}`` of the items' paths, classes, labels and masks with each file's
        size and modification time; a dataset without files is never taken as the same."""
        key = id(ds)
        if key not in self._listings:
            items = _items(ds)
            found: dict[str, Any] = {"n": len(ds)}  # type: ignore[arg-type]
            if items is None:
                found["unlisted"] = uuid.uuid4().hex
            else:
                rows = [[*it, _stat(it[0]), _stat(it[3])] for it in items]
                found["sha256"] = _sha256(json.dumps(rows).encode("utf-8"))
            self._listings[key] = (ds, found)  # the dataset is held: its id stays its own
        return self._listings[key][1]

    @staticmethod
    def weights(scorer: Any) -> list[Any] | None:
        """The weights file an extractor-based scorer loaded (and its shards), by identity."""
        from gen_ad.baselines.extractors import is_shard_index, shard_files

        src = getattr(getattr(scorer, "extractor", None), "weights_source", None)
        if src is None:
            return None
        shards = shard_files(src) if is_shard_index(src) else []
        return [_file_identity(str(src)), *(_file_identity(str(f)) for f in shards)]


def _config_entry(pm: PreparedMethod, cfg: BenchmarkConfig,
                  entries: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The config section a method comes from (``entries``: config entry by method name;
    without its label, note and batch size), and its free-text note."""
    entry = entries.get(pm.name)
    if entry is not None:
        return {k: v for k, v in to_dict(entry).items() if k not in _NOT_SETTINGS}, entry.note
    if pm.kind == COLOUR_KIND:
        return {k: v for k, v in to_dict(cfg.shortcut).items() if k in _COLOUR_KEYS}, None
    return None, None


def method_settings(pm: PreparedMethod, cfg: BenchmarkConfig, split: SplitCache, device: str,
                    ids: Identities, entries: Mapping[str, Any]) -> dict[str, Any]:
    """``{"settings": ..., "settings_sha256": ...}``: everything a method's results depend on.

    The batch size is left out (it changes how fast, not what is computed: a run killed by an
    out-of-memory error and run again with a smaller one reuses what was finished) unless the
    scorer's draws depend on it (diffusion ``streams: batch``), as are the report's free-text
    notes from the config. Deterministic mode is in (on CUDA it changes the numbers)."""
    import torch

    from gen_ad.app.slide import scorer_identity

    entry, note = _config_entry(pm, cfg, entries)
    sc, cls = cfg.shortcut, type(pm.scorer)
    found = {
        "name": pm.name, "kind": pm.kind, "description": pm.description,
        "notes": [n for n in pm.notes if note is None or n != note],
        "scorer": f"{cls.__module__}.{cls.__qualname__}", "scorer_name": pm.scorer.name,
        "config": entry, "model": scorer_identity(pm.run_path, None) if pm.run_path else None,
        "batch_size": pm.batch_size if batch_dependent(pm.scorer) else None,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "weights": ids.weights(pm.scorer), "size": pm.size, "resize": pm.resize,
        "test": ids.listing(split.test(pm.size, pm.resize)),
        "masks": cfg.data.masks,
        "fit": ids.listing(split.normal(pm.fit_root, pm.size, pm.fit_limit, pm.resize)),
        "val": ids.listing(split.normal(cfg.data.val, pm.size, cfg.data.val_limit, pm.resize)),
        "threshold": {"rule": cfg.threshold, **({"fpr": cfg.fpr} if cfg.threshold == "fpr"
                                                else {})},
        "pixel_threshold": {"fpr": cfg.pixel_fpr},
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed}, "examples": cfg.examples,
        "stain_shift": ({k: v for k, v in to_dict(sc).items() if k in _STAIN_KEYS}
                        if sc.stain_shift else None),
        "device": device, "code": ids.code,
    }
    plain, sha = settings_digest(found)  # as it reads back from method.json
    return {"settings": plain, "settings_sha256": sha}


# ----------------------------------------------------------------------------- arrays


def _arrays(o: MethodOutcome) -> dict[str, np.ndarray]:
    """What the report needs of a method beside its metrics, as arrays (no maps of the test
    split: only the examples')."""
    s = o.scored
    out: dict[str, np.ndarray] = {
        "paths": np.array(s.paths, dtype=str), "classes": np.array(s.classes, dtype=str),
        "labels": np.asarray(s.labels), "scores": np.asarray(s.scores),
        "val_scores": np.asarray(o.val_scores),
        "example_index": np.asarray(o.example_index, dtype=np.int64)}
    out.update({f"term.{k}": np.asarray(v) for k, v in s.terms.items()})
    if o.examples is not None:
        images, sb = o.examples
        out.update({"ex.images": images.numpy(), "ex.scores": sb.scores.numpy()})
        if sb.maps is not None:
            out["ex.maps"] = sb.maps.numpy()
        if sb.recon is not None:
            out["ex.recon"] = sb.recon.numpy()
        out.update({f"ex.term.{k}": v.numpy() for k, v in sb.terms.items()})
    return out


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _examples(z: dict[str, np.ndarray]) -> tuple[torch.Tensor, ScoreBatch] | None:
    if "ex.images" not in z:
        return None
    opt = {k: torch.from_numpy(z[f"ex.{k}"]) for k in ("maps", "recon") if f"ex.{k}" in z}
    terms = {k[len("ex.term."):]: torch.from_numpy(v) for k, v in z.items()
             if k.startswith("ex.term.")}
    return torch.from_numpy(z["ex.images"]), ScoreBatch(torch.from_numpy(z["ex.scores"]),
                                                        terms=terms, **opt)


def reused_outcome(pm: PreparedMethod, rec: dict[str, Any], data: bytes,
                   where: Path) -> MethodOutcome:
    """A method's outcome read back from its record and the (checked) bytes of its arrays."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        z = {k: npz[k] for k in npz.files}
    terms = {k[len("term."):]: v for k, v in z.items() if k.startswith("term.")}
    scored = ScoredSet([str(p) for p in z["paths"]], [str(c) for c in z["classes"]],
                       z["labels"], z["scores"], terms, seconds=float(rec["seconds"]),
                       labelled=bool(rec["labelled"]))
    return MethodOutcome(replace(pm, batch_size=int(rec["batch_size"])), scored,
                         z["val_scores"], Threshold.from_record(rec["threshold"], where),
                         rec["metrics"], _examples(z), [int(i) for i in z["example_index"]],
                         float(rec["fit_seconds"]), bool(rec["has_maps"]),
                         stain_shift=rec.get("stain_shift"), computed=str(rec["computed"]),
                         reused=True)


# ----------------------------------------------------------------------------- records


def _checked_files(folder: Path, files: Any) -> tuple[bytes | None, str]:
    """The bytes of ``outcome.npz`` when every recorded file still has its sha256, else why
    not (a record may name only the method folder's own files)."""
    if not isinstance(files, dict) or ARRAYS not in files or not set(files) <= set(_FILES):
        return None, f"its {RECORD} does not list its files"
    data = b""
    for name, digest in files.items():
        try:
            content = (folder / name).read_bytes()
        except OSError:
            return None, f"its {name} is missing"
        if _sha256(content) != digest:
            return None, f"its {name} changed after it was written"
        data = content if name == ARRAYS else data
    return data, ""


def finished_method(folder: Path, settings: dict[str, Any]
                    ) -> tuple[dict[str, Any] | None, bytes | None, str]:
    """The record of a method computed earlier with the same settings, and its arrays' bytes;
    else ``None, None`` and why it is computed (again): ``""`` for a method never computed."""
    f = folder / RECORD
    if not f.is_file():
        started = folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())
        return None, None, (f"no {RECORD} in {folder}: an earlier run was interrupted before "
                            "finishing it (or an older gen_ad wrote it)" if started else "")
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        changed = settings_changed(rec, settings, "computed")
    except (OSError, ValueError, AttributeError):
        return None, None, f"its {RECORD} is unreadable"
    if changed:
        return None, None, changed
    data, why = _checked_files(folder, rec.get("files"))
    return (rec, data, "") if data is not None else (None, None, why)


def _publish(folder: Path, o: MethodOutcome, settings: dict[str, Any], device: str) -> None:
    """Write the method's arrays, then its record (last: it marks the outputs complete)."""
    from gen_ad.utils.provenance import environment

    write_bytes(folder / ARRAYS, _npz_bytes(_arrays(o)))
    files = {n: _sha256((folder / n).read_bytes()) for n in _FILES if (folder / n).is_file()}
    s = o.scored
    rec = {"method": o.method.name, "computed": o.computed, **settings,
           "threshold": o.threshold.to_dict(), "metrics": o.metrics, "seconds": s.seconds,
           "labelled": s.labelled, "fit_seconds": o.fit_seconds, "has_maps": o.has_maps,
           "batch_size": o.method.batch_size, "stain_shift": o.stain_shift,
           "environment": environment(device), "files": files}
    write_json(folder / RECORD, rec)


def compute_method(pm: PreparedMethod, cfg: BenchmarkConfig, split: SplitCache, device: str,
                   examples: list[int] | None, settings: dict[str, Any],
                   normalisers: Normalisers, evaluate: Evaluate,
                   progress: bool = True) -> MethodOutcome:
    """Evaluate one method, write its outputs and (when on) its stain shift, then its record.

    Its record is removed first and written last, so a run killed anywhere in between leaves
    none: the next run computes the method again and never reads what this one left."""
    from gen_ad.app import shortcut

    folder = Path(cfg.out) / "methods" / pm.name
    (folder / RECORD).unlink(missing_ok=True)
    if progress:
        print(f"[benchmark] {pm.name}: {pm.description}", flush=True)
    o = evaluate(pm, split, cfg, device, examples)
    clear_outputs(folder)
    (folder / ARRAYS).unlink(missing_ok=True)
    write_outputs(folder, o.scored, None, method=pm.name, threshold=o.threshold,
                  metrics=o.metrics)
    if cfg.shortcut.stain_shift:
        if progress:
            print(f"[benchmark] stain shift: {pm.name}", flush=True)
        o.stain_shift = shortcut.stain_shift(o, cfg, split, device, normalisers)
    o.computed = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _publish(folder, o, settings, device)
    return o


def _reuse(folder: Path, pm: PreparedMethod, settings: dict[str, Any]) -> MethodOutcome | None:
    """The method's earlier outcome when finished with these settings (a stderr line either
    way, except for a method never computed)."""
    rec, data, why = finished_method(folder, settings)
    failed = (rec or {}).get("stain_shift") or {}
    if rec is not None and isinstance(failed, dict) and failed.get("normalised_error"):
        rec, why = None, f"its stain shift failed then ({failed['normalised_error']})"
    if rec is None or data is None:
        if why:
            _say(f"benchmark method {pm.name}: computing again ({why})")
        return None
    try:
        o = reused_outcome(pm, rec, data, folder / RECORD)
    except (KeyError, TypeError, ValueError, OSError) as e:  # written by us, yet unusable
        _say(f"benchmark method {pm.name}: computing again (its {RECORD} or {ARRAYS} cannot "
             f"be read back: {type(e).__name__}: {e})")
        return None
    _say(f"benchmark method {pm.name}: reused (computed {rec['computed']}; {folder / RECORD} "
         "records the same settings)")
    return o


def method_outcomes(cfg: BenchmarkConfig, methods: list[PreparedMethod], split: SplitCache,
                    device: str, *, reuse: bool, evaluate: Evaluate, entries: Mapping[str, Any],
                    progress: bool = True) -> list[MethodOutcome]:
    """Every method's outcome in order: reused (``reuse`` and a matching record) or computed
    (``evaluate``: the benchmark's evaluation of one method; ``entries``: each method's config
    entry by name).

    All methods show the same example images (the first method's choice, seeded)."""
    ids = Identities()
    normalisers: Normalisers = {}
    outcomes: list[MethodOutcome] = []
    idx: list[int] | None = None
    for pm in methods:
        folder = Path(cfg.out) / "methods" / pm.name
        settings = method_settings(pm, cfg, split, device, ids, entries)
        o = _reuse(folder, pm, settings) if reuse else None
        if o is None:
            if not reuse and (folder / RECORD).is_file():
                _say(f"benchmark method {pm.name}: computing again (asked not to reuse "
                     "earlier results)")
            o = compute_method(pm, cfg, split, device, idx, settings, normalisers, evaluate,
                               progress)
        idx = o.example_index
        outcomes.append(o)
    _note_unrequested(Path(cfg.out) / "methods", {pm.name for pm in methods})
    return outcomes


def _note_unrequested(root: Path, names: set[str]) -> None:
    """One stderr line per method folder of an earlier run whose method is not requested now."""
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    for n in found:
        if n not in names and not n.startswith(".") and (root / n).is_dir():
            _say(f"benchmark method {n}: not in this benchmark; {root / n} is left as it is and "
                 "is in neither results.json nor the report (list the method again to reuse "
                 "it, or delete the folder)")


# ----------------------------------------------------------------------------- tables


def shortcut_summary(cfg: BenchmarkConfig, outcomes: list[MethodOutcome], split: SplitCache,
                     device: str, progress: bool = True) -> dict[str, Any]:
    """:func:`~gen_ad.app.shortcut.shortcut_report` of the outcomes, with each method's
    stain-shift record computed with it (:func:`compute_method`) or read from its record."""
    from gen_ad.app.shortcut import shortcut_report

    no_shift = replace(cfg, shortcut=replace(cfg.shortcut, stain_shift=False))
    out = shortcut_report(no_shift, outcomes, split, device, progress)
    if cfg.shortcut.stain_shift:
        for o in outcomes:
            out["methods"][o.method.name]["stain_shift"] = o.stain_shift
    return out


def prune_figures(fig_dir: Path, written: dict[str, str]) -> None:
    """Remove the benchmark's own figure files that this run did not write (those of methods
    no longer requested), so ``figures/`` shows exactly the report's methods."""
    keep = set(written.values())
    for p in fig_dir.glob("*.png") if fig_dir.is_dir() else []:
        if p.name not in keep and _FIGURE_RE.fullmatch(p.name):
            p.unlink(missing_ok=True)
