"""``gen-ad score RUN --data DIR --out DIR``: score a patch folder with a trained run's scorers.

Each scorer goes through the evaluation engine (:mod:`gen_ad.app.evaluate`): fit and calibrate on
normal validation patches (or reuse the calibration saved with the run), score, write outputs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gen_ad.app.evaluate import (
    LoadedScorer,
    calibrate_scorer,
    limited,
    normal_dataset,
    resolve_device,
    run_scorers,
    score_dataset,
    scoring_dataset,
    write_outputs,
)
from gen_ad.errors import DataError
from gen_ad.metrics.pixel_threshold import DEFAULT_PIXEL_FPR, NormalPixels
from gen_ad.scoring.thresholds import Threshold, ThresholdSet
from gen_ad.utils.lock import folder_lock, writes_folder

ENGINE_OUTPUTS = ("metrics.json", "flagged.csv", "terms.csv", "scores.csv")  # marker first


def clear_outputs(out_dir: str | os.PathLike[str]) -> None:
    """Remove what an earlier scoring wrote in ``out_dir`` (``metrics.json``, which is written
    last, first; then ``flagged.csv``, ``terms.csv``, ``scores.csv`` and ``maps/``) before new
    outputs are written: a run without a threshold leaves no stale ``flagged.csv``, and an
    interrupted one no new ``scores.csv`` beside an old ``metrics.json``."""
    from gen_ad.utils.io import remove_dir

    out = Path(out_dir).expanduser()
    for name in ENGINE_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    if (out / "maps").is_dir() and not (out / "maps").is_symlink():
        remove_dir(out / "maps")


def calibration_context(ls: LoadedScorer, scorer_kwargs: dict[str, Any] | None,
                        method: str, fpr: float) -> dict[str, Any]:
    """What a saved threshold depends on: the run's step, the scorer options and the rule, and
    for a run not trained with ``data.resize=resize`` how patches are read (a threshold saved
    before scoring honoured that mode was calibrated on other images: refused)."""
    assert ls.run is not None
    rule: dict[str, Any] = {"method": method, **({"fpr": fpr} if method == "fpr" else {})}
    mode = {} if ls.resize == "resize" else {"resize": ls.resize}
    return {"run_step": int(ls.run.step), "scorer_kwargs": dict(scorer_kwargs or {}),
            "rule": rule, **mode}


def _check_context(before: dict[str, Any] | None, now: dict[str, Any], th_file: Path) -> None:
    """Refuse a saved threshold calibrated for another run step, scorer options or rule
    (``before``: its saved context; ``None``, saved by an older gen_ad: a warning)."""
    if before is None:
        warnings.warn(f"{th_file} has no record of what it was calibrated for (saved by an older "
                      "gen_ad): reusing it unchecked; pass --normal DIR to calibrate again",
                      stacklevel=4)
        return
    diff = [k for k in now if before.get(k) != now[k]]
    if diff:
        shown = "; ".join(f"{k}: saved {before.get(k)!r}, now {now[k]!r}" for k in diff)
        raise DataError(f"the threshold saved with the run ({th_file}) was calibrated for other "
                        f"settings ({shown}); pass --normal DIR to calibrate for these, or score "
                        "with the saved settings")


def _legacy_files(th_file: Path) -> tuple[Path, Path]:
    """The calibration and context files an older gen_ad saved beside ``th_file``."""
    stem = th_file.name.removesuffix(".json")
    return th_file.with_name(f"{stem}.calibration.json"), th_file.with_name(f"{stem}.context.json")


def _save_set(run: Path, th_file: Path, th: Threshold, calibration: dict[str, Any],
              context: dict[str, Any]) -> None:
    """Publish threshold, calibration and context as one file in one atomic write (a kill
    leaves the previous set or this one), then drop an older gen_ad's separate files."""
    with folder_lock(run, "run folder"):  # a training of this run may be writing it
        ThresholdSet(th, calibration, context).save(th_file)
        for old in _legacy_files(th_file):
            old.unlink(missing_ok=True)


