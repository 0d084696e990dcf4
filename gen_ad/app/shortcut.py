"""The shortcut check of every benchmark: a colour-only baseline and a stain-shift re-evaluation.

An anomaly score can separate the classes for the wrong reason (a stain or scanner difference
between the normal and the anomalous sets, JPEG quality, folds). Two checks make that visible:

- **Colour-only baseline** (``colour-baseline``): the KNN baseline (mean distance to the k
  nearest normal vectors, the same label-free threshold rule) on 15 colour statistics per patch
  (:mod:`gen_ad.baselines.colour`), evaluated like every other method on the same split. Its k
  comes from the bank size alone (:func:`colour_k`), never from the test set. A method is
  flagged (a warning in ``results.json`` ``warnings`` and ``shortcut``, and in ``report.html``)
  only when the baseline separates the classes (its AUROC's bootstrap interval lies above 0.5)
  **and** its AUROC reaches or beats the method's (:func:`colour_verdict`); a baseline at or
  below chance is no evidence of a shortcut, and the report says so once.
- **Stain shift**: each method's test split (a seeded subset of ``shortcut.limit`` patches) is
  re-scored after stain normalisation to a reference of the normal set (the normal validation
  patch whose colour statistics are closest to the median) and under random HED jitter of
  strength ``shortcut.jitter``; the AUROC drop against the same patches unshifted is reported.
  A method that follows tissue changes little; one that follows stain changes a lot.

:mod:`gen_ad.app.benchmark` calls :func:`shortcut_methods` (the extra method to evaluate) and
:func:`shortcut_report` (comparisons, stain shift, warnings) after all methods are scored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Subset

from gen_ad.config import check
from gen_ad.errors import GenAdError

if TYPE_CHECKING:
    from gen_ad.app.benchmark import BenchmarkConfig, MethodOutcome, PreparedMethod, SplitCache
    from gen_ad.data.folders import ResizeMode

Normalisers = dict[tuple[int, "ResizeMode"], "tuple[Any, str] | str"]

COLOUR_BASELINE = "colour-baseline"
COLOUR_KIND = "colour baseline"
AUTO_K_MAX = 200  # the KNN baseline's k (Juturu et al.), reached by the auto rule at 40 000 patches


@dataclass
class ShortcutConfig:
    """``shortcut:`` section of a benchmark config.

    Attributes:
        colour_baseline: evaluate the colour-only baseline and compare every method with it.
        bank: normal folder of the baseline's feature bank (default: the first KNN method's
            bank, else ``data.val``; with ``data.val`` the threshold is optimistic, the AUROC is
            not affected).
        bank_limit: at most this many bank patches.
        k: neighbours. Unset (``None``, the default): chosen from the bank size alone,
            ``min(200, round(sqrt(n_bank)))`` (:func:`colour_k`); a number is used exactly,
            except that it is capped at the bank size minus one (with a warning).
        stain_shift: run the stain-shift re-evaluation.
        normalise: stain normalisation method (``macenko`` or ``reinhard``).
        jitter: HED jitter strength (scale ``U(1-s,1+s)`` and shift ``U(-s,s)`` per channel).
        limit: test patches re-scored per method and shift (seeded subset; ``None`` = all).
        seed: seed of the subset and of the jitter.
    """

    colour_baseline: bool = True
    bank: str | None = None
    bank_limit: int | None = 2000
    k: int | None = None
    stain_shift: bool = True
    normalise: Literal["macenko", "reinhard"] = "macenko"
    jitter: float = 0.05
    limit: int | None = 200
    seed: int = 0

    def validate(self, prefix: str) -> None:
        check(self.k is None or self.k >= 1, f"{prefix}.k",
              f"must be >= 1 (or unset: chosen from the bank size), got {self.k}")
        check(self.bank_limit is None or self.bank_limit > 1, f"{prefix}.bank_limit",
              "must be > 1")
        check(0.0 <= self.jitter <= 1.0, f"{prefix}.jitter", f"must be in [0, 1], got "
              f"{self.jitter}")
        check(self.limit is None or self.limit > 1, f"{prefix}.limit", "must be > 1")


def colour_k(configured: int | None, n_bank: int) -> tuple[int, str, str | None]:
    """The colour baseline's k for a bank of ``n_bank`` patches: ``(k, rule, clipped)``.

    Unset (``configured`` ``None``): ``min(200, max(1, round(sqrt(n_bank))))``, from the bank
    size alone (the square-root rule of thumb of KNN; it reaches the KNN baseline's k = 200 at
    40 000 patches), so it is never tuned on the test set and never averages over most of a
    small bank. A configured k is used exactly. Either is capped at ``n_bank - 1`` (a
    leave-one-out score needs ``k`` other vectors); ``clipped`` then says so, else ``None``.
    """
    n = max(1, int(n_bank))
    if configured is None:
        want = min(AUTO_K_MAX, max(1, round(math.sqrt(n))))
        rule = f"chosen from the bank size: min({AUTO_K_MAX}, round(sqrt({n})))"
    else:
        want, rule = int(configured), "shortcut.k"
    k = max(1, min(want, n - 1))
    clipped = None
    if k < want:
        clipped = (f"shortcut: the colour-only baseline's k = {want} ({rule}) needs more than "
                   f"{want} bank patches, its bank holds {n}: k = {k} is used, so each score "
                   "averages over the whole bank; set shortcut.k below the bank size, or a "
                   "larger shortcut.bank")
        rule += f", capped at the bank size minus one (k = {want} asked)"
    return k, rule, clipped


def shortcut_methods(cfg: BenchmarkConfig, methods: list[PreparedMethod], split: SplitCache,
                     device: str) -> list[PreparedMethod]:
    """The colour-only baseline as one more method (none when disabled or already listed).

    A k capped at the bank size is one warning line (and a note of the method)."""
    from gen_ad.app.evaluate import PreparedMethod
    from gen_ad.baselines.colour import COLOUR_STATS
    from gen_ad.baselines.extractors import build_extractor
    from gen_ad.baselines.knn import KNNScorer

    sc = cfg.shortcut
    if not sc.colour_baseline or any(m.name == COLOUR_BASELINE for m in methods):
        return []
    knn = [m for m in methods if m.kind == "knn"]
    bank = sc.bank or (knn[0].fit_root if knn else cfg.data.val)
    n_bank = len(split.normal(bank, cfg.data.size, sc.bank_limit))  # type: ignore[arg-type]
    k, rule, clipped = colour_k(sc.k, n_bank)
    scorer = KNNScorer(build_extractor(COLOUR_STATS, device=device), k=k, seed=sc.seed)
    desc = (f"colour-only baseline: KNN (k={k}, {rule}; mean L2 distance) on per-channel "
            f"colour statistics (mean, std, 10/50/90% quantiles of R, G, B), bank: {bank} "
            f"({n_bank} patches)")
    notes = ["shortcut check: sees nothing but colour; where it separates the classes (AUROC "
             "interval above 0.5), a method it reaches or beats may be separating stain rather "
             "than tissue"]
    if clipped:
        warnings.warn(clipped, stacklevel=2)
        notes.append(clipped.removeprefix("shortcut: "))
    if bank == cfg.data.val:
        notes.append("bank = the normal validation folder (no KNN bank in this benchmark): "
                     "its threshold comes from the bank's leave-one-out scores")
    return [PreparedMethod(COLOUR_BASELINE, COLOUR_KIND, desc, notes, scorer, cfg.data.size,
                           bank, sc.bank_limit, cfg.batch_size)]


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from gen_ad.metrics.detection import auroc

    return float(auroc(scores, labels)) if len(np.unique(labels)) == 2 else None


def _subset_index(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A seeded, label-stratified subset of at most ``limit`` test indices (sorted)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_pos = min(len(pos), max(1, round(limit * len(pos) / len(labels))))
    n_neg = min(len(neg), limit - n_pos)
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False),
                                   rng.choice(neg, n_neg, replace=False)]))


def _normaliser(cfg: BenchmarkConfig, split: SplitCache, size: int,
                resize: ResizeMode) -> tuple[Any, str]:
    """A stain normaliser fitted on the normal set's median-colour patch, and its description."""
    from gen_ad.app.evaluate import image_batches
    from gen_ad.data.folders import tensor_to_uint8
    from gen_ad.data.stain import StainNormalizer
    from gen_ad.data.stain_shift import median_reference

    val = split.normal(cfg.data.val, size, cfg.data.val_limit, resize)
    images = torch.cat(list(image_batches(val, 256, limit=512)))
    i = median_reference(images)
    ref = tensor_to_uint8(images[i]).numpy()
    norm = StainNormalizer(cfg.shortcut.normalise, reference=ref)
    path = val[i].get("path", f"#{i}")  # type: ignore[index]
    return norm, f"{cfg.shortcut.normalise} to {path}"


