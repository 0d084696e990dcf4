"""``gen-ad groups`` layering: the statistics stay pure (gen_ad.metrics.stats), the command layer
(gen_ad.app.groups) writes the outputs and the CLI summary."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import gen_ad.metrics.stats as stats
from gen_ad.app.groups import format_summary, write_group_outputs
from gen_ad.metrics.stats import GroupSettings, group_analysis


def test_stats_module_writes_nothing() -> None:
    tree = ast.parse(Path(stats.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"gen_ad.utils.io", "gen_ad.report.figures"}
    assert not hasattr(stats, "write_group_outputs") and not hasattr(stats, "format_summary")


def test_outputs_and_summary_come_from_the_command_layer(tmp_path: Path) -> None:
    slides = [f"s{i}" for i in range(6) for _ in range(4)]
    scores = [float(i % 4 + (i // 4 >= 3)) for i in range(24)]
    groups = {f"s{i}": "control" if i < 3 else "treated" for i in range(6)}
    result = group_analysis(slides, scores, groups, 2.5, GroupSettings(control="control",
                                                                       n_boot=20))
    paths = write_group_outputs(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.json", "groups_box.png",
                                                         "per_slide.csv"]
    assert set(paths) == {"json", "csv", "png"}
    assert json.loads(paths["json"].read_text())["control"] == "control"
    assert paths["csv"].read_text().splitlines()[0] == ("slide,group,n_patches,n_above,"
                                                        "percent_above,mean_score,max_score")
    text = format_summary(result)
    assert text.startswith("threshold 2.5; control group 'control'; unit of analysis: slide")
    assert "treated vs control: mean diff" in text