def _reuse_legacy(ls: LoadedScorer, th_file: Path, context: dict[str, Any]) -> Threshold | None:
    """Reuse a set saved by an older gen_ad as separate files (threshold, calibration, context),
    as that gen_ad did; they are trusted to belong together, so a warning asks for a refresh."""
    cal_file, ctx_file = _legacy_files(th_file)
    if not th_file.is_file() and not cal_file.is_file():
        return None
    before = json.loads(ctx_file.read_text(encoding="utf-8")) if ctx_file.is_file() else None
    _check_context(before, context, th_file)
    if before is not None:
        warnings.warn(f"{th_file} was saved by an older gen_ad as separate files (threshold, "
                      f"{cal_file.name}, {ctx_file.name}) that an interrupted save could have "
                      "mismatched; pass --normal DIR once to store them as one", stacklevel=3)
    if cal_file.is_file():
        ls.scorer.load_calibration(json.loads(cal_file.read_text(encoding="utf-8")))
    return Threshold.load(th_file) if th_file.is_file() else None


def _threshold(ls: LoadedScorer, name: str, run: Path, normal: str | os.PathLike[str] | None,
               normal_classes: Sequence[str], context: dict[str, Any],
               pixels: NormalPixels | None = None, **cal: Any) -> Threshold | None:
    """Fit + calibrate on ``normal`` and save the threshold with the run, in one file with what
    fit learned and ``context`` (the run step, scorer options and rule it is for); or reuse the
    set the run saved, for the same context only. ``pixels`` gets the normal images' maps (its
    pixel threshold is saved in the context as ``pixel_threshold``, and reused from there)."""
    th_file = run / "thresholds" / f"{name}.json"
    if normal is not None:
        nds = normal_dataset(normal, ls.size, normal_classes=normal_classes, resize=ls.resize)
        th = calibrate_scorer(ls.scorer, nds, pixels=pixels, **cal)
        found = pixels.result() if pixels is not None else {}
        keep = {"pixel_threshold": found} if found else {}
        _save_set(run, th_file, th, ls.scorer.calibration(),
                  {**context, "normal": str(normal), "limit": cal.get("limit"), **keep})
        return th
    saved = ThresholdSet.load(th_file) if th_file.is_file() else None
    if saved is None:
        _saved_pixels(pixels, None, th_file)
        return _reuse_legacy(ls, th_file, context)
    _check_context(saved.context, context, th_file)
    ls.scorer.load_calibration(saved.calibration)
    _saved_pixels(pixels, saved.context.get("pixel_threshold"), th_file)
    return saved.threshold


def _saved_pixels(pixels: NormalPixels | None, record: Any, th_file: Path) -> None:
    """Reuse the pixel threshold saved with the run for the same FPR, or say why there is
    none (no normal images are scored when the saved image threshold is reused)."""
    if pixels is None:
        return
    if isinstance(record, dict) and record.get("status") == "ok" \
            and record.get("fpr") == pixels.fpr:
        pixels.use_saved({**record, "saved_with": str(th_file)})
        return
    pixels.unavailable(f"no normal images were scored and the run saved no pixel threshold at "
                       f"FPR {pixels.fpr:g} ({th_file}); pass --normal DIR")


