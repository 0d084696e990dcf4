"""``gen-ad groups``: per-slide percentage of anomalous patches, control vs treated tests."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from gen_ad.errors import DataError
from gen_ad.metrics.stats import (
    GroupSettings,
    group_analysis,
    read_animals,
    read_group_order,
    read_groups,
    read_scores,
    write_group_outputs,
)
from gen_ad.scoring.thresholds import Threshold
from gen_ad.utils.lock import writes_folder


@writes_folder("out_dir", "groups output folder")
def run_groups(score_csvs: Sequence[str | os.PathLike[str]], groups_csv: str | os.PathLike[str],
               out_dir: str | os.PathLike[str], threshold: float | None = None,
               threshold_file: str | os.PathLike[str] | None = None,
               control: str | None = None, order: Sequence[str] | None = None,
               n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The ``gen-ad groups`` pipeline: read tables, analyse, write outputs.

    Args:
        score_csvs: ``path,score[,slide]`` CSVs.
        groups_csv: ``slide,group`` CSV (optional ``dose``; optional ``animal``: the animal is
            then the unit of analysis, its slides pooled).
        out_dir: folder for ``groups.json``, ``per_slide.csv``, ``groups_box.png``.
        threshold: threshold value; exactly one of ``threshold`` / ``threshold_file``.
        threshold_file: JSON written by :meth:`gen_ad.scoring.thresholds.Threshold.save`.
        control: reference group name.
        order: every group in dose order for the trend test (default: from the groups table's
            optional ``dose`` column; neither: no trend test).
        n_boot, seed: effect-size bootstrap resamples; seed of every random step.
    Returns:
        The analysis dict (see :func:`group_analysis`) with ``"outputs"`` (written paths).
    """
    if (threshold is None) == (threshold_file is None):
        raise DataError("give exactly one of --threshold or --threshold-file")
    if threshold_file is not None:
        thr = Threshold.load(threshold_file)
        t_value, t_info = thr.value, thr.to_dict()
    else:
        if not math.isfinite(float(threshold)):  # type: ignore[arg-type]
            raise DataError(f"threshold must be finite, got {threshold}")
        t_value, t_info = float(threshold), {"value": float(threshold), "method": "given"}
    slides, scores = read_scores(score_csvs)
    order = list(order) if order is not None else read_group_order(groups_csv)
    settings = GroupSettings(control=control, order=order, n_boot=n_boot, seed=seed)
    result = group_analysis(slides, scores, read_groups(groups_csv), t_value, settings,
                            slide_animals=read_animals(groups_csv))
    result["threshold_info"] = t_info
    result["score_files"] = [str(p) for p in score_csvs]
    paths = write_group_outputs(result, out_dir)
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return result
