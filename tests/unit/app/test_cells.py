"""``gen-ad cells``: crops named for ``gen-ad groups``, cells.csv, overlays, --centroids."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.cli import main
from gen_ad.metrics.stats import slide_from_path


def _image(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(img).save(tmp_path / "imgs" / "slideA.png")
    return img


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cells.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", ["csv", "geojson"])
def test_cells_with_centroids(tmp_path: Path, fmt: str) -> None:
    img = _image(tmp_path)
    if fmt == "csv":
        cen = tmp_path / "c.csv"
        cen.write_text("x,y\n20.2,30.9\n45,10\n45.7,10.1\n")  # the last two share pixel (45, 10)
    else:
        cen = tmp_path / "c.geojson"
        cen.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "MultiPoint",
                                             "coordinates": [[20.2, 30.9], [45, 10]]}}]}))
    out = tmp_path / "out"
    assert main(["cells", str(tmp_path / "imgs"), "--out", str(out), "--mpp", "0.5",
                 "--size", "8", "--centroids", str(cen)]) == 0
    rows = _rows(out)
    assert [(r["slide"], r["x"], r["y"]) for r in rows] == [("slideA", "45", "10"),
                                                           ("slideA", "20", "30")]
    for r in rows:
        crop = np.asarray(Image.open(out / r["path"]))
        x, y = int(r["x"]), int(r["y"])
        assert crop.shape == (8, 8, 3) and np.array_equal(crop[4, 4], img[y, x])
        assert slide_from_path(r["path"]) == "slideA"
    assert (out / "overlays" / "slideA.png").is_file()


def test_cells_detects_and_reruns_replace(tmp_path: Path) -> None:
    from gen_ad.data.fields import write_study

    study = write_study(tmp_path / "s", {"a": (1, 0.0)}, size=128, seed=0)
    out = tmp_path / "out"
    args = ["cells", str(study["slides"]), "--out", str(out), "--mpp", "1", "--size", "16",
            "--slide-mpp", "1", "--detect-mpp", "1"]
    assert main(args) == 0
    first = _rows(out)
    truth = list(csv.DictReader(open(study["truth"])))
    assert abs(len(first) - len(truth)) <= 2 and all(float(r["area"]) > 0 for r in first)
    (out / "crops" / "a-01" / "a-01_x0_y0.png").write_bytes(b"stale")
    assert main(args) == 0
    assert _rows(out) == first and not (out / "crops" / "a-01" / "a-01_x0_y0.png").exists()
    assert len(list((out / "crops" / "a-01").glob("*.png"))) == len(first)


def test_cells_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "slideB.png")
    (tmp_path / "c.csv").write_text("x,y\n1,2\n")  # no slide column, two inputs
    assert main(["cells", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["cells", str(tmp_path / "imgs"), str(tmp_path / "slideB.png"),
                 "--out", str(tmp_path / "o"), "--centroids", str(tmp_path / "c.csv")]) == 2
    # images alone never ask for a slide's resolution: the flag alone was silently ignored
    assert main(["cells", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
                 "--slide-mpp-force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("gen-ad: error:") for e in err)
    assert "--slide-mpp-force needs --slide-mpp" in err[-1]


def test_slide_without_mpp_needs_slide_mpp(shared_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    slide = shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    (tmp_path / "c.csv").write_text("x,y\n2000,1500\n")
    assert main(["cells", str(slide), "--out", str(tmp_path / "o"),
                 "--centroids", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert "--slide-mpp" in err and "--level" not in err  # cells has no --level
    assert main(["cells", str(slide), "--out", str(tmp_path / "o"), "--slide-mpp", "0.25",
                 "--mpp", "0.5", "--centroids", str(tmp_path / "c.csv")]) == 0
    assert "from level 1 (64px read)" in capsys.readouterr().out


def test_tiff_dpi_is_not_a_resolution_and_slide_mpp_overrides(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "dpi.tif", dpi=(72, 72))  # 352.8 "um/px"
    (tmp_path / "c.csv").write_text("x,y\n30,20\n")
    args = ["cells", str(tmp_path / "dpi.tif"), "--out", str(tmp_path / "o"), "--size", "8",
            "--mpp", "0.5", "--centroids", str(tmp_path / "c.csv")]
    with pytest.warns(RuntimeWarning, match=r"352\.8 um/px"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "implausible 352.8 um/px" in err and "--slide-mpp" in err
    with warnings.catch_warnings():  # the user gave the resolution: the file's is no news
        warnings.simplefilter("error")
        assert main(args + ["--slide-mpp", "0.25"]) == 0
    assert "8px crops at 0.5 um/px from level 0 (16px read)" in capsys.readouterr().out
    import tifffile

    tifffile.imwrite(tmp_path / "um.tif", img, photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    args[1] = str(tmp_path / "um.tif")
    assert main(args) == 0 and "(16px read)" in capsys.readouterr().out  # recorded 0.25
    with pytest.warns(RuntimeWarning, match=r"recorded resolution of 0\.25.*--slide-mpp-force"):
        assert main(args + ["--slide-mpp", "1"]) == 0  # a plausible recorded value wins
    assert "(16px read)" in capsys.readouterr().out
    assert main(args + ["--slide-mpp", "1", "--slide-mpp-force"]) == 0  # unless forced
    assert "(4px read)" in capsys.readouterr().out
