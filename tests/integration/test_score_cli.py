"""`gen-ad score` end to end: scores.csv, maps, metrics with CIs, saved threshold reused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gen_ad.cli import main
from gen_ad.data.synthetic import write_folder

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "wgan"
TINY = ["data.synthetic=24", "train.sample_every=0", "train.fid_every=0", "train.log_every=1"]


def _train(*args: str) -> None:
    assert main(["train", "wgan", *args, *TINY]) == 0


def test_score_run_folder(tmp_path: Path, capsys) -> None:
    gan, enc = tmp_path / "gan", tmp_path / "enc"
    _train("--config", str(CONFIGS / "demo.yaml"), f"out={gan}", "train.max_steps=2",
           "train.batch_size=10")
    _train("--config", str(CONFIGS / "demo_encoder.yaml"), f"out={enc}", f"gan_run={gan}",
           "train.max_steps=2", "train.batch_size=6")
    write_folder(tmp_path / "test", n=16, size=32, seed=3, anomaly_fraction=0.5)
    write_folder(tmp_path / "val", n=12, size=32, seed=4, anomaly_fraction=0.0)
    capsys.readouterr()

    out = tmp_path / "scores"
    rc = main(["score", str(enc), "--data", str(tmp_path / "test"), "--out", str(out),
               "--normal", str(tmp_path / "val"), "--masks", str(tmp_path / "test" / "masks"),
               "--examples", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fanogan: 16 images" in printed and "AUROC" in printed

    rows = list(csv.DictReader((out / "fanogan" / "scores.csv").open()))
    assert len(rows) == 16
    assert list(rows[0]) == ["path", "label", "class", "score", "flagged"]
    terms = list(csv.DictReader((out / "fanogan" / "terms.csv").open()))
    assert list(terms[0]) == ["path", "feature", "residual"]
    assert [t["path"] for t in terms] == [r["path"] for r in rows]
    assert {r["label"] for r in rows} == {"0", "1"}
    metrics = json.loads((out / "fanogan" / "metrics.json").read_text())
    assert 0.0 <= metrics["auroc"]["value"] <= 1.0
    assert metrics["auroc"]["low"] <= metrics["auroc"]["value"] <= metrics["auroc"]["high"]
    assert "pixel" in metrics and "at_threshold" in metrics
    maps = sorted(p.name for p in (out / "fanogan" / "maps").iterdir())
    assert len(maps) == 8 and any(m.startswith("top-01_") for m in maps)
    th = json.loads((enc / "thresholds" / "fanogan.json").read_text())
    assert th["method"] == "iqr" and th["n"] == 12

    # without --normal, the saved threshold is reused: same flags as before
    out2 = tmp_path / "scores2"
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out", str(out2),
                 "--examples", "0"]) == 0
    rows2 = list(csv.DictReader((out2 / "fanogan" / "scores.csv").open()))
    assert [r["flagged"] for r in rows2] == [r["flagged"] for r in rows]
    ctx = json.loads((enc / "thresholds" / "fanogan.context.json").read_text())
    assert ctx["rule"] == {"method": "iqr"} and ctx["scorer_kwargs"] == {}

    # a saved threshold is not reused for another rule or other scorer options
    capsys.readouterr()
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out",
                 str(tmp_path / "s3"), "--examples", "0", "--threshold", "fpr"]) == 2
    assert "calibrated for other settings (rule: saved {'method': 'iqr'}" in capsys.readouterr().err
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out",
                 str(tmp_path / "s4"), "--examples", "0", "--steps", "3"]) == 2
    assert "scorer_kwargs: saved {}, now {'steps': 3}" in capsys.readouterr().err

    # --calibration-limit: a seeded random 5 of the 12 normal patches set the threshold
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out",
                 str(tmp_path / "s5"), "--examples", "0", "--normal", str(tmp_path / "val"),
                 "--calibration-limit", "5", "--n-boot", "50"]) == 0
    assert json.loads((enc / "thresholds" / "fanogan.json").read_text())["n"] == 5
    assert json.loads((enc / "thresholds" / "fanogan.context.json").read_text())["limit"] == 5
    with pytest.raises(SystemExit) as exit_:  # argparse usage error
        main(["score", str(enc), "--data", str(tmp_path / "test"), "--out",
              str(tmp_path / "s6"), "--calibration-limit", "-1"])
    assert exit_.value.code == 2 and "must be 0 or a positive integer" in capsys.readouterr().err
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out", str(out2),
                 "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
