"""KNN baseline: exact search equals scikit-learn, IVF recall, bank extension, chunking,
the torch fallback, leave-one-out calibration, the scorer and the CLI."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from gen_ad.baselines.extractors import build_extractor
from gen_ad.baselines.knn import (
    FeatureBank,
    KNNIndex,
    KNNScorer,
    SearchSettings,
    build_bank,
    calibrate_bank,
    extend_bank,
    reduce_distances,
)
from gen_ad.errors import ConfigError, DataError
from gen_ad.scoring.thresholds import iqr_threshold

pytest.importorskip("faiss")


def _data(n: int = 2000, d: int = 16, q: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32),
            rng.normal(size=(q, d)).astype(np.float32))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("budget_mb", [64.0, 0.05])  # in-memory index / streamed blocks
def test_exact_search_equals_sklearn(metric: str, backend: str, budget_mb: float) -> None:
    x, q = _data()
    ref = NearestNeighbors(n_neighbors=25, algorithm="brute",
                           metric="euclidean" if metric == "l2" else "cosine").fit(x)
    rd, ri = ref.kneighbors(q)
    index = KNNIndex(x, SearchSettings(metric=metric, backend=backend, memory_budget_mb=budget_mb))
    d, i = index.search(q, 25)
    assert d.shape == (40, 25) and i.shape == (40, 25)
    np.testing.assert_allclose(d, rd, atol=1e-4, rtol=1e-4)  # Euclidean, not squared
    np.testing.assert_array_equal(i, ri)
    assert np.all(np.diff(d, axis=1) >= 0)


def test_chunked_equals_unchunked_and_torch_equals_faiss() -> None:
    x, q = _data(n=3000, q=300)
    big = KNNIndex(x, SearchSettings(memory_budget_mb=512.0))
    d0, i0 = big.search(q, 50)
    small = KNNIndex(x, SearchSettings(memory_budget_mb=0.3))  # many query chunks + bank blocks
    assert not small.in_memory and small._block_rows() < 3000 and small._query_rows(50, 100) < 300
    d1, i1 = small.search(q, 50)
    tch = KNNIndex(x, SearchSettings(backend="torch", memory_budget_mb=0.3))
    d2, i2 = tch.search(q, 50)
    np.testing.assert_allclose(d1, d0, atol=1e-5)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(d2, d0, atol=1e-4)
    np.testing.assert_array_equal(i2, i0)


def test_ivf_recall_at_200() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100_000, 32)).astype(np.float32)
    q = rng.normal(size=(100, 32)).astype(np.float32)
    _, exact = KNNIndex(x, SearchSettings()).search(q, 200)
    ivf = KNNIndex(x, SearchSettings(index="ivf", nlist=256, target_recall=0.97))
    d, approx = ivf.search(q, 200)
    recall = np.mean([len(np.intersect1d(a, b)) / 200 for a, b in zip(exact, approx)])
    assert recall >= 0.95
    assert ivf.tuned["nprobe"] < 256  # really approximate, not an exhaustive scan
    assert np.all(np.diff(d, axis=1) >= -1e-6)


def test_leave_one_out_excludes_self() -> None:
    x, _ = _data(n=500)
    index = KNNIndex(x, SearchSettings())
    ids = np.array([0, 7, 499])
    d, i = index.search(x[ids], 5, exclude=ids)
    assert not np.any(i == ids[:, None])
    full_d, full_i = index.search(x[ids], 6)
    np.testing.assert_array_equal(full_i[:, 0], ids)  # itself is its own nearest
    np.testing.assert_array_equal(i, full_i[:, 1:])
    np.testing.assert_allclose(d, full_d[:, 1:], atol=1e-6)
    with pytest.raises(ConfigError, match="k=500"):
        index.search(x[:2], 500, exclude=np.array([0, 1]))


def test_reductions() -> None:
    d = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(reduce_distances(d, "mean"), [3.0, 1.0])
    np.testing.assert_allclose(reduce_distances(d, "kth"), [6.0, 3.0])


def _batches(n: int, seed: int, bs: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    return list(x.split(bs))


@pytest.fixture(scope="module")
def extractor() -> torch.nn.Module:
    return build_extractor("dino-vits16", random_init=True, tiny=True)


def test_extending_bank_equals_building_at_once(tmp_path, extractor) -> None:
    a, b = _batches(48, 0), _batches(32, 1)
    info = {"name": "dino-vits16", "random_init": True, "tiny": True}
    once = build_bank(extractor, a + b, tmp_path / "once", info, k=10, calib_size=40)
    grown = build_bank(extractor, a, tmp_path / "grown", info, k=10, calib_size=40)
    shard = tmp_path / "grown" / grown.meta["shards"][0]["file"]
    first_shard = shard.read_bytes()
    extend_bank(grown, extractor, b)
    assert shard.read_bytes() == first_shard  # untouched
    assert grown.meta["shards"][1]["file"] != shard.name  # shard names are never reused
    assert grown.count == once.count == 80
    np.testing.assert_array_equal(grown.load(), once.load())
    t1 = json.loads((tmp_path / "once" / "threshold.json").read_text())
    t2 = json.loads((tmp_path / "grown" / "threshold.json").read_text())
    assert t1["value"] == pytest.approx(t2["value"], rel=1e-6)
    q = extractor(_batches(8, 2)[0]).numpy()
    np.testing.assert_allclose(KNNIndex(FeatureBank(tmp_path / "grown")).search(q, 10)[0],
                               KNNIndex(FeatureBank(tmp_path / "once")).search(q, 10)[0],
                               rtol=1e-6)


def test_threshold_is_iqr_of_leave_one_out_scores(tmp_path, extractor) -> None:
    bank = build_bank(extractor, _batches(64, 3), tmp_path / "bank", {"name": "x"}, k=8,
                      calib_size=30)
    ids, scores = FeatureBank(tmp_path / "bank").calibration()
    assert len(ids) == 30 and len(set(ids)) == 30
    feats = bank.load()
    ref = []
    for i in ids:  # brute force: mean Euclidean distance to the 8 nearest *other* vectors
        dist = np.sqrt(((feats - feats[i]) ** 2).sum(1).astype(np.float64))
        dist[i] = np.inf
        ref.append(np.sort(dist)[:8].mean())
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5)
    thr = json.loads((tmp_path / "bank" / "threshold.json").read_text())
    q1, q3 = np.percentile(scores, [25, 75])
    assert thr["value"] == pytest.approx(q3 + 1.5 * (q3 - q1)) == pytest.approx(
        iqr_threshold(scores))


def test_scorer_fit_and_score(extractor) -> None:
    scorer = KNNScorer(extractor, k=5, calib_size=50)
    scorer.fit(_batches(64, 4))
    assert scorer.name == "knn" and scorer.threshold is not None
    normal = scorer.score(_batches(8, 5)[0]).scores
    odd = scorer.score(torch.ones(4, 3, 32, 32)).scores  # flat white patches
    assert normal.shape == (8,) and odd.shape == (4,)
    assert odd.min() > normal.max()
    with pytest.raises(ConfigError, match="no bank"):
        KNNScorer(extractor).score(torch.zeros(1, 3, 32, 32))


def test_cli_fit_and_score(tmp_path, capsys) -> None:
    from PIL import Image

    from gen_ad.cli import main

    rng = np.random.default_rng(0)
    for cls, n, bright in (("normal", 24, 0), ("tumor", 4, 1)):
        d = tmp_path / "data" / cls
        d.mkdir(parents=True)
        for j in range(n):
            arr = rng.integers(100, 160, size=(24, 24, 3), dtype=np.uint8)
            if bright:
                arr[:] = 250
            Image.fromarray(arr).save(d / f"{j:03d}.png")
    bank = tmp_path / "bank"
    assert main(["knn", "fit", "--extractor", "resnet50", "--random-init", "--tiny",
                 "--normal", str(tmp_path / "data"), "--out", str(bank), "--k", "5",
                 "--batch-size", "16", "--workers", "0", "--device", "cpu"]) == 0
    meta = json.loads((bank / "bank.json").read_text())
    assert meta["count"] == 24 and meta["dim"] == 2048  # normal/ only
    out = tmp_path / "out"
    assert main(["knn", "score", str(bank), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,label,class,score,flagged" and len(lines) == 29
    flagged = (out / "flagged.csv").read_text().splitlines()
    assert len(flagged) - 1 == sum(int(r.rsplit(",", 1)[1]) for r in lines[1:])
    # a flat folder carries no labels: the label column stays empty and no AUROC is claimed
    flat = tmp_path / "data" / "tumor"
    assert main(["knn", "score", str(bank), "--data", str(flat), "--out", str(tmp_path / "flat"),
                 "--workers", "0", "--device", "cpu"]) == 0
    assert "AUROC" not in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "flat" / "scores.csv")))
    assert len(rows) == 4 and {r["label"] for r in rows} == {""}
    assert "auroc" not in json.loads((tmp_path / "flat" / "metrics.json").read_text())
    assert main(["knn", "score", str(tmp_path / "nobank"), "--data", str(tmp_path / "data"),
                 "--out", str(out), "--workers", "0"]) == 2


def test_bank_of_an_earlier_extractor_definition_is_refused(tmp_path, capsys) -> None:
    """A bank whose extractor was defined differently (the first vgg16-imagenet: relu4_3 +
    relu5_3, 1024-d) cannot be scored with today's vectors: a clear error, not wrong scores."""
    from gen_ad.baselines.knn import extractor_from_info
    from gen_ad.cli import main

    info = {"name": "vgg16-imagenet", "arch": "gen_ad:vgg16-conv45", "dim": 1024,
            "random_init": True}
    with pytest.raises(ConfigError, match=r"as gen_ad:vgg16-conv45; .* gen_ad:vgg16-conv234: "
                                          r"rebuild the bank with `gen-ad knn fit"):
        extractor_from_info(info)
    with pytest.raises(ConfigError, match="holds 1024-d vectors .* computes 896-d"):
        extractor_from_info({**info, "arch": "gen_ad:vgg16-conv234"})
    ext = extractor_from_info({**info, "arch": "gen_ad:vgg16-conv234", "dim": 896})
    assert ext.dim == 896
    bank = FeatureBank.create(tmp_path / "bank", 1024, info)
    bank.append(np.zeros((4, 1024), np.float32))
    data = tmp_path / "data" / "normal"
    data.mkdir(parents=True)
    assert main(["knn", "score", str(tmp_path / "bank"), "--data", str(data.parent), "--out",
                 str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]) == 2
    assert "rebuild the bank" in capsys.readouterr().err


