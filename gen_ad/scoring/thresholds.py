"""Label-free decision thresholds calibrated on normal scores only.

Two rules, both computed from the scores of *normal* validation images (no anomaly labels):

* ``iqr``: ``Q3 + 1.5 * IQR`` (Tukey's upper fence; numpy's default linear percentiles).
* ``fpr``: the ``1 - fpr`` quantile, so that a fraction ``fpr`` of normal scores lies above it.

A :class:`Threshold` records the value, the rule and its parameters, and is saved with the run as
JSON (atomically) so the same cut is reused at test time; a :class:`ThresholdSet` adds what the
scorer's fit learned and what the threshold was calibrated for, in the same one file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_ad.errors import ConfigError, DataError
from gen_ad.utils.io import write_json

METHODS = ("iqr", "fpr")
SET_FORMAT = 2  # ThresholdSet files; plain Threshold files have no "format" key


def _as_array(scores: Any) -> np.ndarray:
    """Flatten scores (list, numpy, tensor) to a finite 1-D float64 array; error if empty/NaN."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise DataError("cannot calibrate a threshold on an empty set of scores")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{int((~np.isfinite(arr)).sum())} of {arr.size} scores are NaN or "
                        "infinite; cannot calibrate a threshold")
    return arr


def iqr_threshold(scores: Any) -> float:
    """Tukey's upper fence ``Q3 + 1.5 * (Q3 - Q1)`` of normal scores.

    Args:
        scores: ``[N]`` normal scores (list, numpy array or tensor).
    Returns:
        The threshold; scores strictly above it are called anomalous.
    """
    arr = _as_array(scores)
    q1, q3 = np.percentile(arr, [25.0, 75.0])
    return float(q3 + 1.5 * (q3 - q1))


def fpr_threshold(scores: Any, fpr: float) -> float:
    """The ``1 - fpr`` quantile of normal scores (about a fraction ``fpr`` of them lies above it;
    interpolated, so with few scores the fraction above can exceed ``fpr``: with 10 scores and
    ``fpr = 0.05``, one of them).

    Args:
        scores: ``[N]`` normal scores.
        fpr: target false-positive rate in ``(0, 1)``.
    Returns:
        The threshold (numpy's linear-interpolated quantile).
    """
    if not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"fpr must be in (0, 1), got {fpr}")
    arr = _as_array(scores)
    return float(np.quantile(arr, 1.0 - float(fpr)))


@dataclass
class Threshold:
    """A saved label-free threshold.

    Attributes:
        value: the cut; a score ``> value`` is anomalous.
        method: ``"iqr"`` or ``"fpr"``.
        params: rule parameters (e.g. ``{"fpr": 0.05}``).
        n: number of normal scores it was calibrated on.
    """

    value: float
    method: str = "iqr"
    params: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def apply(self, scores: Any) -> np.ndarray:
        """Boolean ``[N]`` array: ``scores > value``."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().numpy()
        return np.asarray(scores, dtype=np.float64) > self.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the threshold as JSON."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Threshold:
        """Read a threshold written by :meth:`save` (or the threshold of a
        :class:`ThresholdSet` file).

        Raises:
            DataError: the file is missing, not JSON, or lacks a finite ``value``.
        """
        p = Path(path)
        return cls.from_record(_read_record(p), p)

    @classmethod
    def from_record(cls, d: dict[str, Any], where: str | os.PathLike[str]) -> Threshold:
        """The threshold of a JSON object read from ``where`` (named in errors).

        Raises:
            DataError: no finite ``value``.
        """
        if "value" not in d:
            raise DataError(f"threshold file {where} has no 'value' key")
        try:
            value = float(d["value"])
        except (TypeError, ValueError) as e:
            raise DataError(f"threshold file {where}: 'value' is not a number") from e
        if not math.isfinite(value):
            raise DataError(f"threshold file {where}: 'value' is not finite")
        return cls(value=value, method=str(d.get("method", "iqr")),
                   params={k: float(v) for k, v in dict(d.get("params", {})).items()},
                   n=int(d.get("n", 0)))


def _read_record(p: Path) -> dict[str, Any]:
    """The JSON object in threshold file ``p`` (a DataError when missing or not an object)."""
    if not p.is_file():
        raise DataError(f"threshold file not found: {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"threshold file {p} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"threshold file {p} has no 'value' key")
    return d


@dataclass
class ThresholdSet:
    """A threshold saved with what it belongs to, as one JSON file written atomically (so a
    killed save leaves the previous set or the new one, never a mix of the two).

    The file holds the :class:`Threshold` keys (so :meth:`Threshold.load` and ``gen-ad groups
    --threshold-file`` read it as a threshold) plus ``format``, ``calibration`` and ``context``.

    Attributes:
        threshold: the label-free threshold.
        calibration: what the scorer's ``fit`` learned (its ``calibration()``).
        context: what it was calibrated for (e.g. run step, scorer options, rule).
    """

    threshold: Threshold
    calibration: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the whole set as one JSON file."""
        write_json(path, {**self.threshold.to_dict(), "format": SET_FORMAT,
                          "calibration": dict(self.calibration), "context": dict(self.context)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThresholdSet | None:
        """Read a set written by :meth:`save`; ``None`` for a plain threshold file (one written
        by :meth:`Threshold.save`, or a set saved by an older gen_ad as separate files).

        Raises:
            DataError: the file is missing or damaged, or written by a newer gen_ad.
        """
        p = Path(path)
        d = _read_record(p)
        if "format" not in d:
            return None
        if d["format"] != SET_FORMAT:
            raise DataError(f"threshold file {p} has format {d['format']!r}; this gen_ad reads "
                            f"format {SET_FORMAT} (written by a newer gen_ad?)")
        parts = {k: d.get(k) for k in ("calibration", "context")}
        bad = [k for k, v in parts.items() if not isinstance(v, dict)]
        if bad:
            raise DataError(f"threshold file {p} is damaged: {', '.join(bad)} is not an object")
        return cls(Threshold.from_record(d, p), **parts)  # type: ignore[arg-type]


def calibrate(normal_scores: Any, method: str = "iqr", fpr: float = 0.05) -> Threshold:
    """Calibrate a :class:`Threshold` on normal scores only.

    Args:
        normal_scores: ``[N]`` scores of normal validation images.
        method: ``"iqr"`` (``Q3 + 1.5 IQR``) or ``"fpr"`` (fixed false-positive rate).
        fpr: target false-positive rate for ``method="fpr"``.
    Returns:
        The threshold with its method, parameters and ``n``.
    """
    arr = _as_array(normal_scores)
    if method == "iqr":
        return Threshold(value=iqr_threshold(arr), method="iqr", params={}, n=int(arr.size))
    if method == "fpr":
        return Threshold(value=fpr_threshold(arr, fpr), method="fpr",
                         params={"fpr": float(fpr)}, n=int(arr.size))
    raise ConfigError(f"unknown threshold method '{method}' (choose from {', '.join(METHODS)})")
