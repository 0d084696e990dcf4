"""`gen-ad score` end to end: scores.csv, maps, metrics with CIs, saved threshold reused."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gen_ad.cli import main
from gen_ad.data.synthetic import write_folder

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "wgan"
TINY = ["data.synthetic=24", "train.sample_every=0", "train.fid_every=0", "train.log_every=1"]


def _train(*args: str) -> None:
    assert main(["train", "wgan", *args, *TINY]) == 0


def _check_outputs_agree(folder: Path, threshold: float) -> None:
    """scores.csv, metrics.json and the example maps of one method tell the same story:
    AUROC is scikit-learn's on the written scores, ``flagged`` is ``score > threshold``, and the
    ``top-01`` / ``bottom-01`` maps are the highest- and lowest-scoring images."""
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert [int(r["flagged"]) for r in rows] == (scores > threshold).astype(int).tolist()
    assert metrics["flagged"] == int((scores > threshold).sum())
    assert len(set(scores.tolist())) == len(scores)  # no ties: top and bottom are unambiguous
    top, bottom = (Path(rows[int(i)]["path"]).stem for i in (scores.argmax(), scores.argmin()))
    assert (folder / "maps" / f"top-01_{top}_overlay.png").is_file()
    assert (folder / "maps" / f"bottom-01_{bottom}_overlay.png").is_file()


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
    # the label-free pixel threshold: set on the 12 normal images' maps, Dice at it printed
    assert metrics["pixel_threshold"]["n_pixels"] == 12 * 32 * 32
    assert 0.0 <= metrics["pixel"]["at_pixel_threshold"]["dice"] <= metrics["pixel"]["best_dice"]
    assert "Dice @ 1% pixel FPR (label-free) " in printed
    assert f"outputs: {out / 'fanogan'}" in printed  # each method's own folder
    assert metrics["settings"]["run"] == str(enc)  # what the numbers were scored with
    assert metrics["settings"]["rule"] == {"method": "iqr"}
    assert metrics["settings"]["normal"] == str(tmp_path / "val")
    maps = sorted(p.name for p in (out / "fanogan" / "maps").iterdir())
    assert len(maps) == 8 and any(m.startswith("top-01_") for m in maps)
    th = json.loads((enc / "thresholds" / "fanogan.json").read_text())
    assert th["method"] == "iqr" and th["n"] == 12
    assert sorted(p.name for p in (enc / "thresholds").iterdir()) == ["fanogan.json"]  # one set
    _check_outputs_agree(out / "fanogan", th["value"])

    # the saved threshold is Tukey's fence of the 12 normal validation scores: score that
    # folder itself (the saved calibration is reused; f-AnoGAN's izi_f score is deterministic)
    assert main(["score", str(enc), "--data", str(tmp_path / "val"), "--out",
                 str(tmp_path / "val_scores"), "--examples", "0", "--n-boot", "10"]) == 0
    val = np.array([float(r["score"]) for r in csv.DictReader(
        (tmp_path / "val_scores" / "fanogan" / "scores.csv").open())])
    q1, q3 = np.percentile(val, [25, 75])
    assert val.size == 12 and th["value"] == pytest.approx(q3 + 1.5 * (q3 - q1), rel=1e-9)

    # without --normal, the saved threshold is reused: same flags as before
    out2 = tmp_path / "scores2"
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out", str(out2),
                 "--examples", "0"]) == 0
    rows2 = list(csv.DictReader((out2 / "fanogan" / "scores.csv").open()))
    assert [r["flagged"] for r in rows2] == [r["flagged"] for r in rows]
    ctx = json.loads((enc / "thresholds" / "fanogan.json").read_text())["context"]
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
    saved = json.loads((enc / "thresholds" / "fanogan.json").read_text())
    assert saved["n"] == 5 and saved["context"]["limit"] == 5
    with pytest.raises(SystemExit) as exit_:  # argparse usage error
        main(["score", str(enc), "--data", str(tmp_path / "test"), "--out",
              str(tmp_path / "s6"), "--calibration-limit", "-1"])
    assert exit_.value.code == 2 and "must be 0 or a positive integer" in capsys.readouterr().err
    assert main(["score", str(enc), "--data", str(tmp_path / "test"), "--out", str(out2),
                 "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_score_reads_patches_as_the_run_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained with data.resize=center_crop on 48 px patches at 32 px is scored (and
    calibrated) on the same centre crops, not on whole-image rescales (another magnification);
    a threshold saved without that record is not reused."""
    import gen_ad.app.score as app_score
    from gen_ad.data.folders import PatchFolder, load_image

    for name, n, seed, frac in (("train", 20, 5, 0.0), ("test", 8, 3, 0.5), ("val", 6, 4, 0.0)):
        write_folder(tmp_path / name, n=n, size=48, seed=seed, anomaly_fraction=frac)
    gan = tmp_path / "gan"
    _train("--config", str(CONFIGS / "demo.yaml"), f"out={gan}", "train.max_steps=1",
           f"data.train={tmp_path / 'train'}", "data.resize=center_crop", "train.batch_size=10")
    seen: dict[str, Any] = {}

    def calibrate(scorer: Any, normal: Any, **kw: Any) -> Any:
        seen["normal"] = normal
        return real_calibrate(scorer, normal, **kw)

    def score(scorer: Any, ds: Any, **kw: Any) -> Any:
        seen["test"] = ds
        return real_score(scorer, ds, **kw)

    real_calibrate, real_score = app_score.calibrate_scorer, app_score.score_dataset
    monkeypatch.setattr(app_score, "calibrate_scorer", calibrate)
    monkeypatch.setattr(app_score, "score_dataset", score)
    args = ["score", str(gan), "--data", str(tmp_path / "test"), "--examples", "0", "--steps",
            "1", "--n-boot", "20"]
    assert main([*args, "--out", str(tmp_path / "s1"), "--normal", str(tmp_path / "val")]) == 0
    for key, root in (("test", "test"), ("normal", "val")):
        ds = seen[key]
        classes = ["normal", "anomalous"] if key == "test" else ["normal"]
        crops = PatchFolder(root=str(tmp_path / root), size=32, classes=classes,
                            resize="center_crop")
        want = {crops[i]["path"]: crops[i]["image"] for i in range(len(crops))}
        got = {ds[i]["path"]: ds[i]["image"] for i in range(len(ds))}
        assert sorted(got) == sorted(want) and len(got) == len(ds) > 0
        for path, image in got.items():
            assert torch.equal(image, want[path]), (key, path)
            assert not torch.equal(image, load_image(path, 32, "resize"))  # the modes differ
    set_file = gan / "thresholds" / "anogan.json"
    saved = json.loads(set_file.read_text())
    assert saved["context"]["resize"] == "center_crop"

    # a threshold calibrated before scoring honoured the mode (no record of it) is refused
    del saved["context"]["resize"]
    set_file.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "s2")]) == 2
    assert "resize: saved None, now 'center_crop'" in capsys.readouterr().err


