"""Nuclei detection on synthetic fields with known nuclei, crop geometry, centroid files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.data.cells import (
    ImageSource,
    NucleusSettings,
    detect_nuclei,
    detect_source,
    plan_crops,
    read_centroids,
    read_crop,
)
from gen_ad.data.fields import FIELD_MPP, detection_scores, match_points, render_field
from gen_ad.errors import DataError

TOLERANCE_UM = 3.0  # a detection matches a true nucleus when its centre is this close


def _save(tmp_path: Path, name: str, image: np.ndarray) -> Path:
    p = tmp_path / name
    Image.fromarray(image).save(p)
    return p


@pytest.mark.parametrize("detect_mpp", [FIELD_MPP, FIELD_MPP / 2])
def test_nuclei_found_on_synthetic_fields(tmp_path: Path, detect_mpp: float,
                                          record_property: pytest.RecordProperty) -> None:
    tp = found = true = 0
    # the last field is nearly all tissue with many dark anomalous nuclei: Otsu's tissue cut
    # alone would split the tissue itself (the capped threshold of source_tissue keeps it whole)
    for i, size, seed in ((0, 192, 3), (1, 192, 3), (6, 320, 0)):
        f = render_field(i, size=size, seed=seed, anomaly_rate=0.2)
        src = ImageSource(_save(tmp_path, f"f{i}.png", f.image), mpp=FIELD_MPP)
        nuc = detect_source(src, NucleusSettings(mpp=detect_mpp))
        s = detection_scores(np.stack([nuc.x, nuc.y], 1), np.stack([f.x, f.y], 1),
                             TOLERANCE_UM / FIELD_MPP)
        tp, found, true = tp + s["tp"], found + s["found"], true + s["true"]
    recall, precision = tp / true, tp / found
    record_property("recall", recall)
    record_property("precision", precision)
    print(f"detection at {detect_mpp} um/px on 3 fields ({int(true)} nuclei): recall "
          f"{recall:.3f}, precision {precision:.3f} at {TOLERANCE_UM} um")
    assert true > 400
    assert recall >= 0.95 and precision >= 0.95


def test_tiff_field_reads_like_the_png(tmp_path: Path) -> None:
    """A field saved as a strip TIFF opens with tiffslide; its margins outside the image must be
    white as for the PNG (black padding once hid every nucleus: 0 found instead of all)."""
    from gen_ad.data.wsi import open_slide

    f = render_field(0, size=192, seed=3)
    png = ImageSource(_save(tmp_path, "f.png", f.image), mpp=FIELD_MPP)
    settings = NucleusSettings(mpp=FIELD_MPP, tile=128)  # several tiles: margins outside
    with open_slide(_save(tmp_path, "f.tif", f.image)) as tif:
        assert tif.backend == "tiffslide"
        corner = read_crop(tif, 2.5, 2.5, plan_crops(tif, 16, FIELD_MPP, slide_mpp=FIELD_MPP))
        assert np.array_equal(corner, read_crop(png, 2.5, 2.5, plan_crops(png, 16, FIELD_MPP)))
        a = detect_source(png, settings)
        b = detect_source(tif, settings, slide_mpp=FIELD_MPP)
    assert len(a) > 30 and len(b) == len(a)
    assert np.allclose(b.x, a.x) and np.allclose(b.y, a.y)


def test_no_nuclei_on_blank_or_nucleus_free_images() -> None:
    white = np.full((96, 96, 3), 250, np.uint8)
    pink = np.empty((96, 96, 3), np.uint8)
    pink[...] = (235, 160, 200)
    for img in (white, pink):
        assert len(detect_nuclei(img, 0.5)) == 0


def test_match_points_is_one_to_one() -> None:
    truth = np.array([[10.0, 10.0], [30.0, 10.0]])
    found = np.array([[10.5, 10.0], [11.0, 10.0], [29.0, 11.0], [60.0, 60.0]])
    ok, idx = match_points(found, truth, 3.0)
    assert ok.tolist() == [True, False, True, False] and idx.tolist() == [0, -1, 1, -1]


def test_crop_geometry_on_an_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    src = ImageSource(_save(tmp_path, "a.png", img), mpp=0.5)
    plan = plan_crops(src, 16, 0.5)
    assert (plan.level, plan.read_size, plan.footprint) == (0, 16, 16.0)
    crop = read_crop(src, 40.5, 30.5, plan)  # centre pixel (40, 30) sits at crop[8, 8]
    assert np.array_equal(crop, img[22:38, 32:48])
    edge = read_crop(src, 0.5, 0.5, plan)  # outside the image is white
    assert np.array_equal(edge[8:, 8:], img[:8, :8]) and (edge[:8] == 255).all()
    coarse = plan_crops(src, 16, 1.0)  # 1 um/px: 32 image px resized to 16
    assert (coarse.read_size, coarse.footprint) == (32, 32.0)
    want = np.asarray(Image.fromarray(img[14:46, 24:56]).resize((16, 16),
                                                                Image.Resampling.BICUBIC))
    assert np.array_equal(read_crop(src, 40.5, 30.5, coarse), want)
    with pytest.raises(DataError, match="microns per pixel"):
        plan_crops(ImageSource(tmp_path / "a.png"), 16, 0.5)


def test_crops_and_mpp_on_the_shared_slides(shared_data: Path) -> None:
    from gen_ad.data.wsi import open_slide

    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as s:
        assert s.mpp == pytest.approx(0.499)
        same = plan_crops(s, 64, s.mpp)  # native resolution: a plain level-0 read
        assert (same.level, same.read_size) == (0, 64)
        assert np.array_equal(read_crop(s, 1000.5, 1500.5, same),
                              s.read_region(968, 1468, 0, 64, 64))
        half = plan_crops(s, 64, 2 * s.mpp)  # coarser: 128 level-0 px resized to 64
        assert (half.level, half.read_size, half.footprint) == (0, 128, 128.0)
        fine = plan_crops(s, 64, 0.25)  # finer than the scan: 32 px upsampled
        assert fine.read_size == 32 and read_crop(s, 1000, 1500, fine).shape == (64, 64, 3)
    with open_slide(shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs") as s:
        with pytest.raises(DataError, match="microns per pixel"):
            plan_crops(s, 64, 0.5)
        lvl1 = plan_crops(s, 64, 0.5, slide_mpp=0.25)  # level 1 (downsample 2.0005) is used
        assert (lvl1.level, lvl1.read_size) == (1, 64)
        x0 = int(np.floor(2001 - lvl1.footprint / 2))
        y0 = int(np.floor(1501 - lvl1.footprint / 2))
        assert np.array_equal(read_crop(s, 2001, 1501, lvl1), s.read_region(x0, y0, 1, 64, 64))


def test_read_centroids_csv_and_geojson(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("X,Y,slide\n10,20,a\n30.5,40,\n")
    slides, nuc = read_centroids(tmp_path / "c.csv")
    assert slides == ["a", None] and nuc.x.tolist() == [10, 30.5] and np.isnan(nuc.area).all()
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
         "properties": {"slide": "s1"}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}]}
    (tmp_path / "c.geojson").write_text(json.dumps(doc))
    slides, nuc = read_centroids(tmp_path / "c.geojson")
    assert slides == ["s1", None, None, None]
    assert nuc.x.tolist() == [5, 1, 3, 2] and nuc.y.tolist() == [6, 2, 4, 2]
    assert nuc.area[3] == pytest.approx(16.0)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="x,y"):
        read_centroids(tmp_path / "bad.csv")
    (tmp_path / "line.json").write_text(json.dumps({"type": "LineString", "coordinates": []}))
    with pytest.raises(DataError, match="unsupported GeoJSON geometry"):
        read_centroids(tmp_path / "line.json")
