"""The fault-injection suite of issue 16 (slow: about 10 minutes on 2 shared CPU cores).

Runs ``bench/faults.py`` with 20 SIGKILLs per family (wgan, stylegan2, ddpm; tiny demo configs
that checkpoint, prune and export at every step; kills at random moments and at every kind of
rename/deletion, re-saves of finished runs included), every state and export file damaged one
way, two writers on the folder of each writing command, hostile manifests, a NaN weight and the
user errors: no case may end with lost data, a silent overwrite or a resume from damaged state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


@pytest.mark.slow
def test_fault_campaign_holds_everywhere(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--kills", "20", "--one-mode", "--keep",
                           str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          timeout=3600)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["total"]["failed"] == 0, rec["failures"]
    classes = rec["classes"]
    assert classes["sigkill_time"]["tried"] + classes["sigkill_fileop"]["tried"] == 3 * 20
    assert classes["exact_resume"]["held"] == 3
    for cls in ("corrupt_state", "corrupt_export", "concurrent", "containment", "nonfinite",
                "user_errors"):
        assert classes[cls]["tried"] > 0 and classes[cls]["held"] == classes[cls]["tried"], cls
    assert classes["concurrent"]["tried"] >= 7  # synth, knn fit/extend/score, train, ...
    assert proc.returncode == 0
