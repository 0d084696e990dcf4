"""Benchmark config, evaluation through the one scorer interface, results.json and report.html."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen_ad.app.benchmark import (
    BenchmarkConfig,
    PreparedMethod,
    benchmark_methods,
    example_indices,
    method_name,
    prepare_methods,
    summary_lines,
)
from gen_ad.config import from_dict
from gen_ad.data.folders import ResizeMode
from gen_ad.errors import ConfigError, DataError
from gen_ad.report.html import PNG_MAGIC, png_data_uri, render_report
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch


class BlurScorer(AnomalyScorer):
    """Reconstruction = 5x5 box blur; map = squared residual; score = mean of the map."""

    name = "blur"

    def __init__(self) -> None:
        self.fitted = 0

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        self.fitted = sum(len(b) for b in normal_batches)
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        recon = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        maps = ((x - recon) ** 2).mean(dim=1)
        return ScoreBatch(scores=maps.mean(dim=(1, 2)), maps=maps, recon=recon)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gen_ad.data.synthetic import write_folder

    root = tmp_path_factory.mktemp("bench_data")
    write_folder(root / "train", 24, 32, 0, 0.0)
    write_folder(root / "val", 16, 32, 1, 0.0)
    write_folder(root / "test", 20, 32, 2, 0.5)
    masks = root / "test_masks" / "anomalous"
    masks.mkdir(parents=True)
    for p in (root / "test" / "masks").glob("*.png"):
        os.link(p, masks / p.name)
    return {"train": root / "train", "val": root / "val", "test": root / "test",
            "masks": root / "test_masks"}


def _cfg(split: dict[str, Path], out: Path, **extra: object) -> dict:
    return {
        "out": str(out), "title": "unit <benchmark>",
        "data": {"test": str(split["test"]), "val": str(split["val"]),
                 "masks": str(split["masks"]), "classes": ["normal", "anomalous"], "size": 32},
        "methods": [{"knn": {"extractor": "resnet50", "random_init": True, "tiny": True, "k": 4,
                             "bank": str(split["train"])}}],
        "n_boot": 50, "device": "cpu", "examples": 4, "fid": {"enabled": False}, **extra,
    }


def _png_sources(html: str) -> list[str]:
    return re.findall(r"<img src='([^']*)'", html)


@pytest.mark.parametrize("name", ["demo", "pcam64", "pcam64_cpu"])
def test_shipped_benchmark_configs_load_and_validate(name: str) -> None:
    """The configs the README tells users to run parse and validate (typos fail here, not
    after an hour of training)."""
    from gen_ad.app.benchmark import load_benchmark_config

    root = Path(__file__).resolve().parents[3]
    cfg = load_benchmark_config(root / "configs" / "benchmark" / f"{name}.yaml")
    assert cfg.methods and len({m.name for m in cfg.methods}) == len(cfg.methods)
    if name.startswith("pcam"):
        assert any(m.knn is not None and m.knn.extractor == "vgg16-imagenet" for m in cfg.methods)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"data": {"test": "t", "val": "v"}}
    with pytest.raises(ConfigError, match="methods"):
        from_dict(BenchmarkConfig, base)
    with pytest.raises(ConfigError, match=r"methods\[0\].*exactly one"):
        from_dict(BenchmarkConfig, {**base, "methods": [{"run": "r", "knn": {"bank": "b"}}]})
    with pytest.raises(ConfigError, match=r"methods\[0\]\.knn\.bank"):
        from_dict(BenchmarkConfig, {**base, "methods": [{"knn": {"extractor": "uni"}}]})
    with pytest.raises(ConfigError, match=r"methods\[0\]\.knn"):
        from_dict(BenchmarkConfig, {**base, "methods": [{"knn": {"kk": 3, "bank": "b"}}]})
    dup = [{"run": "a", "scorer": "x"}, {"run": "b", "scorer": "x"}]
    with pytest.raises(ConfigError, match="duplicate method names"):
        from_dict(BenchmarkConfig, {**base, "methods": dup})
    with pytest.raises(ConfigError, match="data.val"):
        from_dict(BenchmarkConfig, {"data": {"test": "t"}, "methods": dup[:1]})


def test_method_names() -> None:
    cfg = from_dict(BenchmarkConfig, {"data": {"test": "t", "val": "v"}, "methods": [
        {"knn": {"extractor": "uni", "random_init": True, "bank": "b"}},
        {"knn": {"extractor": "virchow2", "bank": "b"}},
        {"run": "checkpoints/ddpm", "scorer": "anoddpm"},
        {"run": "checkpoints/wgan-enc"}]})
    assert [method_name(m) for m in cfg.methods] == [
        "knn-uni-random-init", "knn-virchow2", "anoddpm", "wgan-enc"]


def test_example_indices_balanced_and_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    idx = example_indices(labels, 6, seed=1)
    assert len(idx) == 6 and len(set(idx)) == 6
    assert [labels[i] for i in idx] == [1, 1, 1, 0, 0, 0]  # anomalous first
    assert idx == example_indices(labels, 6, seed=1)
    assert example_indices(labels, 0) == []
    assert len(example_indices(labels, 20)) == 13


def test_png_data_uri_checks_png(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a PNG"):
        png_data_uri(bad)


def test_benchmark_end_to_end(split: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # the shortcut check (colour baseline, stain shift) has its own tests: test_shortcut.py
    cfg = from_dict(BenchmarkConfig, _cfg(split, out, shortcut={"colour_baseline": False,
                                                                 "stain_shift": False}))
    methods = prepare_methods(cfg, "cpu")
    blur = BlurScorer()
    methods.append(PreparedMethod("blur-recon", "generative", "box-blur reconstruction (test)",
                                  ["a <note> with markup"], blur, 32, str(split["val"]), None, 8))
    results = benchmark_methods(cfg, methods, "cpu", progress=False)

    # results.json: every method, metrics with CIs, thresholds from normal validation scores
    data = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in data["methods"]]
    assert names == ["knn-resnet50-random-init", "blur-recon"]
    n_anom = len(list((split["test"] / "anomalous").glob("*.png")))
    assert data["test"] == {**data["test"], "n": 20, "n_normal": 20 - n_anom,
                            "n_anomalous": n_anom}
    for m in data["methods"]:
        auroc = m["metrics"]["auroc"]
        assert 0.0 <= auroc["low"] <= auroc["value"] <= auroc["high"] <= 1.0
        assert m["metrics"]["bootstrap"]["n_boot"] == 50
        assert m["n_val"] == 16 and m["ms_per_patch"] > 0
        assert (out / m["scores_csv"]).is_file()
    knn, bl = data["methods"]
    assert any("RANDOMLY INITIALISED" in n for n in knn["notes"])
    assert knn["has_maps"] is False and "pixel" not in knn["metrics"]
    assert bl["has_maps"] is True and 0.0 <= bl["metrics"]["pixel"]["auroc"] <= 1.0
    pixel = bl["metrics"]["pixel"]  # AUPRO and image-resampled CIs beside the pooled AUROC
    assert 0.0 <= pixel["aupro"] <= 1.0 and pixel["ci"]["n_boot"] == 50
    assert pixel["n_regions"] >= 1 and len(pixel["ci"]["aupro"]) == 2
    assert blur.fitted == 16  # fit saw the normal validation folder only

    # the blur method's AUROC equals a direct computation on its own scores
    from sklearn.metrics import roc_auc_score

    rows = (out / "methods/blur-recon/scores.csv").read_text().splitlines()[1:]
    y = [int(r.split(",")[1]) for r in rows]
    s = [float(r.split(",")[3]) for r in rows]
    assert bl["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    th = json.loads(json.dumps(bl["threshold"]))
    assert th["method"] == "iqr" and th["n"] == 16
    # the threshold is Tukey's fence of the blur scores of the 16 normal validation images
    # (scored here directly), and a test image is flagged exactly when its score is above it
    from gen_ad.data.folders import PatchFolder

    val = PatchFolder(root=str(split["val"]), size=32, classes=["normal"])
    with torch.no_grad():
        val_s = BlurScorer().score(torch.stack([val[i]["image"] for i in range(len(val))]))
    q1, q3 = np.percentile(val_s.scores.double().numpy(), [25, 75])
    assert len(val) == 16 and th["value"] == pytest.approx(q3 + 1.5 * (q3 - q1), rel=1e-6)
    flags = [int(r.split(",")[4]) for r in rows]
    assert flags == [int(v > th["value"]) for v in s]
    saved = json.loads((out / "methods/blur-recon/metrics.json").read_text())
    assert saved["flagged"] == sum(flags) and saved["threshold"]["value"] == th["value"]

    # provenance: the code and libraries that made the numbers, shown in the report too
    import gen_ad
    env = data["environment"]
    assert env["gen_ad"] == gen_ad.__version__ and env["device"] == "cpu"
    assert env["packages"]["torch"] and env["packages"]["scikit-learn"]
    # report.html: one embedded PNG per figure, all decodable; names escaped
    html = (out / "report.html").read_text()
    assert f"gen_ad {gen_ad.__version__}" in html and "diffusers" in html
    srcs = _png_sources(html)
    assert len(srcs) == len(data["figures"]) == 2 + 2 * 2  # roc, pr + hist & examples each
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    for n in names:
        assert n in html
    assert "&lt;note&gt;" in html and "<note>" not in html
    assert "unit &lt;benchmark&gt;" in html
    assert f"AUPRO@0.3 {pixel['aupro']:.3f} [" in html and "– (no maps)" in html
    assert results["report"] == str(out / "report.html")
    lines = summary_lines(results)
    assert len(lines) == 2 and lines[1].startswith("blur-recon: 20 images, ")
    assert "AUROC" in lines[1] and f"AUPRO {pixel['aupro']:.3f}" in lines[1]
    assert "AUPRO" not in lines[0]  # the KNN has no maps
    header = (out / "methods/blur-recon/scores.csv").read_text().splitlines()[0]
    assert header == "path,label,class,score,flagged"  # the engine's one format


class StdScorer(AnomalyScorer):
    """Score = the image's standard deviation (no maps)."""

    name = "std"

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(scores=x.std(dim=(1, 2, 3)))