def _shifted_auroc(o: MethodOutcome, idx: np.ndarray, transform: Any, cfg: BenchmarkConfig,
                   split: SplitCache, device: str) -> float | None:
    from gen_ad.app.evaluate import score_dataset
    from gen_ad.data.stain_shift import ShiftedDataset

    pm = o.method
    test = split.test(pm.size, pm.resize)
    ds = ShiftedDataset(Subset(test, idx.tolist()), transform, cfg.shortcut.seed)
    scored = score_dataset(pm.scorer, ds, batch_size=pm.batch_size, device=device,
                           keep_maps=False, progress=False)
    return _auroc(scored.scores, scored.labels)


def stain_shift(o: MethodOutcome, cfg: BenchmarkConfig, split: SplitCache, device: str,
                normalisers: Normalisers) -> dict[str, Any]:
    """AUROC of one method on a test subset: as is, stain-normalised, HED-jittered; drops."""
    from gen_ad.data.stain_shift import hed_jitter

    sc = cfg.shortcut
    idx = _subset_index(o.scored.labels, sc.limit, sc.seed)
    clean = _auroc(o.scored.scores[idx], o.scored.labels[idx])
    rec: dict[str, Any] = {"n": int(len(idx)), "auroc": clean, "jitter": sc.jitter}
    key = (o.method.size, o.method.resize)  # the reference is read as the method's patches are
    if key not in normalisers:
        try:
            normalisers[key] = _normaliser(cfg, split, *key)
        except (GenAdError, ImportError) as e:
            normalisers[key] = f"stain normalisation unavailable: {e}"
    norm = normalisers[key]
    if isinstance(norm, str):
        rec["normalised_error"] = norm
    else:
        before = norm[0].n_skipped
        rec["auroc_normalised"] = _shifted_auroc(o, idx, lambda rgb, rng: norm[0](rgb), cfg,
                                                 split, device)
        rec["normalised_to"] = norm[1]
        rec["normaliser_skipped"] = int(norm[0].n_skipped - before)
    rec["auroc_jitter"] = _shifted_auroc(o, idx, lambda rgb, rng: hed_jitter(rgb, sc.jitter, rng),
                                         cfg, split, device)
    for key in ("normalised", "jitter"):
        shifted = rec.get(f"auroc_{key}")
        rec[f"drop_{key}"] = (clean - shifted if clean is not None and shifted is not None
                              else None)
    return rec