@writes_folder("out", "score output folder")
def score_run(run: str | Path, data: str | Path, out: str | Path, *, method: str | None = None,
              normal: str | Path | None = None, normal_classes: Sequence[str] = ("normal",),
              masks: str | Path | None = None, threshold_method: str = "iqr", fpr: float = 0.05,
              batch_size: int = 32, device: str = "auto", n_examples: int = 8,
              calibration_limit: int | None = 512, n_boot: int = 2000,
              scorer_kwargs: dict[str, Any] | None = None,
              limit: int | None = None,
              pixel_fpr: float = DEFAULT_PIXEL_FPR) -> dict[str, dict[str, Any]]:
    """Score a folder with each scorer of a trained run (``gen-ad score``).

    Args:
        run: run folder (``checkpoints/<run>``).
        data: patch folder to score (class subfolders; ``normal_classes`` are label 0).
        out: output folder; each method writes into ``out/<method>/``.
        method: one scorer name, or ``None`` for all the run offers.
        normal: folder of normal validation patches to fit/calibrate on; default: the run's
            ``data.val``. The label-free threshold is saved in ``<run>/thresholds/<method>.json``,
            one file also holding what fit learned and its context (the run step, scorer options
            and rule it is for), and reused when no normal folder is given, for the same context
            only.
        masks: folder of ground-truth masks (pixel metrics); default ``data/masks`` if present.
        limit: score only this many images of ``data``, a seeded random choice
            (:func:`~gen_ad.app.evaluate.limited`, seed 0), recorded in ``metrics.json``.
        pixel_fpr: pixel false-positive rate of the label-free map threshold, set on the normal
            images' maps (:mod:`gen_ad.metrics.pixel_threshold`; ``metrics.json``
            ``pixel_threshold``, and with masks ``pixel.at_pixel_threshold``).
    Returns:
        Metrics by method name.
    """
    device = resolve_device(device)
    loaded = run_scorers(run, method, device=device, scorer_kwargs=scorer_kwargs)
    first = next(iter(loaded.values()))
    assert first.run is not None
    full = scoring_dataset(data, first.size, normal_classes=normal_classes, masks=masks,
                           resize=first.resize)
    ds, extra = limited(full, limit)
    results = {}
    for name, ls in loaded.items():
        context = calibration_context(ls, scorer_kwargs, threshold_method, fpr)
        use = normal if normal is not None else default_normal(
            first.run.cfg.data, Path(run) / "thresholds" / f"{name}.json", context,
            calibration_limit, pixel_fpr)
        pixels = NormalPixels(pixel_fpr, source=f"normal images of {use}")
        th = _threshold(ls, name, Path(run), use, normal_classes, context, pixels,
                        batch_size=batch_size, device=device, method=threshold_method, fpr=fpr,
                        limit=calibration_limit)
        scored = score_dataset(ls.scorer, ds, batch_size=batch_size, device=device,
                               spill_dir=out)  # a large set's maps: a temporary file there
        clear_outputs(Path(out) / name)
        settings = {"run": str(run), **context, "normal": None if use is None else str(use)}
        results[name] = write_outputs(Path(out) / name, scored, ds, method=name, threshold=th,
                                      n_examples=n_examples, n_boot=n_boot,
                                      extra={**extra, "settings": settings},
                                      pixel_threshold=pixels.result())
        scored.drop_maps()
    return results


def default_normal(data_cfg: Any, th_file: Path, context: dict[str, Any], limit: int | None,
                   pixel_fpr: float) -> str | None:
    """Where a method calibrates when no ``--normal`` is given: ``None`` (reuse the threshold
    saved with the run) when the run saved one for the same settings on its ``data.val`` with
    the same limit and pixel FPR, or when ``data.val`` is not found from here but a set saved
    for the same settings is (a line says which); else the run's ``data.val``.

    Raises:
        DataError: ``data.val`` is not found and nothing for these settings is saved.
    """
    val = getattr(data_cfg, "val", None)
    saved = ThresholdSet.load(th_file) if th_file.is_file() else None
    same = saved is not None and all(saved.context.get(k) == v for k, v in context.items())
    if not val:
        return None
    if same and saved is not None and not Path(val).expanduser().exists():
        print(f"score: the run's data.val ({val}) is not found from {Path.cwd()}: reusing the "
              f"threshold saved with the run ({th_file}, calibrated on "
              f"{saved.context.get('normal')}); pass --normal DIR to calibrate again",
              file=sys.stderr, flush=True)
        return None
    pixel = saved.context.get("pixel_threshold") if saved is not None else None
    if same and saved is not None and saved.context.get("normal") == str(val) \
            and saved.context.get("limit") == limit and isinstance(pixel, dict) \
            and (pixel.get("status") != "ok" or pixel.get("fpr") == pixel_fpr):
        print(f"score: reusing the threshold saved with the run ({th_file}: calibrated on its "
              f"data.val with the same settings); pass --normal DIR to calibrate again",
              file=sys.stderr, flush=True)
        return None
    return run_val_folder(data_cfg)


def run_val_folder(data_cfg: Any) -> str | None:
    """The run's ``data.val`` (the default calibration folder), checked to exist from the
    current directory, where a relative path in the run's config is resolved.

    Raises:
        DataError: ``data.val`` is set but not found; the message names ``--normal DIR``.
    """
    val = getattr(data_cfg, "val", None)
    if not val:
        return None
    if not Path(val).expanduser().exists():
        raise DataError(f"the run's data.val ({val}), the default folder of normal patches to "
                        f"calibrate on, is not found from the current directory ({Path.cwd()}); "
                        "pass --normal DIR (normal validation patches)")
    return str(val)