def test_benchmark_threshold_flags_and_auroc_follow_the_scores(split: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """A method whose fence flags some test images (the blur method above flags none): the
    saved threshold is Tukey's fence of its validation scores, ``flagged`` is exactly
    ``score > threshold`` and the AUROC is scikit-learn's on the written scores."""
    from sklearn.metrics import roc_auc_score

    from gen_ad.data.folders import PatchFolder

    out = tmp_path / "bench"
    raw = _cfg(split, out, examples=0, shortcut={"colour_baseline": False,
                                                 "stain_shift": False})
    raw["methods"] = [{"knn": {"extractor": "colour-stats", "k": 2, "bank": "unused"}}]
    cfg = from_dict(BenchmarkConfig, raw)
    pm = PreparedMethod("std", "generative", "image std (test)", [], StdScorer(), 32,
                        str(split["val"]), None, 8)
    benchmark_methods(cfg, [pm], "cpu", progress=False)

    val = PatchFolder(root=str(split["val"]), size=32, classes=["normal"])
    val_s = torch.stack([val[i]["image"] for i in range(len(val))]).std(dim=(1, 2, 3))
    q1, q3 = np.percentile(val_s.double().numpy(), [25, 75])
    (rec,) = json.loads((out / "results.json").read_text())["methods"]
    value = rec["threshold"]["value"]
    assert len(val) == 16 and value == pytest.approx(q3 + 1.5 * (q3 - q1), rel=1e-6)
    rows = [r.split(",") for r in (out / "methods/std/scores.csv").read_text().splitlines()[1:]]
    scores = np.array([float(r[3]) for r in rows])
    flags = np.array([int(r[4]) for r in rows])
    assert len(rows) == 20 and 0 < flags.sum() < 20  # both outcomes occur
    assert flags.tolist() == (scores > value).astype(int).tolist()
    saved = json.loads((out / "methods/std/metrics.json").read_text())
    assert saved["flagged"] == int(flags.sum())
    labels = [int(r[1]) for r in rows]
    assert rec["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores),
                                                             abs=1e-12)


def test_fid_unavailable_is_labelled(split: dict[str, Path], tmp_path: Path) -> None:
    """Without Inception weights (offline test caches) the report says so plainly."""
    from gen_ad.app.benchmark import FID_UNAVAILABLE, generator_quality

    cfg = from_dict(BenchmarkConfig, _cfg(split, tmp_path, fid={"enabled": True, "n": 4}))
    pm = PreparedMethod("g", "generative", "d", [], BlurScorer(), 32, str(split["val"]), None, 8,
                        run=object(), run_path=str(tmp_path / "run"))
    gq = generator_quality([pm], cfg, "cpu")
    assert gq[str(tmp_path / "run")]["status"] == "n/a"
    assert gq[str(tmp_path / "run")]["label"] == FID_UNAVAILABLE


def test_fid_random_init_fallback_is_labelled(split: dict[str, Path], tmp_path: Path) -> None:
    """With the fallback, a random-init Inception distance is computed and never called FID."""
    from gen_ad.app.benchmark import generator_quality
    from gen_ad.report.html import generator_cell

    class FakeRun:
        def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1

    cfg = from_dict(BenchmarkConfig, _cfg(split, tmp_path, fid={
        "enabled": True, "n": 6, "kid": True, "random_init_fallback": True}))
    pm = PreparedMethod("g", "generative", "d", [], BlurScorer(), 32, str(split["val"]), None, 8,
                        run=FakeRun(), run_path="runX")
    rec = generator_quality([pm], cfg, "cpu")["runX"]
    assert rec["status"] == "ok" and "fid" not in rec
    assert rec["fd_inception-v3-random"] >= 0 and rec["n_fake"] == 6 and rec["n_real"] == 16
    assert "RANDOM-INIT" in rec["label"]
    cell = generator_cell(rec)
    assert "random-init Inception: not FID" in cell and "FID " not in cell.split("<br>")[0]
    # the real set is sized on its own (fid.n_real), not by the threshold set (data.val_limit)
    raw = _cfg(split, tmp_path, fid={"enabled": True, "n": 6, "n_real": 12,
                                     "random_init_fallback": True})
    raw["data"]["val_limit"] = 4
    rec = generator_quality([pm], from_dict(BenchmarkConfig, raw), "cpu")["runX"]
    assert rec["n_real"] == 12
    del raw["fid"]["n_real"]
    rec = generator_quality([pm], from_dict(BenchmarkConfig, raw), "cpu")["runX"]
    assert rec["n_real"] == 4
    raw["fid"]["n_real"] = 1
    with pytest.raises(ConfigError, match="fid.n_real"):
        from_dict(BenchmarkConfig, raw).validate()


def test_render_report_rejects_missing_figure(tmp_path: Path) -> None:
    results = {"title": "t", "created": "now", "environment": {}, "figures": {"roc": "nope.png"},
               "test": {"root": "r", "n": 2, "n_normal": 1, "n_anomalous": 1, "val": "v"},
               "methods": []}
    with pytest.raises(FileNotFoundError):
        render_report(results, tmp_path)


def test_knn_description_says_which_weights(split: dict[str, Path], tmp_path: Path) -> None:
    """A KNN row says whether its extractor is random-init, which file it loaded, or weightless."""
    from safetensors.torch import save_file

    from gen_ad.baselines.extractors import build_extractor

    tiny = build_extractor("resnet50", random_init=True, tiny=True, seed=1)
    wfile = tmp_path / "tiny-resnet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.backbone.state_dict().items()}, str(wfile))
    knn = {"k": 4, "bank": str(split["val"])}
    cfg = from_dict(BenchmarkConfig, _cfg(split, tmp_path / "b", methods=[
        {"knn": {**knn, "extractor": "resnet50", "random_init": True, "tiny": True}},
        {"knn": {**knn, "extractor": "resnet50", "tiny": True, "weights": str(wfile)}},
        {"knn": {**knn, "extractor": "colour-stats"}}]))
    rnd, real, colour = (m.description for m in prepare_methods(cfg, "cpu"))
    assert "(random-init weights)" in rnd
    assert f"(weights {wfile})" in real
    assert "(no network, no weights)" in colour


class RecordingScorer(AnomalyScorer):
    """Records every image it is fitted on or scores; score = mean intensity."""

    name = "rec"

    def __init__(self) -> None:
        self.fit_seen: list[torch.Tensor] = []
        self.score_seen: list[torch.Tensor] = []

    def fit(self, normal_batches):  # type: ignore[no-untyped-def]
        self.fit_seen += list(normal_batches)
        return self

    def score(self, x: torch.Tensor) -> ScoreBatch:
        self.score_seen.append(x.clone())
        return ScoreBatch(scores=x.mean(dim=(1, 2, 3)))


def _read_as(root: Path, classes: list[str], mode: ResizeMode) -> torch.Tensor:
    from gen_ad.data.folders import PatchFolder

    ds = PatchFolder(root=str(root), size=32, classes=classes, resize=mode)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_benchmark_reads_each_method_in_its_resize_mode(tmp_path: Path) -> None:
    """Two methods at the same size, one trained with center_crop: each is fitted, calibrated
    and tested on the 48 px patches read its own way (separate datasets, not a shared one)."""
    from gen_ad.app.benchmark import SplitCache
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "val", 6, 48, 1, 0.0)
    write_folder(tmp_path / "test", 8, 48, 2, 0.5)
    raw = {"out": str(tmp_path / "out"), "n_boot": 20, "device": "cpu", "examples": 0,
           "data": {"test": str(tmp_path / "test"), "val": str(tmp_path / "val"), "size": 32,
                    "classes": ["normal", "anomalous"]},
           "methods": [{"knn": {"extractor": "colour-stats", "k": 2, "bank": "unused"}}],
           "fid": {"enabled": False},
           "shortcut": {"colour_baseline": False, "stain_shift": False}}
    cfg = from_dict(BenchmarkConfig, raw)
    split = SplitCache(cfg.data)
    assert split.test(32, "center_crop") is not split.test(32, "resize")
    assert split.test(32) is split.test(32, "resize")
    val = str(tmp_path / "val")
    assert split.normal(val, 32, None, "center_crop") is not split.normal(val, 32, None)
    modes: tuple[ResizeMode, ...] = ("resize", "center_crop")
    scorers = {mode: RecordingScorer() for mode in modes}
    methods = [PreparedMethod(mode, "generative", "d", [], scorers[mode], 32, val, None, 4,
                              resize=mode) for mode in modes]
    benchmark_methods(cfg, methods, "cpu", progress=False)
    for mode, sc in scorers.items():
        normal = _read_as(tmp_path / "val", ["normal"], mode)
        test = _read_as(tmp_path / "test", ["normal", "anomalous"], mode)
        assert torch.equal(torch.cat(sc.fit_seen), normal)
        seen = torch.cat(sc.score_seen)  # the threshold (val) set, then the test split
        assert torch.equal(seen, torch.cat([normal, test]))
    crop, rescaled = (torch.cat(scorers[m].score_seen) for m in ("center_crop", "resize"))
    assert not torch.equal(crop, rescaled)  # the modes differ on these 48 px patches


