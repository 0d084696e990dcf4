"""Synthetic H&E-like fields of view with known nucleus positions and planted anomalous cells.

A field is one image (a small "slide") at a nominal 1 um/px, rendered with the building blocks of
:mod:`gen_ad.data.synthetic` (Beer-Lambert stain model, fibrous stroma, soft elliptical nuclei,
per-field stain jitter): pink stroma with pale gaps (so a tissue mask matters) and nuclei on a
jittered grid (spacing ``spacing`` px, so every nucleus is a separate object). Each nucleus is
anomalous with probability ``anomaly_rate``: enlarged, hyperchromatic, pleomorphic, with a
nucleolus. The centres and the anomalous flags are returned exactly, so a detector's recall and
precision, and a study's per-slide percentage of anomalous cells, can be checked.

Randomness comes from the counter-based generator of :mod:`gen_ad.data.synthetic`: field ``i``
depends only on ``(seed, i, size, spacing)``, and the anomalous flags come from their own stream,
so the same field with ``anomaly_rate=0`` has the same nuclei, all normal.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gen_ad.data.synthetic import (
    _STAINS,
    _draw_nuclei,
    _fibres,
    _fine,
    _keys,
    _noise,
    _one_thread,
    _smoothstep,
    _stain_params,
    _stamp,
    _Stream,
    _Tissue,
    _to_rgb,
)
from gen_ad.errors import ConfigError
from gen_ad.utils.io import atomic_path, write_text

FIELD_MPP = 1.0  # nominal microns per pixel of a rendered field
_STREAM_FIELD, _STREAM_FLAGS = 101, 102
_BORDER = 6.0  # no nucleus centre closer than this to the field edge (px)
# mean stain vectors of the patch generator (unit rows scaled by its mean strengths), [1,2,3]
_BASE_STAINS = torch.from_numpy(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
                                ).float()[None] * torch.tensor([[1.1], [0.95]])


@dataclass(frozen=True)
class Field:
    """One rendered field.

    Attributes:
        image: uint8 ``[S,S,3]`` RGB.
        x, y: float64 ``[N]`` nucleus centres in pixels (pixel ``i`` spans ``[i, i+1)``).
        anomalous: bool ``[N]``, planted anomalous cells.
        mpp: nominal microns per pixel.
    """

    image: np.ndarray
    x: np.ndarray
    y: np.ndarray
    anomalous: np.ndarray
    mpp: float = FIELD_MPP


def _centres(st: _Stream, size: int, spacing: float, presence: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered-grid centres (jitter 0.2 * spacing) on tissue, 75% of the sites kept. ``[M]``."""
    g = math.ceil(size / spacing)
    base = (torch.arange(g, dtype=torch.float32) + 0.5) * spacing
    by, bx = torch.meshgrid(base, base, indexing="ij")
    u = st.uniform(3, g * g)[0]
    cx = bx.reshape(-1) + (u[0] * 2 - 1) * 0.2 * spacing
    cy = by.reshape(-1) + (u[1] * 2 - 1) * 0.2 * spacing
    inside = (cx >= _BORDER) & (cx < size - _BORDER) & (cy >= _BORDER) & (cy < size - _BORDER)
    ix, iy = cx.long().clamp(0, size - 1), cy.long().clamp(0, size - 1)
    on_tissue = presence[0, iy, ix] > 0.9
    keep = inside & on_tissue & (u[2] < 0.75)
    return cx[keep], cy[keep]


def render_field(index: int, size: int = 384, seed: int = 0, anomaly_rate: float = 0.0,
                 spacing: float = 16.0, stain_jitter: float = 0.1) -> Field:
    """Render field ``index`` of the sequence ``(seed, size, spacing)``.

    Args:
        index: field number (>= 0).
        size: side in pixels (>= 64).
        seed: non-negative integer.
        anomaly_rate: probability that a nucleus is anomalous, in ``[0, 1]``.
        spacing: nucleus grid spacing in pixels (>= 12, so nuclei do not overlap).
        stain_jitter: share of the patch generator's per-image stain variation kept (0: every
            field stained alike; 1: as much variation as :mod:`gen_ad.data.synthetic` patches).
    """
    if int(size) != size or size < 64 or spacing < 12 or index < 0 or seed < 0:
        raise ConfigError(f"field: need size >= 64, spacing >= 12, index and seed >= 0 (got "
                          f"size {size}, spacing {spacing}, index {index}, seed {seed})")
    if not 0.0 <= anomaly_rate <= 1.0:
        raise ConfigError(f"field: anomaly_rate must be in [0, 1], got {anomaly_rate}")
    with _one_thread():
        st = _Stream(_keys(seed, np.array([index]), size, _STREAM_FIELD))
        gaps = _noise(st, size, 48.0)
        presence = 1.0 - _smoothstep((gaps - 1.4) / 0.25)
        cx, cy = _centres(st, size, spacing, presence)
        flags = _Stream(_keys(seed, np.array([index]), size, _STREAM_FLAGS))
        bad = flags.uniform(max(1, cx.numel()))[0, :cx.numel()] < anomaly_rate
        fib, _ = _fibres(st, size)
        grain = _fine(st, size)
        ridge = (1.0 - fib.abs() / 0.7).clamp(min=0.0)
        e = presence * st.uniform(lo=0.6, hi=0.7)[:, :, None] * (0.6 + 0.6 * ridge + 0.1 * fib)
        h = presence * st.uniform(lo=0.03, hi=0.05)[:, :, None].expand_as(e)
        h = h + _nuclei(st, size, cx[None], cy[None], bad[None], grain)
        params = _stain_params(st, size)
        base = _BASE_STAINS
        params["stains"] = base + stain_jitter * (params["stains"] - base)
        tissue = _Tissue(h=h, e=e, **params)
        image = _to_rgb(h, e, tissue)[0].numpy()
    return Field(image, cx.double().numpy(), cy.double().numpy(), bad.numpy().astype(bool))


