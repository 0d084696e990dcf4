"""Run any :class:`~gen_ad.scoring.base.AnomalyScorer` over a dataset and write its outputs.

The same code serves every method (f-AnoGAN, StyleGAN2 projection, AnoDDPM, AutoDDPM, KNN):
``calibrate`` fits a scorer on normal images and saves a label-free threshold, ``score_dataset``
scores every image in batches, and ``write_outputs`` writes ``scores.csv``, map PNGs of the most
and least anomalous images, and ``metrics.json`` (AUROC/AUPR with CIs) when labels exist.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from gen_ad.errors import DataError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.thresholds import Threshold, calibrate
from gen_ad.utils.io import write_json, write_text


@dataclass
class ScoredSet:
    """Scores of a whole dataset, in dataset order.

    Attributes:
        paths / classes: per-image file path and class name.
        labels: ``[N]`` 0 normal / 1 anomalous.
        scores: ``[N]`` float, higher = more anomalous.
        terms: named ``[N]`` score components.
        maps: ``[N,H,W]`` maps when the method has them and they were kept, else ``None``.
        masks: ``[N,H,W]`` ground-truth masks when the dataset has them, else ``None``.
        seconds: wall time of scoring (for latency per patch).
    """

    paths: list[str]
    classes: list[str]
    labels: np.ndarray
    scores: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    maps: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(len(self.paths), 1)


def image_batches(dataset: Dataset, batch_size: int = 32, limit: int | None = None,
                  num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Yield ``[B,3,H,W]`` image tensors in ``[-1,1]`` from a dataset of item dicts."""
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, list(range(limit)))
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        yield batch["image"]


def score_dataset(scorer: AnomalyScorer, dataset: Dataset, *, batch_size: int = 32,
                  device: str | torch.device = "cpu", keep_maps: bool = True,
                  num_workers: int = 0, progress: bool = True) -> ScoredSet:
    """Score every image of ``dataset`` (items as produced by :mod:`gen_ad.data`)."""
    import time

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("nothing to score: the dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    paths: list[str] = []
    classes: list[str] = []
    labels: list[int] = []
    parts: list[ScoreBatch] = []
    masks: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"score {scorer.name}", disable=not progress, leave=False):
        out = scorer.score(batch["image"].to(device)).cpu()
        if not keep_maps:
            out = ScoreBatch(out.scores, None, None, out.terms)
        parts.append(ScoreBatch(out.scores, out.maps, None, out.terms))
        paths += list(batch["path"])
        classes += list(batch.get("cls", ["?"] * len(batch["path"])))
        labels += [int(v) for v in batch["label"]]
        if "mask" in batch:
            masks.append(batch["mask"])
    seconds = time.perf_counter() - t0
    allb = ScoreBatch.cat(parts)
    return ScoredSet(paths, classes, np.asarray(labels, dtype=np.int64), allb.scores.numpy(),
                     {k: v.numpy() for k, v in allb.terms.items()}, allb.maps,
                     torch.cat(masks) if masks else None, seconds)


def calibrate_scorer(scorer: AnomalyScorer, normal: Dataset, *, batch_size: int = 32,
                     device: str | torch.device = "cpu", method: str = "iqr", fpr: float = 0.05,
                     limit: int | None = None) -> Threshold:
    """Fit ``scorer`` on normal images, then calibrate a label-free threshold on their scores.

    The scores used for the threshold come from the same normal images after fitting; methods
    that fit a bank on them (KNN) exclude each point from its own neighbours.
    """
    scorer.fit(b.to(device) for b in image_batches(normal, batch_size, limit))
    if limit is not None and limit < len(normal):  # type: ignore[arg-type]
        normal = Subset(normal, list(range(limit)))
    scored = score_dataset(scorer, normal, batch_size=batch_size, device=device, keep_maps=False)
    return calibrate(scored.scores, method=method, fpr=fpr)


