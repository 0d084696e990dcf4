"""Log lines of a resumed run: which lines of stats.jsonl / fid.jsonl its history keeps."""

from __future__ import annotations

import json
from pathlib import Path

from gen_ad.training.monitor import branch_lines, set_aside_log_lines
from gen_ad.utils.io import read_jsonl


def test_branch_lines_keep_the_last_increasing_run_up_to_the_step() -> None:
    # 1..5 logged, killed; resumed from 2 and logged 3..4 again; a torn line at the end
    steps = [1, 2, 3, 4, 5, 3, 4, None]
    assert branch_lines(steps, 4) == [True, True, False, False, False, True, True, False]
    assert branch_lines(steps, 3) == [True, True, False, False, False, True, False, False]
    assert branch_lines(steps, 0) == [False] * 8  # a new run keeps none
    assert branch_lines([], 5) == []


def test_set_aside_rewrites_the_logs_and_keeps_every_line_aside(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4, 2, 3)]
    (tmp_path / "stats.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # torn
    (tmp_path / "fid.jsonl").write_text(json.dumps({"step": 2, "fid": 9.0}) + "\n")
    assert set_aside_log_lines(tmp_path, 3) == {"stats.jsonl": 4}
    assert [r["step"] for r in read_jsonl(tmp_path / "stats.jsonl")] == [1, 2, 3]
    assert (tmp_path / "stats.jsonl").read_text().splitlines() == [lines[0], lines[4], lines[5]]
    aside = (tmp_path / "stats.abandoned.jsonl").read_text().splitlines()
    assert aside == [lines[1], lines[2], lines[3], '{"step": 4, "lo']
    assert set_aside_log_lines(tmp_path, 3) == {}  # nothing more: files left as they are
    assert not (tmp_path / "fid.abandoned.jsonl").exists()
    assert set_aside_log_lines(tmp_path, 1) == {"stats.jsonl": 2, "fid.jsonl": 1}
    assert len((tmp_path / "stats.abandoned.jsonl").read_text().splitlines()) == 6  # appended
