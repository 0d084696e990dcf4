"""``gen-ad groups``: per-slide percentage of anomalous patches, control vs treated tests.

The statistics live in :mod:`gen_ad.metrics.stats`; this command layer reads the tables, writes
the outputs (:func:`write_group_outputs`) and the CLI summary (:func:`format_summary`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gen_ad.errors import DataError
from gen_ad.metrics.stats import (
    GroupSettings,
    group_analysis,
    read_animals,
    read_group_order,
    read_groups,
    read_scores,
)
from gen_ad.scoring.thresholds import Threshold
from gen_ad.utils.io import write_json, write_text
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
        threshold_file: JSON written by :meth:`gen_ad.scoring.thresholds.Threshold.save`, or a
            run's saved set (``<run>/thresholds/<method>.json``, a ``ThresholdSet``).
        control: reference group name.
        order: every group in dose order for the trend test (default: from the groups table's
            optional ``dose`` column; neither: no trend test).
        n_boot, seed: bootstrap resamples of the median-difference interval; seed of every
            random step.
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


def write_group_outputs(result: Mapping[str, Any],
                        out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``groups.json``, ``per_slide.csv`` (and ``per_animal.csv`` when animals are the
    unit) and ``groups_box.png`` into ``out_dir``."""
    from gen_ad.report.figures import box_plot  # matplotlib only when figures are written

    out = Path(out_dir)
    stats = ["n_patches", "n_above", "percent_above", "mean_score", "max_score"]
    animals = result.get("per_animal")
    paths = {"json": out / "groups.json", "csv": out / "per_slide.csv",
             "png": out / "groups_box.png"}
    for name in ("groups.json", "per_animal.csv"):  # an earlier run's: groups.json comes last
        (out / name).unlink(missing_ok=True)
    slide_cols = ["slide", "group", *(["animal"] if animals else []), *stats]
    write_text(paths["csv"], _csv_table(result["per_slide"], slide_cols))
    if animals:
        paths["animals_csv"] = out / "per_animal.csv"
        write_text(paths["animals_csv"], _csv_table(animals, ["animal", "group", *stats]))
    unit = result.get("unit", "slide")
    box_plot(result["groups"], paths["png"], ylabel=f"% patches above threshold (per {unit})",
             title=f"threshold {result['threshold']:.4g}")
    write_json(paths["json"], dict(result))  # last: a groups.json means the set is complete
    return paths


def _csv_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    lines = [",".join(cols)] + [",".join(_csv_cell(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def _csv_cell(v: Any) -> str:
    s = f"{v:.6g}" if isinstance(v, float) else str(v)
    return f'"{s}"' if any(c in s for c in ',"\n') else s


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _fmt_ci(bounds: Sequence[float] | None) -> str:
    """`` [low, high]``, marked when zero-width (every bootstrap resample gave one value: no
    measure of uncertainty, as in the detection summaries), ``""`` when undefined."""
    if not bounds:
        return ""
    text = f" [{_fmt(bounds[0])}, {_fmt(bounds[1])}]"
    return text + " (zero-width CI)" if bounds[0] == bounds[1] else text


def _comparison_lines(name: str, control: str, c: Mapping[str, Any]) -> list[str]:
    ci = c.get("ci") or {}
    return [
        f"  {name} vs {control}: mean diff {_fmt(c['mean_diff'])} points"
        f"{_fmt_ci(ci.get('mean_diff'))}, median diff {_fmt(c['median_diff'])} points"
        f"{_fmt_ci(ci.get('median_diff'))}, Hedges g={_fmt(c['hedges_g'])}"
        f"{_fmt_ci(ci.get('hedges_g'))}, Cliff's delta={_fmt(c['cliffs_delta'])}"
        f"{_fmt_ci(ci.get('cliffs_delta'))}",
        f"    Mann-Whitney p={_fmt(c['mannwhitney_p'])} (Holm {_fmt(c.get('mannwhitney_p_holm'))})"
        f", Welch p={_fmt(c['welch_p'])} (Holm {_fmt(c.get('welch_p_holm'))}), "
        f"Dunnett p={_fmt(c.get('dunnett_p'))}",
    ]


def _trend_line(result: Mapping[str, Any]) -> str | None:
    trend = result.get("trend") or {}
    if not trend.get("order"):
        return None
    return (f"  trend over {' < '.join(trend['order'])}: Jonckheere-Terpstra "
            f"p={_fmt(trend['p_two_sided'])} (two-sided, {trend['method']}; increasing "
            f"{_fmt(trend['p_increasing'])}; normal approximation "
            f"{_fmt(trend['p_normal_two_sided'])})")


def format_summary(result: Mapping[str, Any]) -> str:
    """A few human-readable lines: per-group median %, each comparison (effect sizes with their
    intervals, raw and Holm-adjusted p-values, Dunnett), the omnibus and trend tests."""
    unit = result.get("unit", "slide")
    lines = [f"threshold {result['threshold']:.6g}; control group '{result['control']}'; "
             f"unit of analysis: {unit}"]
    for g, v in result["groups"].items():
        lines.append(f"  {g}: {len(v)} {unit}s, median {np.median(v):.2f}% "
                     f"(mean {np.mean(v):.2f}%) patches above threshold")
    for g, c in result["comparisons"].items():
        lines += _comparison_lines(g, result["control"], c)
    cis = [c["ci"] for c in result["comparisons"].values() if c.get("ci")]
    if cis:
        lines.append(f"  {cis[0]['ci']:.0%} intervals: Welch t (mean diff), bootstrap (median "
                     "diff), noncentral t (Hedges g), Newcombe score (Cliff's delta); see "
                     "groups.json")
    if result.get("omnibus"):
        lines.append(f"  all groups: Kruskal-Wallis p={_fmt(result['omnibus']['kruskal_p'])}")
    trend = _trend_line(result)
    if trend:
        lines.append(trend)
    if result["unassigned_slides"]:
        lines.append(f"  note: {len(result['unassigned_slides'])} scored slide(s) not in the "
                     "groups table were ignored")
    if result["slides_without_scores"]:
        lines.append(f"  note: {len(result['slides_without_scores'])} slide(s) in the groups "
                     "table have no scores")
    return "\n".join(lines)