def test_score_limit_and_runs_without_a_calibration_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--limit N`` scores a seeded random N of the patches (metrics.json records it); a run
    with no data.val and no saved threshold flags nothing and says how to calibrate; a run whose
    relative data.val is not found from the current directory names it and --normal."""
    from gen_ad.data.folders import subset_indices

    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "test", n=16, size=32, seed=3, anomaly_fraction=0.5)
    write_folder(tmp_path / "valid", n=6, size=32, seed=4, anomaly_fraction=0.0)
    _train("--config", str(CONFIGS / "demo.yaml"), "out=gan", "train.max_steps=1",
           "train.batch_size=10")
    _train("--config", str(CONFIGS / "demo.yaml"), "out=gan-val", "data.val=valid",
           "train.max_steps=1", "train.batch_size=10")
    capsys.readouterr()
    args = ["--data", "test", "--examples", "0", "--steps", "1", "--n-boot", "20"]

    assert main(["score", "gan", *args, "--out", "all"]) == 0
    assert main(["score", "gan", *args, "--out", "five", "--limit", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("nothing is flagged; pass --normal DIR") == 2
    every = list(csv.DictReader((tmp_path / "all" / "anogan" / "scores.csv").open()))
    five = list(csv.DictReader((tmp_path / "five" / "anogan" / "scores.csv").open()))
    assert [r["path"] for r in five] == [every[i]["path"] for i in subset_indices(16, 5, 0)]
    metrics = json.loads((tmp_path / "five" / "anogan" / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["limit"] == {"n": 5, "of": 16, "seed": 0}
    assert "limit" not in json.loads((tmp_path / "all" / "anogan" / "metrics.json").read_text())
    assert not (tmp_path / "five" / "anogan" / "flagged.csv").exists()

    monkeypatch.chdir(tmp_path / "test")  # data.val=valid is not found from here
    assert main(["score", str(tmp_path / "gan-val"), *args[2:], "--data", str(tmp_path / "test"),
                 "--out", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gen-ad: error: the run's data.val (valid)")
    assert f"not found from the current directory ({tmp_path / 'test'})" in err[0]
    assert err[0].endswith("pass --normal DIR (normal validation patches)")
