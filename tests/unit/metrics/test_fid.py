"""FID/KID: agreement with torch-fidelity, cache, offline weights, generators, training monitor.

Inception runs at 299x299 on CPU and the Fréchet distance on 2048-d features needs the eigenvalues
of a 2048x2048 matrix, so most tests use torch-fidelity's 64-d Inception layer
(``feature_layer_fid="64"``, same code path, cheap) on tiny sets (6 images of 32x32), and one test
checks the standard 2048-d FID end to end on 4 images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.cli import main
from gen_ad.errors import ConfigError, DataError, WeightsNotFoundError
from gen_ad.metrics import fid
from gen_ad.metrics import inception as inc
from gen_ad.utils.download import offline
from gen_ad.utils.io import torch_save

needs_torchstain = pytest.mark.skipif(importlib.util.find_spec("torchstain") is None,
                                      reason="torchstain is not installed (pip install torchstain)")
N = 6
REPO = Path(__file__).resolve().parents[3]


def _smooth(rs: np.random.RandomState, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    chans = [rs.rand() * (0.5 + 0.5 * np.sin(6 * xx * rs.rand() + 6 * yy * rs.rand()))
             for _ in range(3)]
    return (255 * np.stack(chans, -1)).round().astype(np.uint8)


def _write_set(folder: Path, kind: str, n: int = N, seed: int = 0, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    for i in range(n):
        img = _smooth(rs, size) if kind == "smooth" else rs.randint(0, 256, (size, size, 3))
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _load_folder(folder: Path) -> torch.Tensor:
    """Images of a folder as float [-1,1] [N,3,H,W], sorted by name."""
    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cheap(name: str = "meanstd", calls: list[int] | None = None) -> inc.FeatureExtractor:
    """A fast extractor: per-channel mean and std (D=6); records batch sizes in ``calls``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(len(x))
        xf = x.float()
        return torch.cat([xf.mean((2, 3)), xf.std((2, 3))], 1)

    return inc.custom_extractor(name, fn, identity="v1", device="cpu")


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Random-init Inception weights saved by the test, and two small image folders.

    The weights file's sha256 is added to the known FID Inceptions for this module's tests, so
    these random weights follow the real FID path (labels ``fid``/``fid_64``), as the real file
    would.
    """
    root = tmp_path_factory.mktemp("fid_sets")
    weights = root / "inception-random.pth"
    torch_save(weights, inc.random_inception_state_dict(seed=0))
    known = (*inc._KNOWN_FILE_SHA256_PREFIXES, inc.weights_digests(weights).file)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inc, "_KNOWN_FILE_SHA256_PREFIXES", known)
        yield {"weights": weights, "a": _write_set(root / "a", "smooth", seed=1),
               "b": _write_set(root / "b", "noise", seed=2)}


@pytest.fixture(scope="module")
def inception(sets: dict[str, Path]) -> inc.FeatureExtractor:
    return inc.load_inception(sets["weights"], device="cpu", layer="64")


@pytest.fixture(scope="module")
def reference(sets: dict[str, Path]) -> dict[str, float]:
    """torch-fidelity's own FID/KID on the two folders with the same weights file."""
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(sets["a"]), input2=str(sets["b"]), fid=True, kid=True, kid_subset_size=N,
        feature_layer_fid="64", feature_layer_kid="64",
        feature_extractor_weights_path=str(sets["weights"]), cuda=False, cache=False,
        verbose=False, save_cpu_ram=True)


@pytest.fixture(scope="module")
def folder_feats(sets: dict[str, Path], inception: inc.FeatureExtractor
                 ) -> tuple[fid.SetStats, torch.Tensor]:
    """Our real statistics of set a (no cache) and our folder features of set b."""
    ref = fid.real_stats(sets["a"], inception, use_cache=False)
    return ref, fid.fake_features(sets["b"], inception)


# ----------------------------------------------------------------------------- torch-fidelity