def _ci(rec: dict[str, Any]) -> str:
    """``0.702 [0.628, 0.774]`` (the point estimate alone without an interval)."""
    lo, hi = rec.get("low"), rec.get("high")
    return f"{rec['auroc']:.3f}" + ("" if lo is None or hi is None else f" [{lo:.3f}, {hi:.3f}]")


def colour_verdict(auroc: dict[str, Any]) -> dict[str, Any]:
    """Whether the colour-only baseline separates the classes, from its AUROC record
    (``{value, low, high}``, :mod:`gen_ad.metrics.detection`).

    It separates when its bootstrap interval lies above 0.5 (``low > 0.5``; without an
    interval, ``n_boot: 0``, when the point estimate is above 0.5). A baseline at or below
    chance, or whose interval holds 0.5, shows no colour difference in the direction of an
    anomaly score, so it flags no method; ``note`` says that once.

    Returns:
        ``{auroc, low, high, separates (None without an AUROC), note (None when it
        separates)}``.
    """
    c, lo, hi = auroc.get("value"), auroc.get("low"), auroc.get("high")
    rec: dict[str, Any] = {"auroc": c, "low": lo, "high": hi, "separates": None, "note": None}
    if c is None:
        return rec
    rec["separates"] = bool(lo > 0.5) if lo is not None else bool(c > 0.5)
    if not rec["separates"]:
        if lo is None or hi is None:
            why = "at or below chance; no bootstrap interval"
        elif hi < 0.5:  # colour differs, in the direction opposite to an anomaly score
            why = ("its interval lies below 0.5: in colour the normal test patches lie farther "
                   "from the normal bank than the anomalous ones")
        else:
            why = "its bootstrap interval contains 0.5"
        rec["note"] = (f"colour does not separate this split (AUROC {_ci(rec)}; {why}), so it "
                       "is no evidence of a shortcut and no method is flagged")
    return rec


