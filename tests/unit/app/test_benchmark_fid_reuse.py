"""``gen-ad benchmark`` run again: a generator's FID/KID computed with the same settings is read
back from ``<out>/generators/`` (no sample drawn, no feature computed, Inception not loaded);
other settings, ``--fresh`` (``reuse=False``) or a changed record compute it again; FID/KID that
is unavailable or failed is never stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import gen_ad.app.benchmark as bench
from gen_ad.app import fid_reuse
from gen_ad.app.benchmark import BenchmarkConfig, PreparedMethod, benchmark_methods
from gen_ad.config import from_dict
from gen_ad.errors import DataError
from gen_ad.metrics.inception import custom_extractor
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

FID_KEYS = ("fd_meanstd", "kd_meanstd_mean", "kd_meanstd_std", "n_fake", "n_real")


class MeanScorer(AnomalyScorer):
    name = "mean"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(scores=x.mean(dim=(1, 2, 3)))


class FakeRun:
    """A generator: seeded noise images."""

    def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gen_ad.data.synthetic import write_folder

    root = tmp_path_factory.mktemp("fid_reuse")
    write_folder(root / "val", 10, 32, 1, 0.0)
    write_folder(root / "test", 12, 32, 2, 0.5)
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder whose export is identified by its manifest."""
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}\n", encoding="utf-8")
    (model / "manifest.json").write_text('{"weights": "v1"}\n', encoding="utf-8")
    return tmp_path / "run"


@pytest.fixture
def features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """A cheap extractor in place of Inception (its weights file stands in for Inception's):
    counts the images it sees and how often it is loaded. (Real-set statistics come from
    their own content-keyed cache after the first computation: 10 real images once.)"""
    seen = {"images": 0, "loaded": 0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen["images"] += x.shape[0]
        return torch.cat([x.float().mean((2, 3)), x.float().std((2, 3))], 1)

    def load(fc: Any, device: str) -> tuple[Any, str | None]:
        seen["loaded"] += 1
        return custom_extractor("meanstd", fn, identity="meanstd", device="cpu"), None

    monkeypatch.setattr(bench, "_fid_extractor", load)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    return {"seen": seen, "weights": weights}


@pytest.fixture(autouse=True)
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "write_figures", lambda outcomes, fig_dir: {})


def _cfg(data: Path, out: Path, weights: Path, **fid: Any) -> BenchmarkConfig:
    raw = {"out": str(out), "n_boot": 0, "device": "cpu", "examples": 0,
           "data": {"test": str(data / "test"), "val": str(data / "val"), "size": 32},
           "methods": [{"name": "gen", "run": "unused", "scorer": "x"}],
           "fid": {"enabled": True, "n": 6, "kid": True, "inception_weights": str(weights),
                   **fid},
           "shortcut": {"colour_baseline": False, "stain_shift": False}}
    return from_dict(BenchmarkConfig, raw)


def _method(data: Path, run_dir: Path) -> PreparedMethod:
    return PreparedMethod("gen", "generative", "fake generator", [], MeanScorer(), 32,
                          str(data / "val"), None, 8, run=FakeRun(), run_path=str(run_dir))


def _bench(capsys: pytest.CaptureFixture[str], cfg: BenchmarkConfig, pm: PreparedMethod,
           reuse: bool = True) -> tuple[dict[str, Any], str]:
    """The run's generator record in results.json, and stderr."""
    capsys.readouterr()
    benchmark_methods(cfg, [pm], "cpu", progress=False, reuse=reuse)
    err = capsys.readouterr().err
    results = json.loads((Path(cfg.out) / "results.json").read_text(encoding="utf-8"))
    return results["generators"][str(pm.run_path)], err