def scores_csv(scored: ScoredSet, threshold: Threshold | None = None) -> str:
    """``scores.csv`` text: ``path,label,class,score[,<terms>][,flagged]``."""
    buf = io.StringIO()
    w = csv.writer(buf)
    terms = sorted(scored.terms)
    w.writerow(["path", "label", "class", "score", *terms] + (["flagged"] if threshold else []))
    flags = threshold.apply(scored.scores) if threshold else None
    for i, p in enumerate(scored.paths):
        row = [p, int(scored.labels[i]), scored.classes[i], f"{scored.scores[i]:.8g}"]
        row += [f"{scored.terms[t][i]:.8g}" for t in terms]
        if flags is not None:
            row.append(int(flags[i]))
        w.writerow(row)
    return buf.getvalue()


def write_examples(out_dir: Path, scored: ScoredSet, dataset: Dataset, n: int = 8) -> list[Path]:
    """Write map PNGs (overlay + raw, and reconstruction when present) of the ``n`` highest- and
    ``n`` lowest-scoring images into ``out_dir/maps/``."""
    from gen_ad.scoring.maps import save_map_png

    if scored.maps is None or n <= 0:
        return []
    order = np.argsort(-scored.scores, kind="stable")
    picks = [("top", r, int(i)) for r, i in enumerate(order[:n])]
    picks += [("bottom", r, int(i)) for r, i in enumerate(order[::-1][:n])]
    vmax = float(torch.quantile(scored.maps.flatten()[:1_000_000].float(), 0.99))
    written = []
    for tag, rank, i in picks:
        stem = Path(scored.paths[i]).stem
        base = out_dir / "maps" / f"{tag}-{rank + 1:02d}_{stem}"
        image = dataset[i]["image"]
        save_map_png(f"{base}_overlay.png", scored.maps[i], image, vmin=0.0, vmax=vmax)
        save_map_png(f"{base}_raw.png", scored.maps[i], vmin=0.0, vmax=vmax)
        written.append(Path(f"{base}_overlay.png"))
    return written


def write_outputs(out_dir: str | Path, scored: ScoredSet, dataset: Dataset, *,
                  method: str, threshold: Threshold | None = None, n_examples: int = 8,
                  n_boot: int = 2000) -> dict[str, Any]:
    """Write ``scores.csv``, example maps and ``metrics.json``; returns the metrics dict."""
    from gen_ad.metrics.detection import evaluate_scores

    out = Path(out_dir)
    write_text(out / "scores.csv", scores_csv(scored, threshold))
    write_examples(out, scored, dataset, n_examples)
    metrics: dict[str, Any] = {"method": method, "n": len(scored.paths),
                               "ms_per_image": scored.ms_per_image}
    if threshold is not None:
        metrics["threshold"] = threshold.to_dict()
    if len(set(scored.labels.tolist())) == 2:
        anomalous = [c for c, y in zip(scored.classes, scored.labels) if y == 1]
        classes = scored.classes if len(set(anomalous)) > 1 else None
        pixel = scored.maps is not None and scored.masks is not None
        metrics.update(evaluate_scores(
            scored.scores, scored.labels, classes=classes, threshold=threshold,
            maps=scored.maps if pixel else None, masks=scored.masks if pixel else None,
            n_boot=n_boot))
    write_json(out / "metrics.json", metrics)
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line: method, n, AUROC/AUPR with CIs when present."""
    parts = [f"{metrics['method']}: {metrics['n']} images, {metrics['ms_per_image']:.1f} ms/image"]
    for key in ("auroc", "aupr"):
        m = metrics.get(key)
        if isinstance(m, dict) and m.get("value") is not None:
            ci = (f" [{m['low']:.3f}, {m['high']:.3f}]"
                  if m.get("low") is not None and m.get("high") is not None else "")
            parts.append(f"{key.upper()} {m['value']:.3f}{ci}")
    return ", ".join(parts)


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