def _k_record(pm: PreparedMethod, configured: int | None, split: SplitCache) -> dict[str, Any]:
    """The baseline's ``k``, ``k_rule`` and ``n_bank`` (:func:`colour_k` of its bank)."""
    n_bank = len(split.normal(pm.fit_root, pm.size, pm.fit_limit, pm.resize))  # type: ignore[arg-type]
    k, rule, _ = colour_k(configured, n_bank)
    return {"k": k, "k_rule": rule, "n_bank": n_bank}


def _compare(auc: float | None, base: dict[str, Any] | None) -> dict[str, Any]:
    """One method's record against the baseline ``base`` (``None``: no baseline, or the
    baseline itself): ``colour_reaches`` (AUROC comparison) and ``flagged`` (the rule)."""
    rec: dict[str, Any] = {"auroc": auc, "colour_auroc": None, "colour_reaches": None,
                           "flagged": None}
    if base is not None and auc is not None and base["auroc"] is not None:
        rec["colour_reaches"] = bool(base["auroc"] >= auc)
        rec["flagged"] = bool(base["separates"]) and rec["colour_reaches"]
    return rec


def shortcut_report(cfg: BenchmarkConfig, outcomes: list[MethodOutcome], split: SplitCache,
                    device: str, progress: bool = True) -> dict[str, Any]:
    """Compare every method with the colour-only baseline and run the stain shift.

    A method is ``flagged`` (one warning each) only when the baseline separates the classes
    (:func:`colour_verdict`) and ``colour_reaches`` (its AUROC >= the method's); when it does
    not separate, its ``note`` is printed once (with ``progress``) and no method is flagged.

    Returns:
        ``{"colour_baseline": {name, auroc, low, high, separates, note, k, k_rule, n_bank} |
        None, "methods":
        {name: {auroc, colour_auroc, colour_reaches, flagged, stain_shift}}, "warnings": [...]}``.
    """
    sc = cfg.shortcut
    colour = next((o for o in outcomes if o.method.name == COLOUR_BASELINE), None)
    base = None if colour is None else {
        "name": COLOUR_BASELINE, **colour_verdict(colour.metrics.get("auroc") or {}),
        **_k_record(colour.method, sc.k, split)}
    out: dict[str, Any] = {"colour_baseline": base, "methods": {}, "warnings": []}
    if base is not None and base["note"] and progress:
        print(f"[benchmark] shortcut check: {base['note']}", flush=True)
    normalisers: Normalisers = {}
    for o in outcomes:
        name = o.method.name
        rec = _compare((o.metrics.get("auroc") or {}).get("value"), None if o is colour else base)
        rec["colour_auroc"] = None if base is None else base["auroc"]
        if rec["flagged"]:
            out["warnings"].append(
                f"shortcut: the colour-only baseline (AUROC {_ci(base or {})}) separates this "
                f"split and reaches or beats '{name}' (AUROC {rec['auroc']:.3f}); colour "
                "statistics alone separate the classes as well, so this method's score may "
                "follow stain, scanner or compression rather than tissue")
        if sc.stain_shift:
            if progress:
                print(f"[benchmark] stain shift: {name}", flush=True)
            rec["stain_shift"] = stain_shift(o, cfg, split, device, normalisers)
        out["methods"][name] = rec
    return out
