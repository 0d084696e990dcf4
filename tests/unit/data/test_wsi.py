"""Slide reading and tiling on the two shared slides (skipped when the data is absent)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gen_ad.cli import main
from gen_ad.data.tissue import tissue_mask
from gen_ad.data.wsi import (
    Slide,
    open_slide,
    plan_grid,
    read_manifest,
    tile_slide,
    tile_slides,
)
from gen_ad.errors import ConfigError, DataError

CMU = "CMU-1-Small-Region.svs"  # 2220x2967, one level, JPEG, mpp 0.499
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # 4443x3567 + 2221x1783, JPEG 2000, no mpp


@pytest.fixture(scope="module")
def wsi(shared_data: Path) -> Path:
    return shared_data / "wsi"


def test_open_slide_properties(wsi: Path, tmp_path: Path) -> None:
    with open_slide(wsi / CMU) as s:
        assert s.backend == "openslide" and s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        region = s.read_region(100, 200, 0, 30, 20)
        assert region.shape == (20, 30, 3) and region.dtype == np.uint8
        thumb = s.thumbnail(300)
        assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
    with open_slide(wsi / TCGA) as s:
        assert s.level_count == 2 and s.mpp is None
        assert s.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(DataError, match="slide not found"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "fake.svs").write_text("not a slide")
    with pytest.raises(DataError, match="cannot open slide"):
        open_slide(tmp_path / "fake.svs")


def test_tiffslide_backend_reads_the_same_pixels(wsi: Path) -> None:
    for name, level in ((CMU, 0), (TCGA, 1)):
        with open_slide(wsi / name) as a, open_slide(wsi / name, backend="tiffslide") as b:
            assert b.backend == "tiffslide" and a.level_dimensions == b.level_dimensions
            ra, rb = (s.read_region(512, 512, level, 64, 48) for s in (a, b))
            assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2.0


def _expected_fractions(mask: np.ndarray, dims: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
                        foot: float) -> np.ndarray:
    """Loop-based reference: mean of the mask pixels whose centres lie inside each tile."""
    cx = (np.arange(mask.shape[1]) + 0.5) * dims[0] / mask.shape[1]
    cy = (np.arange(mask.shape[0]) + 0.5) * dims[1] / mask.shape[0]
    out = np.zeros((len(ys), len(xs)))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            sel = mask[np.ix_((cy >= y) & (cy < y + foot), (cx >= x) & (cx < x + foot))]
            out[i, j] = sel.mean()
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize(("name", "level", "size"), [(CMU, 0, 512), (TCGA, 1, 384)])
def test_tile_slide_matches_mask_and_slide(wsi: Path, tmp_path: Path, name: str, level: int,
                                           size: int) -> None:
    recs = tile_slide(wsi / name, tmp_path, size, level=level, min_tissue=0.6, mask_size=384,
                      progress=False)
    with open_slide(wsi / name) as s:
        ds = s.level_downsamples[level]
        foot = size * ds
        w0, h0 = s.dimensions
        xs = np.round(np.arange(int((w0 - foot) // foot) + 1) * foot).astype(int)
        ys = np.round(np.arange(int((h0 - foot) // foot) + 1) * foot).astype(int)
        frac = _expected_fractions(tissue_mask(s.thumbnail(384)), s.dimensions, xs, ys, foot)
        assert len(recs) == int((frac >= 0.6).sum()) > 0
        want = {(int(xs[j]), int(ys[i])) for i, j in zip(*np.nonzero(frac >= 0.6))}
        assert {(r.x, r.y) for r in recs} == want
        for r in recs:
            i, j = list(ys).index(r.y), list(xs).index(r.x)
            assert r.tissue_fraction == pytest.approx(frac[i, j]) and r.tissue_fraction >= 0.6
            assert r.level == level and Path(r.path).name == f"{s.path.stem}_x{r.x}_y{r.y}.png"
        for r in recs[:: max(1, len(recs) // (4 if ds == 1 else 2))]:
            png = np.asarray(Image.open(r.path))
            assert png.shape == (size, size, 3)
            diff = _diff(png, s.read_region(r.x, r.y, level, size, size))
            if ds == 1:
                assert diff == 0
            else:  # OpenSlide resamples reads at fractional level coordinates (ds = 2.0005)
                shifted = [_diff(png, s.read_region(r.x + dx, r.y + dy, level, size, size))
                           for dx, dy in ((-2, 0), (2, 0), (0, -2), (0, 2))]
                assert diff < 5 and diff < 0.5 * min(shifted)
    rows = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    assert list(rows[0]) == ["slide", "level", "x", "y", "tissue_fraction", "path"]
    assert read_manifest(tmp_path / "manifest.csv") == [
        r.__class__(r.slide, r.level, r.x, r.y, round(r.tissue_fraction, 6), r.path)
        for r in recs]


def test_level_and_mpp_selection(wsi: Path) -> None:
    with open_slide(wsi / CMU) as s:
        g = plan_grid(s, 256, mpp=1.0)
        assert g.level == 0 and g.downsample == pytest.approx(1.0 / 0.499)
        assert g.read_size == round(256 / 0.499) and g.footprint == pytest.approx(256 / 0.499)
        assert g.shape == (int(2967 // g.footprint), int(2220 // g.footprint))
        g = plan_grid(s, 256, level=0, stride=128)
        assert g.read_size == 256 and g.shape == ((2967 - 256) // 128 + 1, (2220 - 256) // 128 + 1)
    with open_slide(wsi / TCGA) as s:
        with pytest.raises(DataError, match="microns per pixel"):
            plan_grid(s, 256, mpp=0.5)
        g = plan_grid(s, 256, mpp=0.5, slide_mpp=0.25)
        assert g.level == 1 and g.read_size == 256
        g = plan_grid(s, 256, mpp=0.75, slide_mpp=0.25)
        assert g.level == 1 and g.read_size == round(256 * 3 / s.level_downsamples[1])
        assert plan_grid(s, 256, mpp=0.3, slide_mpp=0.25).level == 0
        with pytest.raises(DataError, match="either a level or an mpp"):
            plan_grid(s, 256, level=1, mpp=0.5)
        with pytest.raises(DataError, match="level 5 does not exist"):
            plan_grid(s, 256, level=5)


def test_mpp_tiles_are_resized_regions(wsi: Path, tmp_path: Path) -> None:
    recs = tile_slide(wsi / CMU, tmp_path, 128, mpp=4 * 0.499, min_tissue=0.9, mask_size=256,
                      progress=False)
    assert recs
    r = recs[len(recs) // 2]
    png = np.asarray(Image.open(r.path)).astype(float)
    with open_slide(wsi / CMU) as s:
        region = s.read_region(r.x, r.y, 0, 512, 512)
    small = np.asarray(Image.fromarray(region).reduce(4)).astype(float)
    assert png.shape == (128, 128, 3) and np.abs(png - small).mean() < 4.0


def test_manifest_merges_slides_and_drops_stale_tiles(wsi: Path, tmp_path: Path) -> None:
    first = tile_slides([wsi / CMU], tmp_path, 512, min_tissue=0.2, mask_size=256,
                        progress=False)[0].records
    tile_slides([wsi / TCGA], tmp_path, 512, level=1, min_tissue=0.5, mask_size=256,
                progress=False)
    again = tile_slide(wsi / CMU, tmp_path, 512, min_tissue=0.8, mask_size=256, progress=False)
    assert 0 < len(again) < len(first)
    rows = read_manifest(tmp_path / "manifest.csv")
    assert {r.slide for r in rows} == {Path(CMU).stem, Path(TCGA).stem}
    assert {r.path for r in rows if r.slide == Path(CMU).stem} == {r.path for r in again}
    pngs = {str(p) for p in tmp_path.glob(f"{Path(CMU).stem}_*.png")}
    assert pngs == {r.path for r in again}  # tiles no longer produced were removed


def test_cli_tile(wsi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiles"
    assert main(["tile", str(wsi / CMU), "--out", str(out), "--size", "1024",
                 "--min-tissue", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "CMU-1-Small-Region: openslide, level 0" in text and "manifest:" in text
    assert len(read_manifest(out / "manifest.csv")) > 0
    assert main(["tile", str(tmp_path / "missing.svs"), "--out", str(out), "--size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen-ad: error: slide not found") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["tile", str(wsi / CMU), "--out", str(out), "--size", "64", "--level", "0",
              "--mpp", "1"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- synthetic files


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal((200, 120, 170), 30, (h, w, 3)), 0, 255).astype(np.uint8)


def test_tiffslide_fallback_is_white_outside_the_slide(tmp_path: Path) -> None:
    """A plain strip TIFF opens with tiffslide (not OpenSlide): outside the image is white,
    as OpenSlide's transparent pixels composited on white, never tiffslide's black padding."""
    img = _tissue(60, 80)
    Image.fromarray(img).save(tmp_path / "field.tif")
    tifffile.imwrite(tmp_path / "tiled.tif", img, tile=(32, 32), photometric="rgb")
    with open_slide(tmp_path / "field.tif") as s:
        assert s.backend == "tiffslide"
        r = s.read_region(-8, -5, 0, 30, 20)
        assert (r[:5] == 255).all() and (r[:, :8] == 255).all()
        assert (r[5:, 8:] == img[:15, :22]).all()
        assert (s.read_region(70, 50, 0, 20, 20)[10:, :] == 255).all()
        assert (s.read_region(200, 200, 0, 8, 8) == 255).all()  # wholly outside
    with open_slide(tmp_path / "tiled.tif") as a, \
            open_slide(tmp_path / "tiled.tif", backend="tiffslide") as b:
        assert a.backend == "openslide"
        for x, y in ((-8, -5), (60, 40), (-100, 10)):
            assert (a.read_region(x, y, 0, 40, 30) == b.read_region(x, y, 0, 40, 30)).all()


def test_tiffslide_pyramid_level_is_white_outside(tmp_path: Path) -> None:
    img = _tissue(100, 140)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(img, tile=(32, 32), photometric="rgb", subifds=1)
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(32, 32), photometric="rgb",
                 subfiletype=1)
    with open_slide(tmp_path / "p.tif", backend="tiffslide") as s:
        assert s.level_downsamples == [1.0, 2.0]
        r = s.read_region(-20, -40, 1, 50, 50)  # level-1 corner (-10, -20)
        assert (r[:20] == 255).all() and (r[:, :10] == 255).all()
        assert (r[20:, 10:] == img[::2, ::2][:30, :40]).all()


def test_implausible_recorded_mpp_is_ignored_and_slide_mpp_overrides(tmp_path: Path) -> None:
    img = _tissue(300, 400)
    Image.fromarray(img).save(tmp_path / "dpi.tif", dpi=(72, 72))  # 352.8 um/px
    with pytest.warns(RuntimeWarning, match=r"352\.8 um/px"), \
            open_slide(tmp_path / "dpi.tif") as s:
        assert s.mpp is None and s.mpp_ignored == pytest.approx(25400 / 72)
        with pytest.raises(DataError, match=r"implausible 352\.8 um/px.*--slide-mpp"):
            plan_grid(s, 32, mpp=0.5)
        g = plan_grid(s, 32, mpp=0.5, slide_mpp=0.25)
        assert g.read_size == 64 and g.shape == (300 // 64, 400 // 64)
    with warnings.catch_warnings():  # a caller given the resolution silences the warning
        warnings.simplefilter("error")
        with open_slide(tmp_path / "dpi.tif", warn_mpp=False) as s:
            assert s.mpp is None and s.mpp_ignored == pytest.approx(25400 / 72)
    tifffile.imwrite(tmp_path / "um.tif", img, tile=(64, 64), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "um.tif") as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_ignored is None
        assert plan_grid(s, 32, mpp=0.5).read_size == 64
        assert plan_grid(s, 32, mpp=0.5, slide_mpp=0.125).read_size == 128  # the user's wins


def _record_reads(slide: Slide) -> list[tuple[int, int]]:
    """Make ``slide`` record the ``(w, h)`` of every region it reads; returns the record."""
    reads: list[tuple[int, int]] = []
    read = slide.read_region

    def spy(x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        reads.append((w, h))
        return read(x0, y0, level, w, h)

    slide.read_region = spy  # type: ignore[method-assign]
    return reads


def test_strip_thumbnail_equals_whole_level_thumbnail(tmp_path: Path) -> None:
    """Tolerance 1 grey level: the strip boxes give PIL the same bicubic weights as one resize
    up to float rounding of the box coordinates, which can move a uint8 value by one step."""
    img = _tissue(500, 700)
    tifffile.imwrite(tmp_path / "big.tif", img, tile=(128, 128), photometric="rgb")
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(img, tile=(64, 64), photometric="rgb", subifds=1)
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(64, 64), photometric="rgb",
                 subfiletype=1)
    for path, backend in ((tmp_path / "big.tif", "auto"), (tmp_path / "p.tif", "tiffslide")):
        with open_slide(path, backend=backend) as s:
            whole = s.thumbnail(128)
            level = s.best_level(700 / 128)
            reads = _record_reads(s)
            for budget in (5_000, 40_000):
                strips = s.thumbnail(128, max_read_pixels=budget)
                assert strips.shape == whole.shape == (91, 128, 3)
                assert np.abs(strips.astype(int) - whole.astype(int)).max() <= 1
            lw, lh = s.level_dimensions[level]
            assert len(reads) > 4 and all(w == lw and h < lh for w, h in reads)


def test_slide_mpp_applies_only_to_slides_without_a_plausible_one(wsi: Path,
                                                                   tmp_path: Path) -> None:
    """One --slide-mpp for a mixed call: the slide recording 0.499 um/px keeps it (one warning
    naming the slide, both values and --slide-mpp-force); the slide recording none takes it."""
    kw: dict = {"mpp": 1.0, "min_tissue": 0.5, "mask_size": 256, "progress": False}
    with pytest.warns(RuntimeWarning) as caught:
        cmu, tcga = tile_slides([wsi / CMU, wsi / TCGA], tmp_path / "a", 256, slide_mpp=0.25,
                                **kw)
    msgs = [str(w.message) for w in caught if "--slide-mpp-force" in str(w.message)]
    assert len(msgs) == 1 and CMU in msgs[0] and "0.499" in msgs[0] and "0.25" in msgs[0]
    assert (cmu.mpp, cmu.mpp_source) == (pytest.approx(0.499), "recorded")
    assert cmu.downsample == pytest.approx(1.0 / 0.499)
    assert (tcga.mpp, tcga.mpp_source) == (0.25, "given")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced = tile_slides([wsi / CMU], tmp_path / "b", 256, slide_mpp=0.25,
                             force_slide_mpp=True, **kw)[0]
        close = tile_slides([wsi / CMU], tmp_path / "c", 256, slide_mpp=0.51, **kw)[0]
    assert (forced.mpp, forced.mpp_source, forced.downsample) == (0.25, "forced", 4.0)
    assert (close.mpp, close.mpp_source) == (0.51, "given")  # within 5%: the user's value
    with pytest.raises(ConfigError, match="--slide-mpp-force needs --slide-mpp"):
        tile_slides([wsi / CMU], tmp_path / "d", 256, force_slide_mpp=True, **kw)


def test_unknown_mpp_hint_names_only_what_the_command_has(wsi: Path) -> None:
    from gen_ad.data.cells import base_mpp

    with open_slide(wsi / TCGA) as s:
        with pytest.raises(DataError, match=r"--slide-mpp\) or a pyramid level \(--level\)"):
            plan_grid(s, 256, mpp=0.5)
        with pytest.raises(DataError) as e:  # gen-ad cells has no --level
            base_mpp(s, None)
    assert "--slide-mpp" in str(e.value) and "--level" not in str(e.value)
