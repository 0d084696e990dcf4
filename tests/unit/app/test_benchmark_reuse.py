"""``gen-ad benchmark`` run again: each method finished with the same settings is reused (bitwise,
without scoring anything), the others are computed again, and the tables describe exactly the
requested methods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import gen_ad.app.benchmark as bench
import gen_ad.app.shortcut as shortcut_mod
from gen_ad.baselines.knn import KNNScorer
from gen_ad.cli import main
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

A, B, COLOUR = "alpha-knn", "beta-knn", "colour-baseline"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gen_ad.data.synthetic import write_folder

    root = tmp_path_factory.mktemp("bench_reuse")
    write_folder(root / "train", 12, 32, 0, 0.0)
    write_folder(root / "val", 10, 32, 1, 0.0)
    write_folder(root / "test", 12, 32, 2, 0.5)
    return root


def _config(tmp: Path, data: Path, names: tuple[str, ...] = (A, B), **extra: Any) -> Path:
    """A benchmark YAML: two colour-statistics KNN methods (k=3 and k=4) and the colour
    baseline; the stain shift on a few patches."""
    ks = {A: 3, B: 4}
    raw = {"out": str(tmp / "out"), "n_boot": 20, "device": "cpu", "examples": 2,
           "data": {"test": str(data / "test"), "val": str(data / "val"), "size": 32},
           "methods": [{"name": n, "knn": {"extractor": "colour-stats", "k": ks[n],
                                           "bank": str(data / "train")}} for n in names],
           "fid": {"enabled": False}, "shortcut": {"limit": 6}, **extra}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> str:
    """``gen-ad benchmark``; returns its stderr (the reuse lines)."""
    capsys.readouterr()
    rc = main(["benchmark", "--config", str(cfg), *args])
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file under ``methods/``."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted((out / "methods").rglob("*")) if p.is_file()}


def _evaluated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the methods evaluated from now on (the real evaluation still runs)."""
    seen: list[str] = []
    real = bench.evaluate_method

    def spy(pm: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(pm.name)
        return real(pm, *args, **kwargs)

    monkeypatch.setattr(bench, "evaluate_method", spy)
    return seen


def _forbid_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail at any fit, score or stain-shift re-scoring: nothing may be computed again."""
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a method was computed again instead of reused")

    for owner, name in ((KNNScorer, "fit"), (KNNScorer, "score"), (bench, "evaluate_method"),
                        (shortcut_mod, "stain_shift")):
        monkeypatch.setattr(owner, name, recomputed)


@pytest.fixture(autouse=True)
def tiny_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-pixel figures under the real names (drawing them is most of a tiny benchmark's time;
    test_benchmark.py checks the real ones; what they are drawn from is checked here)."""
    from PIL import Image

    def draw(outcomes: list[Any], fig_dir: Path) -> dict[str, str]:
        names = {"roc": "roc.png", **{f"hist/{o.method.name}": f"hist-{o.method.name}.png"
                                      for o in outcomes}}
        fig_dir.mkdir(parents=True, exist_ok=True)
        for name in names.values():
            Image.new("RGB", (1, 1)).save(fig_dir / name)
        return names

    monkeypatch.setattr(bench, "write_figures", draw)


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def test_rerun_reuses_every_method_bitwise_without_scoring(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, data)
    out = tmp_path / "out"
    _run(capsys, cfg)
    first, files = _results(out), _files(out)
    assert all(m["stain_shift"] for m in first["shortcut"]["methods"].values())
    _forbid_scoring(monkeypatch)
    err = _run(capsys, cfg)
    again = _results(out)
    assert [m["reused"] for m in first["methods"]] == [False] * 3
    for m, rec in zip(first["methods"], again["methods"]):
        assert f"benchmark method {m['name']}: reused (computed {m['computed']};" in err
        assert rec["reused"] is True and _without(rec, "reused") == _without(m, "reused")
    assert [m["name"] for m in again["methods"]] == [A, B, COLOUR]
    assert again["shortcut"] == first["shortcut"] and again["warnings"] == first["warnings"]
    assert _files(out) == files  # not one byte written again, not one file touched
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("Reused: computed") == 3  # the report says where its numbers came from


def test_changed_setting_recomputes_only_the_methods_it_changes(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "data"
    shutil.copytree(data, local)
    cfg = _config(tmp_path, local)
    _run(capsys, cfg)
    seen = _evaluated(monkeypatch)
    err = _run(capsys, cfg, "methods[1].knn.k=2")  # beta only
    assert seen == [B] and f"{A}: reused" in err and f"{COLOUR}: reused" in err
    assert f"benchmark method {B}: computing again (it was computed with other settings (" in err
    assert "config" in err.split(f"{B}: computing again")[1].splitlines()[0]
    seen.clear()
    err = _run(capsys, cfg, "methods[1].knn.k=2", "batch_size=5")  # how fast, not what
    assert seen == [] and err.count(": reused (") == 3
    seen.clear()
    err = _run(capsys, cfg, "methods[1].knn.k=2", "n_boot=30")  # every method's CIs
    assert seen == [A, B, COLOUR] and "bootstrap" in err and ": reused (" not in err
    seen.clear()
    victim = sorted((local / "test" / "normal").glob("*.png"))[0]
    victim.write_bytes(sorted((local / "train" / "normal").glob("*.png"))[0].read_bytes())
    err = _run(capsys, cfg, "methods[1].knn.k=2", "n_boot=30")  # a test image replaced
    assert seen == [A, B, COLOUR] and "other settings (test)" in err


def test_interrupted_method_is_recomputed_and_its_partial_output_never_read(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, data)
    out = tmp_path / "out"
    _run(capsys, cfg)
    beta = out / "methods" / B
    real_eval = bench.evaluate_method

    def kill_beta(pm: Any, *args: Any, **kwargs: Any) -> Any:
        if pm.name == B:
            raise KeyboardInterrupt
        return real_eval(pm, *args, **kwargs)

    # killed while scoring beta with a new k, then killed after its engine files were written
    monkeypatch.setattr(bench, "evaluate_method", kill_beta)
    assert main(["benchmark", "--config", str(cfg), "methods[1].knn.k=2"]) == 130
    assert not (beta / "method.json").exists() and (out / "methods" / A / "method.json").exists()
    assert not (out / "results.json").exists() and not (out / "report.html").exists()
    monkeypatch.setattr(bench, "evaluate_method", real_eval)
    import gen_ad.app.benchmark_reuse as reuse

    real_npz = reuse._npz_bytes
    monkeypatch.setattr(reuse, "_npz_bytes", lambda arrays: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    assert main(["benchmark", "--config", str(cfg), "methods[1].knn.k=2"]) == 130
    assert (beta / "metrics.json").exists() and not (beta / "method.json").exists()
    monkeypatch.setattr(reuse, "_npz_bytes", real_npz)
    (beta / "outcome.npz").write_bytes(b"half written")  # reading either would fail
    (beta / "scores.csv").write_bytes(b"path,label\nhalf")
    seen = _evaluated(monkeypatch)
    err = _run(capsys, cfg, "methods[1].knn.k=2")
    assert seen == [B], err
    assert f"{B}: computing again (no method.json in {beta}: an earlier run was interrupted" in err
    fresh = tmp_path / "fresh"
    _run(capsys, cfg, "methods[1].knn.k=2", f"out={fresh}", "--fresh")
    assert (beta / "scores.csv").read_bytes() == (fresh / "methods" / B / "scores.csv").read_bytes()
    got = {m["name"]: m for m in _results(out)["methods"]}
    want = {m["name"]: m for m in _results(fresh)["methods"]}
    assert got[B]["metrics"] == want[B]["metrics"] and got[B]["threshold"] == want[B]["threshold"]
    # a finished method whose files changed afterwards is computed again, not trusted
    (out / "methods" / A / "scores.csv").write_text("path,label,class,score,flagged\n")
    seen.clear()
    err = _run(capsys, cfg, "methods[1].knn.k=2")
    assert seen == [A] and f"{A}: computing again (its scores.csv changed after it was" in err


def test_fresh_recomputes_every_method(data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, data)
    _run(capsys, cfg)
    seen = _evaluated(monkeypatch)
    err = _run(capsys, cfg, "--fresh")
    assert seen == [A, B, COLOUR] and ": reused (" not in err
    assert err.count("computing again (asked not to reuse earlier results)") == 3
    assert not any(m["reused"] for m in _results(tmp_path / "out")["methods"])


def test_report_lists_exactly_the_requested_methods(data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _run(capsys, _config(tmp_path, data))
    assert (out / "figures" / f"hist-{B}.png").is_file()
    err = _run(capsys, _config(tmp_path, data, names=(A,)))  # beta no longer requested
    res = _results(out)
    assert [m["name"] for m in res["methods"]] == [A, COLOUR]
    assert list(res["shortcut"]["methods"]) == [A, COLOUR]
    assert B not in (out / "results.json").read_text(encoding="utf-8")
    assert B not in (out / "report.html").read_text(encoding="utf-8")
    assert not (out / "figures" / f"hist-{B}.png").exists()
    assert f"benchmark method {B}: not in this benchmark;" in err
    assert (out / "methods" / B / "method.json").is_file()  # kept: listed again, it is reused
    seen = _evaluated(monkeypatch)
    err = _run(capsys, _config(tmp_path, data))
    assert seen == [] and f"{B}: reused (" in err
    assert [m["name"] for m in _results(out)["methods"]] == [A, B, COLOUR]


class BlurScorer(AnomalyScorer):
    """Reconstruction = 5x5 box blur; map = squared residual; score = mean of the map."""

    name = "blur"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        recon = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        maps = ((x - recon) ** 2).mean(dim=1)
        return ScoreBatch(scores=maps.mean(dim=(1, 2)), maps=maps, recon=recon,
                          terms={"peak": maps.amax(dim=(1, 2))})


def test_reused_outcome_is_the_computed_one_bitwise(data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores, score components, validation scores, threshold, metrics and the examples'
    images, reconstructions and maps come back bitwise; test maps are never kept."""
    from gen_ad.app.benchmark import BenchmarkConfig, PreparedMethod, benchmark_methods
    from gen_ad.config import from_dict

    cfg = from_dict(BenchmarkConfig, {
        "out": str(tmp_path / "out"), "n_boot": 20, "device": "cpu", "examples": 3,
        "data": {"test": str(data / "test"), "val": str(data / "val"), "size": 32},
        "methods": [{"knn": {"extractor": "colour-stats", "k": 3, "bank": "unused"}}],
        "fid": {"enabled": False}, "shortcut": {"colour_baseline": False, "limit": 6}})
    seen: list[list[Any]] = []  # each run's outcomes, as the figures would be drawn from
    monkeypatch.setattr(bench, "write_figures", lambda o, d: (seen.append(o), {})[1])

    def run(reuse: bool) -> Any:
        pm = PreparedMethod("blur", "generative", "box blur", [], BlurScorer(), 32,
                            str(data / "val"), None, 4)
        benchmark_methods(cfg, [pm], "cpu", progress=False, reuse=reuse)
        return seen[-1][0]

    made = run(True)
    assert made.has_maps and made.scored.maps is None  # freed once the metrics were computed
    monkeypatch.setattr(BlurScorer, "score", lambda self, x: pytest.fail("scored again"))
    back = run(True)
    assert back.reused and back.scored.maps is None and back.has_maps
    for key in ("paths", "classes"):
        assert getattr(back.scored, key) == getattr(made.scored, key)
    for a, b in ((back.scored.scores, made.scored.scores), (back.scored.labels,
                 made.scored.labels), (back.val_scores, made.val_scores),
                 (back.scored.terms["peak"], made.scored.terms["peak"])):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert back.threshold == made.threshold and back.example_index == made.example_index
    assert json.dumps(back.metrics) == json.dumps(json.loads(json.dumps(made.metrics)))
    assert back.stain_shift == made.stain_shift and back.fit_seconds == made.fit_seconds
    (xb, sb), (xm, sm) = back.examples, made.examples
    for a, b in ((xb, xm), (sb.scores, sm.scores), (sb.maps, sm.maps), (sb.recon, sm.recon),
                 (sb.terms["peak"], sm.terms["peak"])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(pytest.fail.Exception, match="scored again"):
        run(False)  # the library computes unless asked to reuse


def test_a_batch_dependent_scorer_is_reused_only_at_its_batch_size(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Diffusion ``streams: batch`` draws per batch: its scores change with the batch size, so
    a re-run at another one computes again (it was reused with other scores)."""
    monkeypatch.setattr(KNNScorer, "streams", "batch", raising=False)  # stands in for one
    cfg = _config(tmp_path, data)
    _run(capsys, cfg)
    seen = _evaluated(monkeypatch)
    assert _run(capsys, cfg).count(": reused (") == 3 and seen == []  # same batch: reused
    err = _run(capsys, cfg, "batch_size=5")
    assert seen == [A, B, COLOUR] and "other settings (batch_size)" in err


def test_a_stain_shift_that_failed_is_computed_again(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A method finished while stain normalisation was unavailable (torchstain missing) kept
    that error for ever; now its record is not reused, so the stain shift gets its figure."""
    cfg = _config(tmp_path, data)
    _run(capsys, cfg)
    rec_path = tmp_path / "out" / "methods" / A / "method.json"
    rec = json.loads(rec_path.read_text(encoding="utf-8"))
    rec["stain_shift"] = {"n": 6, "normalised_error": "stain normalisation unavailable: no "
                          "torchstain"}
    rec_path.write_text(json.dumps(rec), encoding="utf-8")
    seen = _evaluated(monkeypatch)
    err = _run(capsys, cfg)
    assert seen == [A] and f"{A}: computing again (its stain shift failed then" in err


def test_the_code_identity_is_the_sources_not_the_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A README edit or a code-free commit changed every record's code identity (hours of
    results recomputed); an editor's dangling ``.#x.py`` link crashed every benchmark."""
    import gen_ad.utils.identity as reuse
    import gen_ad.utils.provenance as provenance

    def no_git(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the commit is not part of the settings")

    monkeypatch.setattr(provenance, "source_commit", no_git)
    reuse._package_sha256.cache_clear()  # computed here, not taken from an earlier call
    assert set(reuse.code_identity()) == {"gen_ad", "sources_sha256"}
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n", encoding="utf-8")
    before = reuse.sources_sha256(tmp_path / "pkg")
    (tmp_path / "pkg" / ".#a.py").symlink_to(tmp_path / "nowhere")
    assert reuse.sources_sha256(tmp_path / "pkg") == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n", encoding="utf-8")
    assert reuse.sources_sha256(tmp_path / "pkg") != before


def test_method_names_differing_in_case_only_are_refused(data: Path, tmp_path: Path) -> None:
    from gen_ad.app.benchmark import load_benchmark_config
    from gen_ad.errors import ConfigError

    cfg = _config(tmp_path, data)
    with pytest.raises(ConfigError, match="letter case"):
        load_benchmark_config(cfg, ["methods[1].name=Alpha-KNN"])