def test_cli_fid_kid_equal_torch_fidelity_and_cache_hit(
        sets: dict[str, Path], reference: dict[str, float], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    descs: list[str] = []
    real_extract = fid._extract

    def counting(batches, extractor, total, desc):  # type: ignore[no-untyped-def]
        descs.append(desc)
        return real_extract(batches, extractor, total, desc)

    monkeypatch.setattr(fid, "_extract", counting)
    argv = ["fid", str(sets["a"]), str(sets["b"]), "--inception-weights", str(sets["weights"]),
            "--kid", "--device", "cpu", "--feature-layer", "64"]
    rc, out, _ = _run_cli(argv, capsys)
    assert rc == 0
    assert len(out.strip().splitlines()) == 1
    res = json.loads(out)
    assert res["fid_64"] > 1e-3  # the two sets differ clearly
    assert res["fid_64"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-4,
                                          abs=1e-6)
    assert res["kid_64_mean"] == pytest.approx(reference["kernel_inception_distance_mean"],
                                               rel=1e-4, abs=1e-8)
    # equal sets no larger than a subset: every subset is both whole sets, so torch-fidelity's
    # spread is rounding noise (about 1e-7); gen_ad reports none
    assert res["kid_64_std"] is None and reference["kernel_inception_distance_std"] < 1e-5
    assert (res["n_real"], res["n_fake"], res["kid_64_subset_size"]) == (N, N, N)
    assert res["extractor"] == "inception-v3-compat" and res["cache_hit"] is False
    assert descs == ["real features", "fake features"]
    cached = list((Path(fid.cache_dir()) / "fid").glob("*.safetensors"))
    assert len(cached) == 1

    rc, out, _ = _run_cli(argv, capsys)
    res2 = json.loads(out)
    assert rc == 0 and res2["cache_hit"] is True
    assert descs == ["real features", "fake features", "fake features"]  # real not recomputed
    assert res2["fid_64"] == res["fid_64"] and res2["kid_64_mean"] == res["kid_64_mean"]


@pytest.mark.slow  # two eigendecompositions of 2048x2048 matrices (ours and torch-fidelity's)
def test_cli_default_fid_2048_equals_torch_fidelity(
        tmp_path: Path, sets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import torch_fidelity

    a = _write_set(tmp_path / "a", "smooth", n=4, seed=5)
    b = _write_set(tmp_path / "b", "noise", n=4, seed=6)
    rc, out, _ = _run_cli(["fid", str(a), str(b), "--inception-weights", str(sets["weights"]),
                           "--device", "cpu"], capsys)
    res = json.loads(out)
    ref = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, feature_extractor_weights_path=str(sets["weights"]),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True)
    assert rc == 0 and res["extractor"] == "inception-v3-compat"
    assert res["fid"] > 1e-3
    assert res["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4, abs=1e-6)


def test_generator_path_equals_folder_path(
        sets: dict[str, Path], inception: inc.FeatureExtractor, reference: dict[str, float],
        folder_feats: tuple[fid.SetStats, torch.Tensor]) -> None:
    images = _load_folder(sets["b"])
    seen: list[int] = []

    def sample_fn(n: int, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(generator, torch.Generator)
        start = sum(seen)
        seen.append(n)
        return images[start:start + n]

    ref, feats_folder = folder_feats
    feats_gen = fid.fake_features(sample_fn, inception, n=N, batch_size=4)
    assert seen == [4, 2]  # batched
    torch.testing.assert_close(feats_gen, feats_folder, rtol=1e-5, atol=1e-6)
    res = fid.distances(ref, feats_gen, inception, kid=True)
    assert res["fid_64"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-4)
    assert res["kid_64_mean"] == pytest.approx(reference["kernel_inception_distance_mean"],
                                               rel=1e-4, abs=1e-8)


def test_fid_of_a_set_against_itself_is_zero(
        folder_feats: tuple[fid.SetStats, torch.Tensor], inception: inc.FeatureExtractor) -> None:
    ref, feats_b = folder_feats
    same = fid.distances(ref, ref.features, inception, kid=True)
    other = fid.distances(ref, feats_b, inception, kid=True)
    assert abs(same["fid_64"]) < 1e-6 * other["fid_64"] + 1e-9
    # the unbiased KID of a set with itself is (2/m)(mean off-diagonal k - mean diagonal k) < 0
    f = ref.features.double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    off = (k.sum() - k.diagonal().sum()) / (N * (N - 1))
    expected = float(2 / N * (off - k.diagonal().mean()))
    assert same["kid_64_mean"] == pytest.approx(expected, rel=1e-4)
    assert expected < 0 < other["kid_64_mean"]


def test_bad_samples_are_clear_errors() -> None:
    ext = _cheap()
    nan = lambda n, g: torch.full((n, 3, 8, 8), float("nan"))  # noqa: E731
    with pytest.raises(DataError, match="non-finite"):
        fid.fake_features(nan, ext, n=4)
    gray = lambda n, g: torch.zeros(n, 1, 8, 8)  # noqa: E731
    with pytest.raises(DataError, match=r"\[B,3,H,W\]"):
        fid.fake_features(gray, ext, n=4)
    short = lambda n, g: torch.zeros(n - 1, 3, 8, 8)  # noqa: E731
    with pytest.raises(DataError, match="were asked for"):
        fid.fake_features(short, ext, n=4)
    with pytest.raises(ConfigError, match=">= 2"):
        fid.fake_features(lambda n, g: torch.zeros(n, 3, 8, 8), ext, n=1)


# ----------------------------------------------------------------------------- cache


def test_cache_is_keyed_by_content_resolution_and_extractor(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "real", "smooth", n=5)
    calls: list[int] = []
    ext = _cheap(calls=calls)
    first = fid.real_stats(folder, ext, batch_size=2)
    assert calls == [2, 2, 1] and not first.cache_hit
    second = fid.real_stats(folder, ext, batch_size=2)
    assert second.cache_hit and calls == [2, 2, 1]
    torch.testing.assert_close(second.features, first.features, rtol=0, atol=0)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    assert second.mu.dtype == np.float32 and second.sigma.dtype == np.float64

    assert not fid.real_stats(folder, ext, size=16).cache_hit  # resolution is in the key
    assert not fid.real_stats(folder, _cheap("other")).cache_hit  # extractor is in the key
    assert not fid.real_stats(folder, ext, max_images=4).cache_hit  # file list is in the key
    n_calls = len(calls)
    arr = np.asarray(Image.open(folder / "002.png")).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(folder / "002.png")  # one pixel of one file changes
    assert not fid.real_stats(folder, ext).cache_hit and len(calls) > n_calls
    assert fid.real_stats(folder, ext, use_cache=True).cache_hit


def test_in_memory_real_set_is_cached_by_pixels(tmp_path: Path) -> None:
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    ext = _cheap()
    assert not fid.real_stats(x, ext).cache_hit
    assert fid.real_stats(x.clone(), ext).cache_hit
    dataset = [{"image": img, "label": 0} for img in x]
    assert fid.real_stats(dataset, ext).cache_hit  # same pixels through a Dataset
    assert not fid.real_stats(x.flip(0), ext).cache_hit


def test_cache_key_holds_library_versions_and_device(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow (bicubic resizing), torch-fidelity and the device type (TF32 on CUDA) change the
    features, so a cache written under others is not reused."""
    import dataclasses

    import PIL
    import torch_fidelity

    folder = _write_set(tmp_path / "real", "smooth", n=3)
    ext = _cheap()
    assert not fid.real_stats(folder, ext, size=16).cache_hit
    assert fid.real_stats(folder, ext, size=16).cache_hit
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    assert not fid.real_stats(folder, ext, size=16).cache_hit
    monkeypatch.setattr(torch_fidelity, "__version__", "0.0.1")
    assert not fid.real_stats(folder, ext, size=16).cache_hit
    files = fid.list_images(folder)
    on_cuda = dataclasses.replace(ext, device=torch.device("cuda"))  # key only: never called
    assert fid._folder_key(folder, files, 16, "resize", on_cuda) != fid._folder_key(
        folder, files, 16, "resize", ext)


def test_transform_follows_resizing_and_is_in_the_key(tmp_path: Path) -> None:
    """A per-image transform (a run's stain normalisation) sees decoded, resized images, as in
    training, and its identity separates cache entries."""
    from gen_ad.data.folders import fit_size, read_rgb

    folder = _write_set(tmp_path / "real", "smooth", n=5, size=32)
    shapes: list[tuple[int, ...]] = []

    def invert(rgb: np.ndarray) -> np.ndarray:
        shapes.append(rgb.shape)
        return 255 - rgb

    ext = _cheap()
    tf = fid.ImageTransform(invert, "invert")
    got = fid.real_stats(folder, ext, size=16, resize="center_crop", transform=tf, batch_size=2)
    assert shapes == [(16, 16, 3)] * 5 and not got.cache_hit
    done = tmp_path / "done"
    done.mkdir()
    for p in sorted(folder.glob("*.png")):
        Image.fromarray(255 - fit_size(read_rgb(p), 16, "center_crop")).save(done / p.name)
    want = fid.real_stats(done, ext, use_cache=False)
    torch.testing.assert_close(got.features, want.features, rtol=0, atol=0)
    plain = fid.real_stats(folder, ext, size=16, resize="center_crop")
    assert not plain.cache_hit and plain.key != got.key
    again = fid.real_stats(folder, ext, size=16, resize="center_crop", transform=tf)
    assert again.cache_hit and len(shapes) == 5
    other = fid.ImageTransform(invert, "invert-v2")
    assert not fid.real_stats(folder, ext, size=16, resize="center_crop",
                              transform=other).cache_hit
    x = torch.rand(4, 3, 8, 8) * 2 - 1  # an in-memory set gets it too
    assert fid.real_stats(x, ext, transform=tf).key != fid.real_stats(x, ext).key
    bad = fid.ImageTransform(lambda a: a[:4], "crop")
    with pytest.raises(DataError, match="must return uint8"):
        fid.real_stats(folder, ext, transform=bad, use_cache=False)


def test_capped_real_set_is_a_seeded_random_choice(tmp_path: Path) -> None:
    """Tiles named by slide sort by slide: the first N would be one slide."""
    for slide in ("s1", "s2", "s3", "s4"):
        _write_set(tmp_path / "tiles" / slide, "smooth", n=6, seed=len(slide))
    files = fid.list_images(tmp_path / "tiles", max_images=8)
    assert files == fid.list_images(tmp_path / "tiles", max_images=8)  # deterministic
    assert len(files) == 8 and len({p.parent.name for p in files}) > 2
    rel = [p.relative_to(tmp_path / "tiles").as_posix() for p in files]
    assert rel == sorted(rel)  # kept in sorted order
    assert files != fid.list_images(tmp_path / "tiles", max_images=8, seed=1)
    assert len(fid.list_images(tmp_path / "tiles", max_images=99)) == 24
    subset = fid.real_stats(tmp_path / "tiles", _cheap(), max_images=8, use_cache=False)
    assert subset.n == 8
    # a capped FAKE folder is the same seeded choice (it was the first 8 sorted: slides s1, s2)
    fake = fid.fake_features(tmp_path / "tiles", _cheap(), n=8)
    assert torch.equal(fake, subset.features)


def test_custom_extractor_is_labelled_fd(tmp_path: Path) -> None:
    a = _write_set(tmp_path / "a", "smooth", n=5)
    b = _write_set(tmp_path / "b", "noise", n=5, seed=3)
    res = fid.compute_fid(a, b, extractor=_cheap("toy-rgb"), kid=True)
    assert "fid" not in res and "kid_mean" not in res
    assert res["fd_toy-rgb"] > 0 and "kd_toy-rgb_mean" in res
    assert res["extractor"] == "toy-rgb"
    with pytest.raises(ConfigError, match="lowercase"):
        inc.custom_extractor("Bad Name", lambda x: x)


def test_kid_needs_two_images_per_subset() -> None:
    f = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    mean, std, m = fid.kernel_distance(f, f + 3)  # a shift far beyond the spread: KID > 0
    assert m == 5 and mean > 0 and math.isnan(std)  # every subset is both whole sets: no spread
    mean6, std6, m6 = fid.kernel_distance(f, torch.cat([f, f[:1]]) + 3)
    assert m6 == 5 and std6 > 0  # the larger set's subsets vary
    with pytest.raises(DataError, match="KID subset size"):
        fid.kernel_distance(f[:1], f)


def test_kid_of_two_whole_sets_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """When every subset is both whole sets, one subset gives the same mean as 100."""
    calls: list[int] = []
    real = fid.kid_features_to_metric

    def counting(f1, f2, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw["kid_subsets"])
        return real(f1, f2, **kw)

    f = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    expected = real(f, f + 1, kid_subsets=100, kid_subset_size=5, rng_seed=fid.KID_SEED,
                    verbose=False)["kernel_inception_distance_mean"]
    monkeypatch.setattr(fid, "kid_features_to_metric", counting)
    mean, std, m = fid.kernel_distance(f, f + 1)
    assert calls == [1] and m == 5 and math.isnan(std)
    assert mean == pytest.approx(float(expected), rel=1e-6)
    fid.kernel_distance(f, torch.cat([f, f[:1]]))
    assert calls == [1, fid.KID_SUBSETS]  # subsets of the larger set vary: all of them


# ----------------------------------------------------------------------------- input errors


def test_empty_folder_is_a_one_line_error(tmp_path: Path, sets: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc, out, err = _run_cli(["fid", str(tmp_path / "empty"), str(sets["a"]), "--device", "cpu"],
                            capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "no images" in err and "empty" in err
    rc, _, err = _run_cli(["fid", str(sets["a"]), str(tmp_path / "missing")], capsys)
    assert rc == 2 and "not a directory" in err


def test_mixed_sizes_and_unreadable_files_are_errors(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "mixed", "smooth", n=3)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "999.png")
    with pytest.raises(DataError, match="999.png: size 20x20 differs"):
        fid.real_stats(folder, _cheap())
    assert fid.real_stats(folder, _cheap(), size=16).n == 4  # resizing fixes it
    (folder / "999.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        fid.real_stats(folder, _cheap(), size=16)


def test_class_subfolders_select_normal(tmp_path: Path) -> None:
    _write_set(tmp_path / "train" / "normal", "smooth", n=3)
    _write_set(tmp_path / "train" / "tumor", "noise", n=4)
    assert len(fid.list_images(tmp_path / "train", classes=["normal"])) == 3
    assert len(fid.list_images(tmp_path / "train")) == 7


# ----------------------------------------------------------------------------- weights


def test_offline_without_weights_names_file_and_directory(
        tmp_path: Path, sets: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    expected_dir = inc.inception_cache_path().parent
    with pytest.raises(WeightsNotFoundError) as e:
        inc.load_inception(device="cpu")
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and str(expected_dir) in msg
    rc, out, err = _run_cli(["fid", str(sets["a"]), str(sets["b"]), "--device", "cpu"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "weights-inception-2015-12-05-6726825d.pth" in err and str(expected_dir) in err

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("GEN_AD_OFFLINE", "1")
    assert offline()
    with pytest.raises(WeightsNotFoundError, match="offline"):
        inc.resolve_inception_weights()
    with pytest.raises(WeightsNotFoundError, match="not found: .*nope.pth"):
        inc.resolve_inception_weights(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- training monitor


def _sampler(seed_shift: float = 0.0):  # type: ignore[no-untyped-def]
    def sample_fn(n: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(n, 3, 8, 8, generator=generator) * 2 - 1 + seed_shift).clamp(-1, 1)

    return sample_fn


def test_monitor_offline_warns_once_and_returns_none(tmp_path: Path) -> None:
    real = _write_set(tmp_path / "real", "smooth", n=4)
    mon = fid.FIDMonitor(real, n=4, device="cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert mon.maybe_compute(10, _sampler()) is None
        assert mon.maybe_compute(20, _sampler()) is None
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "weights-inception-2015-12-05-6726825d.pth" in msgs[0]
    assert mon.disabled_reason is not None


def test_monitor_fallback_extractor_is_labelled(tmp_path: Path) -> None:
    real = _write_set(tmp_path / "real", "smooth", n=6)
    calls: list[int] = []
    mon = fid.FIDMonitor(real, n=5, every=10, kid=True, batch_size=4, device="cpu",
                         fallback=_cheap("toy", calls=calls))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert mon.maybe_compute(5, _sampler()) is None  # not due: nothing computed
        assert calls == []
        r1 = mon.maybe_compute(10, _sampler())
        r2 = mon.maybe_compute(20, _sampler())
    assert len(rec) == 1 and "fd_toy" in str(rec[0].message)
    assert r1 is not None and r2 is not None and "fid" not in r1
    assert r1["fd_toy"] == r2["fd_toy"] > 0  # same seed each time: same samples
    assert r1["n_fake"] == 5 and r1["n_real"] == 6 and "kd_toy_mean" in r1
    assert calls == [4, 2, 4, 1, 4, 1]  # real features once; 5 samples in batches of 4


def test_monitor_survives_failures(tmp_path: Path) -> None:
    def broken(n: int, generator: torch.Generator) -> torch.Tensor:
        raise RuntimeError("boom")

    real = _write_set(tmp_path / "real", "smooth", n=4)
    mon = fid.FIDMonitor(real, n=4, extractor=_cheap(), device="cpu")
    with pytest.warns(RuntimeWarning, match="boom"):
        assert mon.maybe_compute(1, broken) is None
    assert mon.maybe_compute(2, _sampler())["fd_meanstd"] >= 0  # type: ignore[index]
    bad = fid.FIDMonitor("synthetic", n=4, extractor=_cheap(), device="cpu")
    with pytest.warns(RuntimeWarning, match="not a directory"):
        assert bad.maybe_compute(1, _sampler()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bad.maybe_compute(2, _sampler()) is None  # disabled: no second warning


# ----------------------------------------------------------------------------- run folders


def test_run_folder_is_sampled_through_load_run(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.app import fid as fid_command

    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.json").write_text("{}")
    calls: list[tuple[int, int, int]] = []

    class FakeRun:
        def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
            calls.append((n, seed, batch_size))
            g = torch.Generator().manual_seed(seed)
            return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1

    monkeypatch.setattr(fid_command, "load_run", lambda path, device="cpu": FakeRun())
    real = _write_set(tmp_path / "real", "smooth", n=5)
    assert fid_command.is_run_folder(run_dir) and not fid_command.is_run_folder(real)
    r1 = fid_command.fid(real, run_dir, extractor=_cheap(), batch_size=3, device="cpu")
    r2 = fid_command.fid(real, run_dir, extractor=_cheap(), batch_size=3, device="cpu")
    assert r1["n_fake"] == 5  # default n = n_real
    chunk = fid_command.SAMPLE_CHUNK  # the run is sampled in seeded chunks, not in batches,
    # each generated at most --batch-size images at a time (memory)
    assert calls and all(c[0] == chunk and c[2] == 3 for c in calls)
    assert r1["fd_meanstd"] == r2["fd_meanstd"] and r2["cache_hit"]  # seeded: reproducible
    calls.clear()
    r3 = fid_command.fid(real, run_dir, extractor=_cheap(), batch_size=64, device="cpu")
    r4 = fid_command.fid(real, run_dir, extractor=_cheap(), batch_size=40, device="cpu")
    assert all(c[2] == chunk for c in calls)  # a batch at or above the chunk: chunks whole
    assert r3["fd_meanstd"] == r4["fd_meanstd"]  # another --batch-size, the same sample set


class _SizedRun:
    """A run stand-in with a config (``data.size``/``data.resize``) and optional stain."""

    def __init__(self, size: int, resize: str | None, stain: object = None,
                 stain_ref: Path | None = None) -> None:
        import types

        data = types.SimpleNamespace(size=size)
        if resize is not None:  # runs saved before data.resize have none
            data.resize = resize
        self.cfg = types.SimpleNamespace(data=data)
        self.stain, self.stain_ref = stain, stain_ref

    def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        size = self.cfg.data.size
        return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.json").write_text("{}")
    return run_dir


def test_run_folder_reads_real_images_at_the_run_size(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without --size the real tiles are brought to the run's data.size / data.resize."""
    from gen_ad.app import fid as fid_command

    run_dir, real = _run_dir(tmp_path), _write_set(tmp_path / "real", "smooth", n=5, size=32)
    run = _SizedRun(16, "center_crop")
    monkeypatch.setattr(fid_command, "load_run", lambda path, device="cpu": run)
    res = fid_command.fid(real, run_dir, extractor=_cheap(), device="cpu")
    assert (res["size"], res["resize"], res["size_from"]) == (16, "center_crop", "run")
    want = fid.compute_fid(real, fid_command.run_images(run), extractor=_cheap(), size=16,
                           resize="center_crop", device="cpu")
    assert res["fd_meanstd"] == want["fd_meanstd"] and res["real_stain"] is None
    given = fid_command.fid(real, run_dir, extractor=_cheap(), device="cpu", size=32)
    assert (given["size"], given["resize"], given["size_from"]) == (32, "center_crop",
                                                                    "argument")
    monkeypatch.setattr(fid_command, "load_run", lambda path, device="cpu": _SizedRun(16, None))
    assert fid_command.fid(real, run_dir, extractor=_cheap(), device="cpu")["resize"] == "resize"
    folder = fid_command.fid(real, real, extractor=_cheap(), device="cpu")
    assert (folder["size"], folder["size_from"]) == (None, "images")
    monkeypatch.setattr(fid, "load_inception", lambda *a, **kw: _cheap())
    rc, out, _ = _run_cli(["fid", str(real), str(run_dir), "--device", "cpu", "--resize",
                           "resize"], capsys)
    cli = json.loads(out)
    assert rc == 0 and (cli["size"], cli["resize"], cli["size_from"]) == (16, "resize", "run")


@needs_torchstain
def test_stain_run_compares_with_normalised_real_images(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained on stain-normalised patches is compared with real patches normalised the
    same way (decode, resize, normalise), not with raw ones."""
    from gen_ad.app import fid as fid_command
    from gen_ad.data.folders import fit_size, read_rgb
    from gen_ad.data.stain import StainNormalizer
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "data", n=6, size=48, seed=0, anomaly_fraction=0.0)
    files = sorted((tmp_path / "data" / "normal").iterdir())
    ref = tmp_path / "ref.png"
    Image.fromarray(read_rgb(files[0])).save(ref)
    stain = StainNormalizer(method="reinhard", reference=ref)
    run = _SizedRun(32, "resize", stain, ref)
    monkeypatch.setattr(fid_command, "load_run", lambda path, device="cpu": run)
    res = fid_command.fid(tmp_path / "data", _run_dir(tmp_path), extractor=_cheap(),
                          device="cpu")
    assert res["real_stain"] == {"method": "reinhard", "reference": str(ref)}
    done = tmp_path / "normalised"
    done.mkdir()
    for p in files:
        Image.fromarray(stain(fit_size(read_rgb(p), 32, "resize"))).save(done / p.name)
    sampler = fid_command.run_images(run)
    want = fid.compute_fid(done, sampler, extractor=_cheap(), device="cpu")
    raw = fid.compute_fid(tmp_path / "data", sampler, extractor=_cheap(), device="cpu", size=32)
    assert res["fd_meanstd"] == pytest.approx(want["fd_meanstd"], rel=1e-6)
    assert raw["fd_meanstd"] != pytest.approx(want["fd_meanstd"], rel=1e-3)  # it matters


# ----------------------------------------------------------------------------- benchmark


def test_bench_smoke_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_fid", REPO / "bench" / "fid.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert mod.main(["--smoke", "--device", "cpu"]) == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["weights"] == "random-init" and rec["cpu_images_per_s"] > 0
    assert rec["cache_second_s"] < rec["cache_first_s"] and rec["settings"]["smoke"] is True


def test_a_synth_folder_lists_its_patches_only(tmp_path: Path) -> None:
    """``gen-ad fid`` on a ``gen-ad synth`` folder reads the patches, as training does, not its
    ground-truth masks and contact sheet (54 files were read for 40 patches); a linked folder
    is read once, as a patch folder reads it."""
    from gen_ad.data.folders import PatchFolder
    from gen_ad.data.synthetic import write_folder

    root = tmp_path / "synth"
    write_folder(root, n=10, size=16, seed=0, anomaly_fraction=0.3)
    (root / "contact_sheet.png").write_bytes((root / "normal" / sorted(
        p.name for p in (root / "normal").iterdir())[0]).read_bytes())
    assert any((root / "masks").rglob("*.png"))
    patches = PatchFolder(root=root, size=16).paths
    want = sorted(Path(p).relative_to(root).as_posix() for p in patches)
    got = [p.relative_to(root).as_posix() for p in fid.list_images(root)]
    assert got == want and len(got) == 10
    extra = tmp_path / "elsewhere"
    write_folder(extra, n=3, size=16, seed=1, anomaly_fraction=0.0)
    (root / "normal" / "linked").symlink_to(extra / "normal", target_is_directory=True)
    (root / "normal" / "loop").symlink_to(root / "normal", target_is_directory=True)
    assert len(fid.list_images(root)) == 13


def test_the_statistics_cache_key_follows_the_decoder_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics computed by an older decoder (e.g. TIFFs turned twice) are not reused: the key
    holds ``folders.DECODER_VERSION``, bumped whenever decoding changes."""
    ext = _cheap()
    before = fid._set_key(ext, "16", b"digest")
    monkeypatch.setattr(fid, "DECODER_VERSION", fid.DECODER_VERSION + 1)
    assert fid._set_key(ext, "16", b"digest") != before