def _nuclei(st: _Stream, size: int, cx: torch.Tensor, cy: torch.Tensor, bad: torch.Tensor,
            grain: torch.Tensor) -> torch.Tensor:
    """Hematoxylin of normal (round-oval, 6-7.6 um wide) and anomalous (enlarged, dark,
    pleomorphic, nucleolated) nuclei at the given centres ``[1,M]``. ``[1,S,S]``."""
    if cx.numel() == 0:
        return torch.zeros(1, size, size)
    normal = _draw_nuclei(st, cx, cy, (~bad).float(), (3.0, 3.8), (0.7, 0.95), (1.0, 1.3),
                          rim=0.3)
    odd = _draw_nuclei(st, cx, cy, bad.float(), (5.0, 6.0), (0.65, 0.95), (1.35, 1.65),
                       pleo=0.18, rim=0.4, nucleolus=0.8)
    return _stamp(normal, size, 11) * (1 + 0.2 * grain) + _stamp(odd, size, 19) * (1 + 0.3 * grain)


# ----------------------------------------------------------------------------- files


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_study(out: str | Path, groups: Mapping[str, tuple[int, float]], size: int = 384,
                seed: int = 0, spacing: float = 16.0, first_index: int = 0) -> dict[str, Path]:
    """Write a synthetic study: one field per slide, grouped, with the truth.

    Args:
        out: output folder.
        groups: ``{group: (number of slides, anomaly rate)}``; slides are named
            ``<group>-<NN>`` and use consecutive field indices from ``first_index``.
        size / seed / spacing: see :func:`render_field`.
    Returns:
        ``{"slides": out/slides, "truth": out/truth.csv (slide,x,y,anomalous),
        "groups": out/groups.csv (slide,group)}``; slide images are ``out/slides/<slide>.png``.
    """
    root = Path(out).expanduser()
    truth, table = io.StringIO(), io.StringIO()
    tw, gw = csv.writer(truth, lineterminator="\n"), csv.writer(table, lineterminator="\n")
    tw.writerow(["slide", "x", "y", "anomalous"])
    gw.writerow(["slide", "group"])
    index = first_index
    for group, (n, rate) in groups.items():
        for j in range(n):
            name = f"{group}-{j + 1:02d}"
            f = render_field(index, size, seed, rate, spacing)
            index += 1
            _save_png(root / "slides" / f"{name}.png", f.image)
            gw.writerow([name, group])
            for x, y, a in zip(f.x, f.y, f.anomalous):
                tw.writerow([name, f"{x:.3f}", f"{y:.3f}", int(a)])
    write_text(root / "truth.csv", truth.getvalue())
    write_text(root / "groups.csv", table.getvalue())
    return {"slides": root / "slides", "truth": root / "truth.csv", "groups": root / "groups.csv"}


def match_points(found: np.ndarray, truth: np.ndarray, tolerance: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of found points ``[F,2]`` to true points ``[T,2]``.

    Pairs are taken closest first, each point used once, only within ``tolerance``.
    Returns:
        ``(matched found bool [F], index of the matched true point or -1 [F])``.
    """
    from scipy.spatial import cKDTree

    hit = np.full(len(found), -1, np.int64)
    if len(found) == 0 or len(truth) == 0:
        return hit >= 0, hit
    d, j = cKDTree(truth).query(found, k=min(4, len(truth)), distance_upper_bound=tolerance)
    d, j = d.reshape(len(found), -1), j.reshape(len(found), -1)
    pairs = [(d[i, c], i, j[i, c]) for i in range(len(found)) for c in range(d.shape[1])
             if np.isfinite(d[i, c])]
    used: set[int] = set()
    for _, i, t in sorted(pairs):
        if hit[i] < 0 and t not in used:
            hit[i] = t
            used.add(int(t))
    return hit >= 0, hit


def detection_scores(found: np.ndarray, truth: np.ndarray, tolerance: float) -> dict[str, float]:
    """Recall, precision and F1 of found points ``[F,2]`` against true points ``[T,2]``."""
    ok, _ = match_points(found, truth, tolerance)
    tp = int(ok.sum())
    recall = tp / len(truth) if len(truth) else 1.0
    precision = tp / len(found) if len(found) else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "tp": float(tp),
            "found": float(len(found)), "true": float(len(truth))}