def test_run_method_takes_the_run_resize_mode(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A benchmark method of a run trained with center_crop reads the split that way."""
    import types

    import gen_ad.app.benchmark as bench
    from gen_ad.app.evaluate import LoadedScorer

    run = types.SimpleNamespace(family=types.SimpleNamespace(name="wgan"), step=1)
    monkeypatch.setattr(bench, "load_run", lambda path, device="cpu": run)
    monkeypatch.setattr(bench, "run_scorers", lambda *a, **kw: {
        "x": LoadedScorer(BlurScorer(), 32, "x", resize="center_crop")})
    cfg = from_dict(BenchmarkConfig, {"data": {"test": "t", "val": "v"},
                                      "methods": [{"run": str(tmp_path), "scorer": "x"}]})
    (pm,) = prepare_methods(cfg, "cpu")
    assert pm.resize == "center_crop" and pm.run_path == str(tmp_path)


def test_fid_real_set_is_the_threshold_subset_read_as_the_run_trained(
        split: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FID reference is the validation subset the thresholds use (a seeded random choice,
    not the first sorted files), stain-normalised when the run trained so."""
    import importlib.util

    from PIL import Image

    import gen_ad.app.benchmark as bench
    from gen_ad.app.benchmark import SplitCache, dataset_paths, generator_quality
    from gen_ad.data.folders import read_rgb
    from gen_ad.metrics import fid
    from gen_ad.metrics.inception import custom_extractor

    if importlib.util.find_spec("torchstain") is None:
        pytest.skip("torchstain is not installed")
    from gen_ad.data.stain import StainNormalizer

    ext = custom_extractor("meanstd", lambda x: torch.cat([x.float().mean((2, 3)),
                                                          x.float().std((2, 3))], 1),
                           device="cpu")
    monkeypatch.setattr(bench, "_fid_extractor", lambda fc, device: (ext, None))
    seen: list[dict] = []
    real_stats = fid.real_stats

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        stats = real_stats(*args, **kwargs)
        seen.append({**kwargs, "stats": stats})
        return stats

    monkeypatch.setattr(fid, "real_stats", recording)
    ref = tmp_path / "ref.png"
    Image.fromarray(read_rgb(sorted((split["val"] / "normal").iterdir())[3])).save(ref)
    stain = StainNormalizer(method="reinhard", reference=ref)

    class StainRun:
        stain_ref = ref

        def __init__(self) -> None:
            self.stain = stain

        def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
            return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    raw = _cfg(split, tmp_path, fid={"enabled": True, "n": 6, "kid": False})
    raw["data"]["val_limit"] = 5
    cfg = from_dict(BenchmarkConfig, raw)
    pm = PreparedMethod("g", "generative", "d", [], BlurScorer(), 32, str(split["val"]), None, 8,
                        run=StainRun(), run_path="runS")
    rec = generator_quality([pm], cfg, "cpu")["runS"]
    assert rec["status"] == "ok" and rec["n_real"] == 5
    val = SplitCache(cfg.data, cfg.seed).normal(cfg.data.val, 32, 5, "resize")
    files = dataset_paths(val)
    assert files is not None and [str(f) for f in seen[-1]["files"]] == files
    assert files != [str(p) for p in sorted((split["val"] / "normal").iterdir())[:5]]
    images = torch.stack([torch.from_numpy(stain(val.dataset.rgb8(i)))  # type: ignore[attr-defined]
                          for i in val.indices]).permute(0, 3, 1, 2)  # type: ignore[attr-defined]
    torch.testing.assert_close(seen[-1]["stats"].features, ext(images.contiguous()), rtol=0,
                               atol=0)


def test_bad_entries_fail_before_scoring_and_before_the_output_folder(
        split: dict[str, Path], tmp_path: Path) -> None:
    """A too-small KNN bank died after minutes of scoring (k=50 vs a 48-image bank), and a
    missing run left a lock in an output folder it had just made."""
    from gen_ad.app.benchmark import run_benchmark
    from gen_ad.errors import CheckpointError, ConfigError

    out = tmp_path / "out"
    big_k = _cfg(split, out, methods=[{"knn": {"extractor": "colour-stats", "k": 24,
                                              "bank": str(split["train"])}}])
    with pytest.raises(ConfigError, match=r"k=24 needs a bank of at least 25 images; .* gives 24"):
        run_benchmark(from_dict(BenchmarkConfig, big_k), progress=False)
    assert not out.exists()
    no_run = _cfg(split, out, methods=[{"name": "fanogan", "run": "checkpoints/demo/runs/none",
                                        "scorer": "fanogan"}])
    with pytest.raises(CheckpointError,
                       match=r"method 'fanogan': run folder not found.*gen-ad demo"):
        run_benchmark(from_dict(BenchmarkConfig, no_run), progress=False)
    assert not out.exists()
    missing_test = _cfg(split, out)
    missing_test["data"]["test"] = str(tmp_path / "nowhere")
    with pytest.raises(DataError):
        run_benchmark(from_dict(BenchmarkConfig, missing_test), progress=False)
    assert not out.exists()
