"""A run trained on stain-normalised patches scores stain-normalised queries (issue: scoring
used raw pixels), with the stain reference carried inside its export."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gen_ad.cli import main
from gen_ad.data.folders import image_to_tensor, read_rgb, tensor_to_uint8
from gen_ad.data.stain import StainNormalizer, tissue_pixel_fraction
from gen_ad.data.synthetic import write_folder
from gen_ad.errors import CheckpointError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch
from gen_ad.scoring.stain import StainNormalizedScorer, normalise_batch
from gen_ad.training.runs import load_run

needs_torchstain = pytest.mark.skipif(importlib.util.find_spec("torchstain") is None,
                                      reason="torchstain is not installed (pip install torchstain)")
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "wgan"


class _Recorder(AnomalyScorer):
    """Scores = mean pixel value; remembers what it was given."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.marker = "inner attribute"

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        self.seen += list(normal_batches)
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        self.seen.append(x)
        return ScoreBatch(x.mean(dim=(1, 2, 3)))


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    write_folder(tmp_path / "data", n=12, size=32, seed=0, anomaly_fraction=0.0)
    ref = tmp_path / "ref.png"
    shutil.copy(sorted((tmp_path / "data" / "normal").iterdir())[0], ref)
    return tmp_path / "data", ref


def _reinhard_run(run: Path, data: Path, ref: Path) -> Path:
    """A one-step WGAN run trained on Reinhard-normalised patches."""
    assert main(["train", "wgan", "--config", str(CONFIGS / "demo.yaml"), f"out={run}",
                 f"data.train={data}", "data.stain_norm=reinhard", f"data.stain_ref={ref}",
                 "train.max_steps=1", "train.batch_size=10", "train.sample_every=0",
                 "train.fid_every=0", "train.ckpt_every=0"]) == 0
    return run


@needs_torchstain
def test_wrapper_normalises_before_fit_and_score(tmp_path: Path) -> None:
    data, ref = _folder(tmp_path)
    stain = StainNormalizer(method="reinhard", reference=ref)
    files = sorted((data / "normal").iterdir())[1:5]
    x = torch.stack([image_to_tensor(read_rgb(f)) for f in files])
    expected = torch.stack([image_to_tensor(stain(u.numpy())) for u in tensor_to_uint8(x)])
    assert not torch.equal(expected, x)  # the stain really moves
    inner = _Recorder()
    sc = StainNormalizedScorer(inner, stain)
    sc.fit([x[:2], x[2:]])
    out = sc.score(x)
    assert torch.equal(torch.cat(inner.seen[:2]), expected)
    assert torch.equal(inner.seen[2], expected)
    assert torch.allclose(out.scores, expected.mean(dim=(1, 2, 3)))
    assert sc.name == "recorder" and sc.marker == "inner attribute"  # inspection sees the method
    assert torch.equal(normalise_batch(x, stain), expected)
    sparse = [float(tissue_pixel_fraction(u.permute(1, 2, 0).numpy()) < stain.min_tissue)
              for u in tensor_to_uint8(x)]  # the synthetic set has a patch of mostly glass
    assert out.terms["stain_unchanged"].tolist() == sparse
    blank = torch.ones(1, 3, 32, 32)  # glass: no tissue to normalise
    dense = x[[sparse.index(0.0)]]
    flags = sc.score(torch.cat([dense, blank])).terms["stain_unchanged"]
    assert flags.tolist() == [0.0, 1.0] and torch.equal(inner.seen[-1][1:], blank)


@needs_torchstain
def test_stain_coverage_counts_patches_left_in_their_own_stain(tmp_path: Path) -> None:
    from PIL import Image

    from gen_ad.config import DataConfig
    from gen_ad.data import build_dataset, stain_coverage

    data, ref = _folder(tmp_path)
    cfg = DataConfig(train=str(data), size=32, stain_norm="macenko", stain_ref=str(ref))
    before, n = stain_coverage(cfg, build_dataset(cfg), n=100)
    assert n == 12
    for i in range(3):  # blank glass: too little tissue
        Image.new("RGB", (32, 32), (240, 240, 242)).save(data / "normal" / f"zz_blank{i}.png")
    ds = build_dataset(cfg)
    assert stain_coverage(cfg, ds, n=100) == (before + 3, 15)
    unchanged, seen = stain_coverage(cfg, ds, n=6, seed=1)
    assert seen == 6 and 0 <= unchanged <= before + 3
    assert stain_coverage(DataConfig(train=str(data), size=32), ds) is None