def test_fid_is_reused_with_the_same_settings_and_computed_again_otherwise(
        data: Path, run_dir: Path, tmp_path: Path, features: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every re-run sampled the generators and ran Inception again, even with every method
    reused."""
    seen, out = features["seen"], tmp_path / "out"
    pm = _method(data, run_dir)
    first, _ = _bench(capsys, _cfg(data, out, features["weights"]), pm)
    assert first["status"] == "ok" and first["reused"] is False and first["n_fake"] == 6
    assert seen == {"images": 16, "loaded": 1}  # 6 generated + 10 real
    record = fid_reuse.record_path(out, str(run_dir))
    assert record.parent == out / "generators" and record.is_file()
    # the same settings (a batch size at or above the sample chunk draws the same samples)
    again, err = _bench(capsys, _cfg(data, out, features["weights"], batch_size=48), pm)
    assert seen == {"images": 16, "loaded": 1}  # nothing sampled, extracted or loaded
    assert f"benchmark FID/KID of {run_dir}: reused (computed {first['computed']}" in err
    assert again["reused"] is True and again["computed"] == first["computed"]
    assert {k: again[k] for k in FID_KEYS} == {k: first[k] for k in FID_KEYS}
    # another n
    more, err = _bench(capsys, _cfg(data, out, features["weights"], n=8), pm)
    assert seen["images"] == 16 + 8 and more["n_fake"] == 8 and more["reused"] is False
    assert "computing again (it was computed with other settings (n))" in err
    # --fresh: the same values, computed again
    fresh, err = _bench(capsys, _cfg(data, out, features["weights"], n=8), pm, reuse=False)
    assert seen["images"] == 16 + 2 * 8 and fresh["reused"] is False
    assert "computing again (asked not to reuse earlier results)" in err
    assert {k: fresh[k] for k in FID_KEYS} == {k: more[k] for k in FID_KEYS}


@pytest.mark.parametrize("change", ["weights", "model", "batch", "record"])
def test_what_the_values_depend_on_computes_them_again(
        change: str, data: Path, run_dir: Path, tmp_path: Path, features: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    seen, out, weights = features["seen"], tmp_path / "out", features["weights"]
    pm = _method(data, run_dir)
    _bench(capsys, _cfg(data, out, weights), pm)
    fid: dict[str, Any] = {}
    if change == "weights":  # another extractor file
        weights.write_bytes(b"other weights")
    elif change == "model":  # another export of the run
        (run_dir / "model" / "manifest.json").write_text('{"weights": "v2"}\n', encoding="utf-8")
    elif change == "batch":  # pieces under the sample chunk: another sample set
        fid["batch_size"] = 16
    else:  # a record edited after it was written
        path = fid_reuse.record_path(out, str(run_dir))
        rec = json.loads(path.read_text(encoding="utf-8"))
        rec["result"]["fd_meanstd"] = 0.0
        path.write_text(json.dumps(rec), encoding="utf-8")
    gen, err = _bench(capsys, _cfg(data, out, weights, **fid), pm)
    assert seen["images"] == 16 + 6 and gen["reused"] is False and gen["status"] == "ok"
    why = {"weights": "other settings (extractor)", "model": "other settings (model)",
           "batch": "other settings (sample_piece)", "record": "changed after it was written"}
    assert f"benchmark FID/KID of {run_dir}: computing again (" in err and why[change] in err


def test_unavailable_or_failed_fid_is_never_stored(
        data: Path, run_dir: Path, tmp_path: Path, features: dict[str, Any],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out, weights = tmp_path / "out", features["weights"]
    pm = _method(data, run_dir)
    record = fid_reuse.record_path(out, str(run_dir))
    with monkeypatch.context() as m:  # a damaged Inception file: n/a
        m.setattr(bench, "_fid_extractor", lambda fc, device: (None, "n/a (damaged)"))
        gen, _ = _bench(capsys, _cfg(data, out, weights), pm)
    assert gen["status"] == "n/a" and not record.exists()

    class BrokenRun(FakeRun):
        def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
            raise DataError("the generator gave no images")

    broken = PreparedMethod("gen", "generative", "fake generator", [], MeanScorer(), 32,
                            str(data / "val"), None, 8, run=BrokenRun(), run_path=str(run_dir))
    gen, _ = _bench(capsys, _cfg(data, out, weights), broken)
    assert gen["status"] == "error" and not record.exists()
    gen, _ = _bench(capsys, _cfg(data, out, weights), pm)
    assert gen["status"] == "ok" and gen["reused"] is False and record.is_file()


def test_extractor_identity_is_found_without_loading_it(tmp_path: Path) -> None:
    from gen_ad.app.benchmark import FIDConfig
    from gen_ad.utils.identity import file_identity

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"w")
    assert fid_reuse.extractor_identity(FIDConfig(inception_weights=str(weights))) == \
        {"weights": file_identity(weights)}
    missing = str(tmp_path / "missing.pth")
    assert fid_reuse.extractor_identity(FIDConfig(inception_weights=missing)) is None
    assert fid_reuse.extractor_identity(FIDConfig(inception_weights=missing,
                                                  random_init_fallback=True)) == \
        {"random_init": 0, "torch": torch.__version__}