def test_bench_smoke_prints_one_json_line(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("knn.py")
    assert "hardware" in rec and rec["hardware"]["cpu"]
    settings = rec["peers"]["settings"]
    assert settings["ours"]["bank_resident"] and "addmm" in settings["plain_matmul_topk"]["op"]
    assert rec["settings"]["ours_memory_budget_bytes"] == 1 << 40


def test_calibrating_a_knn_scorer_uses_leave_one_out_scores(extractor) -> None:
    """The engine's fit-then-threshold must not let the bank images find themselves."""
    from torch.utils.data import TensorDataset

    from gen_ad.app.evaluate import calibrate_scorer
    from gen_ad.scoring.thresholds import calibrate

    class Images(TensorDataset):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": self.tensors[0][i]}

    images = torch.cat(_batches(48, 6))
    scorer = KNNScorer(extractor, k=5, calib_size=48)
    th = calibrate_scorer(scorer, Images(images), batch_size=16)
    assert th.value == pytest.approx(calibrate(scorer.fit_scores(), method="iqr").value)
    rescored = scorer.score(images).scores.numpy()  # each image its own nearest neighbour
    assert th.value > iqr_threshold(rescored)


def _loo_reference(bank: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Brute force: mean Euclidean distance to the k nearest rows that differ from the query."""
    out = []
    for j in ids:
        d = np.sqrt(((bank.astype(np.float64) - bank[j]) ** 2).sum(1))
        d[d == 0] = np.inf  # its own row and its identical copies
        out.append(np.sort(d)[:k].mean())
    return np.array(out)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_leave_one_out_also_leaves_out_identical_rows(backend: str) -> None:
    """A bank holding every image twice (or three times) must not score each point against its
    twin at distance 0: the threshold stays that of the unique bank."""
    x, _ = _data(n=300, d=8)
    settings = SearchSettings(backend=backend)  # type: ignore[arg-type]
    ids1, once = calibrate_bank(KNNIndex(x, settings), 1, calib_size=300)
    twice = KNNIndex(np.concatenate([x, x]), settings)
    ids2, s2 = calibrate_bank(twice, 1, calib_size=600)
    np.testing.assert_allclose(s2, once[ids2 % 300], rtol=1e-6)  # not 0
    thrice = np.concatenate([x, x, x])  # more copies than the first k+1 candidates hold
    ids3, s3 = calibrate_bank(KNNIndex(thrice, settings), 5, calib_size=200)
    np.testing.assert_allclose(s3, _loo_reference(thrice, ids3, 5), rtol=1e-5)
    d, i = twice.search(x[:3], 4, exclude=np.array([0, 1, 2]))
    assert not np.isin(i, [0, 1, 2, 300, 301, 302]).any() and (d > 0).all()


def test_leave_one_out_with_too_few_distinct_rows_is_a_clear_error() -> None:
    x, _ = _data(n=3, d=4)
    index = KNNIndex(np.concatenate([x] * 4), SearchSettings())
    calibrate_bank(index, 8)  # each row has 8 others that differ from it
    with pytest.raises(DataError, match=r"fewer than k=9 vectors that differ .* \(duplicated"):
        calibrate_bank(index, 9)


def test_ivf_missing_neighbours_are_searched_exactly() -> None:
    """nprobe=1 of 10 lists holds about 40 vectors: k=100 must not return faiss' -1 ids (and
    ~1.8e19 distances) but the exact neighbours, with a warning naming nprobe."""
    x, q = _data(n=400, d=8, q=6)
    ivf = KNNIndex(x, SearchSettings(index="ivf", nlist=10, nprobe=1, use_gpu=False))
    with pytest.warns(UserWarning, match=r"fewer than k=100 neighbours .*\(raise nprobe"):
        d, i = ivf.search(q, 100)
    de, ie = KNNIndex(x, SearchSettings()).search(q, 100)
    assert (i >= 0).all() and d.max() < 100
    np.testing.assert_array_equal(i, ie)
    np.testing.assert_allclose(d, de, rtol=1e-5)
    with pytest.warns(UserWarning, match="raise nprobe"):
        _, scores = calibrate_bank(ivf, 100, calib_size=20)
    assert scores.max() < 100


def _path_batches(paths: list[str], seed: int) -> list[dict]:
    images = torch.cat(_batches(len(paths), seed))
    return [{"image": images[s:s + 8], "path": paths[s:s + 8]} for s in range(0, len(paths), 8)]


def test_extend_skips_images_already_in_the_bank(tmp_path, extractor) -> None:
    paths = [str(tmp_path / f"img{j:02d}.png") for j in range(32)]
    bank = build_bank(extractor, _path_batches(paths, 0), tmp_path / "bank", {"name": "x"},
                      k=5, calib_size=32)
    before = json.loads((tmp_path / "bank" / "threshold.json").read_text())["value"]
    more = [str(tmp_path / f"new{j:02d}.png") for j in range(8)]
    with pytest.warns(UserWarning, match="skipped 32 images already in the bank"):
        extend_bank(bank, extractor, _path_batches(paths + more, 0))  # the folder again, + 8
    assert bank.count == 40 and bank.paths == paths + more
    again = build_bank(extractor, _path_batches(paths + more, 0), tmp_path / "once",
                       {"name": "x"}, k=5, calib_size=32)
    np.testing.assert_array_equal(bank.load(), again.load())
    assert before > 0


def test_bank_records_precision_and_queries_use_it(tmp_path, extractor, monkeypatch) -> None:
    """A bank records its embedding precision; a scorer embeds queries in the bank's precision
    where the device has it, else fp32 with a warning; an older bank (no record) warns."""
    import gen_ad.baselines.knn as knn

    bank = build_bank(extractor, _batches(32, 0), tmp_path / "bank", {"name": "x"}, k=3,
                      calib_size=20)
    assert bank.meta["extractor"]["precision"] == "fp32"
    x = _batches(4, 9)[0]
    fp32 = KNNScorer(extractor, bank, k=3).score(x).scores
    bank.meta["extractor"]["precision"] = "bf16"  # as fitted on a GPU
    bank.save_meta()
    with pytest.warns(UserWarning, match="embedded in bf16 but cpu has no bf16"):
        sc = KNNScorer(extractor, FeatureBank(tmp_path / "bank"), k=3)
    assert sc.precision == "fp32"
    torch.testing.assert_close(sc.score(x).scores, fp32)
    monkeypatch.setattr(knn, "bf16_supported", lambda device: True)  # a device with bf16
    sc = KNNScorer(extractor, FeatureBank(tmp_path / "bank"), k=3)
    assert sc.precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sc.score_features(extractor(x).float())
    np.testing.assert_allclose(sc.score(x).scores.numpy(), ref, rtol=1e-6)
    assert not np.allclose(ref, fp32.numpy(), rtol=1e-6, atol=0)
    del bank.meta["extractor"]["precision"]
    bank.save_meta()
    with pytest.warns(UserWarning, match="does not record its embedding precision"):
        assert KNNScorer(extractor, FeatureBank(tmp_path / "bank"), k=3).precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be one of"):
        build_bank(extractor, _batches(8, 0), tmp_path / "b2", {"name": "x"},
                   precision="fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize(("metric", "index"), [("cosine", "flat"), ("l2", "ivf"),
                                               ("cosine", "ivf")])
def test_identical_rows_are_left_out_for_cosine_and_ivf(metric: str, index: str) -> None:
    """IVF fp32 scores and the cosine re-rank are not exactly 0 for a twin: still left out."""
    x, _ = _data(n=400, d=8)
    st = {"metric": metric, "index": index, "use_gpu": False}
    if index == "ivf":
        st |= {"nlist": 5, "nprobe": 5}  # every list probed: comparable with the flat search
    _, once = calibrate_bank(KNNIndex(x, SearchSettings(**st)), 1, calib_size=400)
    ids, twice = calibrate_bank(KNNIndex(np.concatenate([x, x]), SearchSettings(**st)), 1,
                                calib_size=800)
    assert twice.min() > 0
    np.testing.assert_allclose(twice, once[ids % 400], rtol=1e-4, atol=1e-6)


def test_a_bank_built_with_older_image_decoding_is_not_extended(tmp_path, extractor) -> None:
    """Extending a bank fitted before a decoder change (TIFF orientation) would mix features
    of two decodings; the bank records its decoder version and extend refuses another."""
    from gen_ad.data.folders import DECODER_VERSION
    from gen_ad.errors import ConfigError

    info = {"name": "dino-vits16", "random_init": True, "tiny": True}
    bank = build_bank(extractor, _batches(24, 0), tmp_path / "b", info, k=5, calib_size=20)
    assert json.loads((tmp_path / "b" / "bank.json").read_text())["decoder"] == DECODER_VERSION
    del bank.meta["decoder"]  # as written by an older gen_ad
    with pytest.raises(ConfigError, match="image decoding version 1"):
        extend_bank(bank, extractor, _batches(8, 1))