@needs_torchstain
def test_stain_run_exports_reference_and_scores_normalised(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, ref = _folder(tmp_path)
    run = _reinhard_run(tmp_path / "gan", data, ref)
    assert re.search(r"reinhard stain normalisation leaves \d+ of 12 sampled training patches",
                     capsys.readouterr().err)
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["stain_ref"] == "stain_ref.png"
    assert np.array_equal(read_rgb(run / "model" / "stain_ref.png"), read_rgb(ref))
    ref.unlink()  # the run folder alone is enough
    r = load_run(run)
    assert r.stain is not None
    (name, sc), = r.scorers(steps=2).items()
    assert isinstance(sc, StainNormalizedScorer) and name == "anogan"
    x = torch.stack([image_to_tensor(read_rgb(f)) for f in sorted((data / "normal").iterdir())[:3]])
    plain = r.family.scorers(r.models, steps=2)["anogan"]
    want = plain.score(normalise_batch(x, r.stain)).scores
    assert torch.allclose(sc.score(x).scores, want)

    # an export without the copy (older gen_ad) and without the original: a clear error
    del meta["stain_ref"]
    (run / "model" / "model.json").write_text(json.dumps(meta))
    (run / "model" / "manifest.json").unlink()
    meta["format"] = 1
    (run / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no integrity manifest"), \
            pytest.raises(CheckpointError, match="stain reference .* is missing"):
        load_run(run)


def test_outputs_count_the_queries_left_in_their_own_stain(tmp_path: Path) -> None:
    from gen_ad.app.evaluate import ScoredSet, summary_line, write_outputs

    scored = ScoredSet(["a.png", "b.png", "c.png"], ["normal", "tumor", "tumor"],
                       np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9]),
                       {"stain_unchanged": np.array([0.0, 1.0, 1.0])})
    metrics = write_outputs(tmp_path, scored, None, method="m", n_boot=0)
    assert metrics["stain_unchanged"] == 2
    assert "2 left in their own stain" in summary_line(metrics)
    assert (tmp_path / "terms.csv").read_text().splitlines()[:2] == ["path,stain_unchanged",
                                                                      "a.png,0.0"]
    plain = write_outputs(tmp_path / "plain", ScoredSet(["a.png"], ["normal"], np.array([0]),
                                                        np.array([0.1])), None, method="m")
    assert "stain_unchanged" not in plain and "own stain" not in summary_line(plain)


@needs_torchstain
def test_load_run_fits_the_stain_reference_it_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new export published between ``load_run``'s check of the export and its use of the
    stain reference must not hand over the other export's reference: the normaliser is fitted
    on the verified bytes, not on the file opened again."""
    import gen_ad.training.runs as runs

    data, ref = _folder(tmp_path)
    run = _reinhard_run(tmp_path / "gan", data, ref)
    other = sorted((data / "normal").iterdir())[-1]
    real_read = runs.read_export

    def read_then_replace(model_dir: Path, pick):  # type: ignore[no-untyped-def]
        out = real_read(model_dir, pick)
        shutil.copy(other, model_dir / "stain_ref.png")  # a later export's reference
        return out

    monkeypatch.setattr(runs, "read_export", read_then_replace)
    r = load_run(run)
    assert r.stain is not None
    x = torch.stack([image_to_tensor(read_rgb(f)) for f in sorted((data / "normal").iterdir())[:3]])
    want = normalise_batch(x, StainNormalizer(method="reinhard", reference=ref))
    wrong = normalise_batch(x, StainNormalizer(method="reinhard", reference=other))
    assert not torch.equal(want, wrong)
    assert torch.equal(normalise_batch(x, r.stain), want)
