"""``gen-ad score RUN --data DIR --out DIR``: score a patch folder with a trained run's scorers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gen_ad.app.evaluate import calibrate_scorer, score_dataset, select_scorer, write_outputs
from gen_ad.data.folders import PatchFolder, find_mask_root
from gen_ad.scoring.thresholds import Threshold
from gen_ad.training.export import load_run
from gen_ad.utils.io import write_json
from gen_ad.utils.lock import writes_folder


@writes_folder("out", "score output folder")
def score_run(run: str | Path, data: str | Path, out: str | Path, *, method: str | None = None,
              normal: str | Path | None = None, normal_classes: Sequence[str] = ("normal",),
              masks: str | Path | None = None, threshold_method: str = "iqr", fpr: float = 0.05,
              batch_size: int = 32, device: str = "cpu", n_examples: int = 8,
              calibration_limit: int | None = 512, n_boot: int = 2000,
              scorer_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Score a folder with each scorer of a trained run (``gen-ad score``).

    Args:
        run: run folder (``checkpoints/<run>``).
        data: patch folder to score (class subfolders; ``normal_classes`` are label 0).
        out: output folder; each method writes into ``out/<method>/``.
        method: one scorer name, or ``None`` for all the run offers.
        normal: folder of normal validation patches to fit/calibrate on; default: the run's
            ``data.val``. The label-free threshold is saved in ``<run>/thresholds/<method>.json``
            and reused when no normal folder is given.
        masks: folder of ground-truth masks (pixel metrics); default ``data/masks`` if present.
    Returns:
        Metrics by method name.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    r = load_run(run, device=device)
    scorers = r.scorers(**(scorer_kwargs or {}))
    names = select_scorer(scorers, method)
    size = int(r.cfg.data.size)
    masks = masks or find_mask_root(data)
    ds = PatchFolder(root=str(data), size=size, normal_classes=tuple(normal_classes),
                     mask_root=str(masks) if masks else None)
    normal = normal or getattr(r.cfg.data, "val", None)
    results = {}
    for name in names:
        scorer = scorers[name]
        th_file = Path(run) / "thresholds" / f"{name}.json"
        cal_file = Path(run) / "thresholds" / f"{name}.calibration.json"
        if normal is not None:
            sub = [c for c in normal_classes if (Path(normal) / c).is_dir()]
            nds = PatchFolder(root=str(normal), size=size, normal_classes=tuple(normal_classes),
                              classes=sub or None)
            th = calibrate_scorer(scorer, nds, batch_size=batch_size, device=device,
                                  method=threshold_method, fpr=fpr, limit=calibration_limit)
            th.save(th_file)
            write_json(cal_file, scorer.calibration())
        else:
            th = Threshold.load(th_file) if th_file.is_file() else None
            if cal_file.is_file():
                scorer.load_calibration(json.loads(cal_file.read_text()))
        scored = score_dataset(scorer, ds, batch_size=batch_size, device=device)
        results[name] = write_outputs(Path(out) / name, scored, ds, method=name, threshold=th,
                                      n_examples=n_examples, n_boot=n_boot)
    return results
