"""Figures people would rather look at than read: ROC/PR curves, score histograms, group box plots
and image grids (input / reconstruction / map overlay).

Every function draws on a fresh ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state),
writes a PNG atomically and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from gen_ad.errors import DataError
from gen_ad.scoring.maps import normalize, overlay, to_uint8_images
from gen_ad.utils.io import atomic_path

Curves = Mapping[str, tuple[Any, Any]]


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _new_figure(w: float = 5.0, h: float = 4.5) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return p


def _curve_inputs(results: Curves) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if not results:
        raise DataError("no methods to plot")
    out = []
    for name, (scores, labels) in results.items():
        s, y = _np(scores).reshape(-1), _np(labels).reshape(-1).astype(int)
        if s.shape != y.shape or len(set(y.tolist())) != 2:
            raise DataError(f"method '{name}': need equal-length scores and 0/1 labels with both "
                            "classes")
        out.append((name, s, y))
    return out


def roc_figure(results: Curves, path: str | os.PathLike[str], title: str = "ROC") -> Path:
    """ROC curves of several methods in one figure (legend shows AUROC).

    Args:
        results: ``{method: (scores [N], labels [N])}``.
        path: output PNG.
        title: figure title.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, s, y in _curve_inputs(results):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_figure(results: Curves, path: str | os.PathLike[str],
              title: str = "Precision-recall") -> Path:
    """Precision-recall curves of several methods in one figure (legend shows AUPR = AP)."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    base = None
    for name, s, y in _curve_inputs(results):
        prec, rec, _ = precision_recall_curve(y, s)
        ax.step(rec, prec, where="post", lw=1.5,
                label=f"{name} (AUPR {average_precision_score(y, s):.3f})")
        base = float(y.mean())
    ax.axhline(base, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def score_histogram(scores: Any, labels: Any, path: str | os.PathLike[str],
                    threshold: float | None = None, bins: int = 50,
                    title: str = "Scores") -> Path:
    """Overlaid histograms of normal and anomalous scores, with an optional threshold line.

    Args:
        scores: ``[N]`` scores.
        labels: ``[N]`` 0/1 (a single class is allowed, e.g. normal validation scores).
        path: output PNG.
        threshold: vertical line at this value.
        bins: number of shared bins.
    """
    s, y = _np(scores).reshape(-1), _np(labels).reshape(-1).astype(bool)
    if s.size == 0 or s.shape != y.shape:
        raise DataError("need equal-length, non-empty scores and labels")
    edges = np.histogram_bin_edges(s, bins=bins)
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for mask, name, colour in ((~y, "normal", "tab:blue"), (y, "anomalous", "tab:red")):
        if mask.any():
            ax.hist(s[mask], bins=edges, alpha=0.55, color=colour, density=True,
                    label=f"{name} (n={int(mask.sum())})")
    if threshold is not None:
        ax.axvline(float(threshold), c="k", ls="--", lw=1.0, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="score", ylabel="density", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def box_plot(groups: Mapping[str, Sequence[float]], path: str | os.PathLike[str],
             ylabel: str = "value", title: str = "") -> Path:
    """Box plot per group with the individual points (e.g. per-slide % anomalous patches).

    Args:
        groups: ``{group name: values}``.
        path: output PNG.
    """
    if not groups or any(len(v) == 0 for v in groups.values()):
        raise DataError("box plot needs at least one non-empty group")
    names = list(groups)
    data = [_np(groups[n]).reshape(-1) for n in names]
    fig = _new_figure(max(3.0, 1.4 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), labels=names)
    rng = np.random.default_rng(0)  # fixed jitter: the same data give the same picture
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=14, alpha=0.7, zorder=3)
    ax.set(ylabel=ylabel, title=title)
    return _save(fig, path)


def image_grid(images: Any, path: str | os.PathLike[str], recon: Any = None, maps: Any = None,
               alpha: float = 0.5, vmax: float | None = None,
               col_titles: Sequence[str] | None = None) -> Path:
    """Grid with one column per image and rows input / reconstruction / map overlay.

    Args:
        images: ``[B,3,H,W]`` in ``[-1,1]``.
        path: output PNG.
        recon: optional ``[B,3,H,W]`` reconstructions.
        maps: optional ``[B,H,W]`` maps; overlaid in jet on the input, all with one colour range
            ``[0, vmax]`` (default: the largest map value) so columns are comparable.
        col_titles: optional ``B`` titles (e.g. scores).
    """
    rows = [("input", to_uint8_images(images))]
    b = rows[0][1].shape[0]
    if recon is not None:
        rows.append(("reconstruction", to_uint8_images(recon)))
    if maps is not None:
        m = _np(maps, np.float32)
        if m.shape != rows[0][1].shape[:3]:
            raise DataError(f"maps must be [B,H,W] matching the images, got {m.shape}")
        hi = float(m.max()) if vmax is None else vmax
        rows.append(("anomaly map", overlay(rows[0][1], normalize(m, 0.0, hi), alpha)))
    if any(r[1].shape[0] != b for r in rows):
        raise DataError("images, reconstructions and maps must have the same batch size")
    fig = _new_figure(1.6 * b + 0.6, 1.6 * len(rows))
    axes = fig.subplots(len(rows), b, squeeze=False)
    for i, (name, arr) in enumerate(rows):
        for j in range(b):
            ax = axes[i][j]
            ax.imshow(arr[j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if i == 0 and col_titles is not None:
                ax.set_title(str(col_titles[j]), fontsize=7)
    return _save(fig, path)
