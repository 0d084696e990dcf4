"""A cohort of synthetic slides: slide-level AUROC from labels, tile-level from annotations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from sklearn.metrics import roc_auc_score

from gen_ad.app.cohort import (
    evaluate_cohort,
    read_slide_labels,
    slides_csv,
    tile_region_weights,
)
from gen_ad.app.slide import score_slide
from gen_ad.errors import DataError
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

TUMOUR = (96, 192)  # level-0 square [96, 192) x [96, 192): tiles of 32 px at x, y in 96..160


class DarkScorer(AnomalyScorer):
    """Score = 1 - mean intensity (the dark 'tumour' scores high)."""

    name = "dark"

    def score(self, x: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(scores=1.0 - x.mean(dim=(1, 2, 3)))


def make_slide(path: Path, tumour: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal((210, 120, 175), 12, (320, 320, 3)), 0, 255).astype(np.uint8)
    img[:, :64] = 246  # glass: no tissue
    if tumour:
        a, b = TUMOUR
        img[a:b, a:b] = np.clip(rng.normal((110, 50, 130), 12, (b - a, b - a, 3)), 0, 255)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb")


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, object]:
    slides = []
    for i, tumour in enumerate([False, True, False, True]):
        p = tmp_path / f"s{i}.tif"
        make_slide(p, tumour, i)
        slides.append(p)
    (tmp_path / "labels.csv").write_text("slide,label\ns0.tif,0\ns1,1\ns2,0\ns3,1\n")
    ann = tmp_path / "ann"
    ann.mkdir()
    a, b = TUMOUR
    ring = [[a, a], [b, a], [b, b], [a, b], [a, a]]
    (ann / "s1.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in
                     enumerate(ring[:-1]))
    (ann / "s3.xml").write_text('<ASAP_Annotations><Annotations><Annotation Name="A" '
                                f'Type="Polygon" PartOfGroup="_0"><Coordinates>{coords}'
                                "</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    return {"slides": slides, "labels": tmp_path / "labels.csv", "ann": ann, "tmp": tmp_path}


def test_cohort_metrics_equal_direct_computations(cohort: dict) -> None:
    out = cohort["tmp"] / "out"
    recs = [score_slide(p, DarkScorer(), out, size=32, level=0, min_tissue=0.5,
                        batch_size=64, progress=False) for p in cohort["slides"]]
    labels = read_slide_labels(cohort["labels"])
    assert labels == {"s0": 0, "s1": 1, "s2": 0, "s3": 1}
    res = evaluate_cohort(recs, labels, cohort["ann"], n_boot=200, seed=0)
    sl = res["slide_level"]
    assert sl["n"] == 4 and sl["score_max"]["auroc"]["value"] == 1.0
    assert "flagged_fraction" not in sl  # no threshold given
    ys, ss, truth = [], [], []
    for rec, lab in zip(recs, [0, 1, 0, 1]):
        rows = list(csv.DictReader(open(rec["outputs"]["tiles"])))
        cx = np.array([int(r["x"]) + 16 for r in rows])
        cy = np.array([int(r["y"]) + 16 for r in rows])
        inside = (cx >= TUMOUR[0]) & (cx < TUMOUR[1]) & (cy >= TUMOUR[0]) & (cy < TUMOUR[1])
        ys.append(inside & bool(lab))
        ss.append([float(r["score"]) for r in rows])
        truth.append(int(inside.sum()) if lab else 0)
    tl = res["tile_level"]
    assert [tl["per_slide"][f"s{i}"]["n_tumour_tiles"] for i in range(4)] == truth == [0, 9, 0, 9]
    pooled = tl["pooled"]
    expected = roc_auc_score(np.concatenate(ys), np.concatenate(ss))
    assert pooled["auroc"]["value"] == pytest.approx(expected, abs=1e-12) and expected > 0.99
    assert pooled["n_clusters"] == 4 and "s3.xml" in tl["label_source"]["s3"]
    assert pooled["n_regions"] == 2 and tl["per_slide"]["s1"]["n_regions"] == 1
    assert pooled["aupro"]["value"] > 0.95 and pooled["aupro"]["n_boot"] == 200
    assert tl["per_slide"]["s0"]["auroc"] is None and tl["per_slide"]["s1"]["auroc"] > 0.99
    assert [tl["per_slide"][f"s{i}"]["n_tiles"] for i in range(4)] == [80] * 4  # 10 x 8 tiles
    table = slides_csv(recs, labels).splitlines()
    assert table[0].startswith("slide,label,n_tiles,score_max") and table[2].startswith("s1,1,")


def test_cohort_without_annotation_for_a_tumour_slide(cohort: dict) -> None:
    (cohort["ann"] / "s3.xml").unlink()
    out = cohort["tmp"] / "out"
    recs = [score_slide(p, DarkScorer(), out, size=32, level=0, progress=False)
            for p in cohort["slides"]]
    res = evaluate_cohort(recs, read_slide_labels(cohort["labels"]), cohort["ann"], n_boot=0)
    tl = res["tile_level"]
    assert "s3" not in tl["per_slide"] and "left out" in tl["label_source"]["s3"]
    assert tl["pooled"]["n_clusters"] == 3
    one_class = evaluate_cohort(recs[:1] + recs[2:3], {"s0": 0, "s2": 0}, None, n_boot=0)
    assert "one class" in one_class["slide_level"]["note"]


def test_slide_cli_cohort_end_to_end(cohort: dict, capsys) -> None:
    from gen_ad.app.knn import fit_folder
    from gen_ad.cli import main
    from gen_ad.data.synthetic import write_folder

    tmp = cohort["tmp"]
    write_folder(tmp / "normal", 12, 32, 0, 0.0)
    fit_folder("resnet50", tmp / "normal", tmp / "bank", random_init=True, tiny=True, k=3,
               size=32, workers=0, calib_size=12)
    args = ["slide", *map(str, cohort["slides"]), "--bank", str(tmp / "bank"), "--out",
            str(tmp / "cli"), "--level", "0", "--device", "cpu", "--n-boot", "50"]
    assert main(args + ["--labels", str(cohort["labels"]), "--annotations",
                        str(cohort["ann"])]) == 0
    text = capsys.readouterr().out
    assert "slide level (4 slides, 2 tumour), score_max: AUROC" in text
    assert "tile level (" in text and "CIs resample slides" in text
    res = json.loads((tmp / "cli" / "cohort.json").read_text())
    assert res["n_slides"] == 4 and "flagged_fraction" in res["slide_level"]  # bank threshold
    assert (tmp / "cli" / "slides.csv").read_text().count("\n") == 5
    (tmp / "bad.csv").write_text("slide,label\ns0,0\n")
    assert main(args[:-2] + ["--labels", str(tmp / "bad.csv"), "--out", str(tmp / "x")]) == 2
    assert "no label for slide(s) s1, s2, s3" in capsys.readouterr().err
    (tmp / "worse.csv").write_text("slide,label\ns0,tumour\n")
    with pytest.raises(DataError, match="must be 0"):
        read_slide_labels(tmp / "worse.csv")


def test_tile_regions_are_connected_groups_of_tumour_tiles() -> None:
    table = {"row": np.array([0, 0, 1, 3, 3, 2]), "col": np.array([0, 1, 1, 3, 4, 4])}
    tumour = np.array([1, 1, 1, 1, 1, 0])
    w = tile_region_weights(table, tumour, (4, 5))
    assert w == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 0.0])


def test_label_entries_keep_dots_that_are_not_slide_suffixes(tmp_path: Path) -> None:
    """TCGA stems contain dots: a label entry loses only a known slide/image suffix."""
    from gen_ad.app.cohort import check_inputs, label_key

    assert label_key("TCGA-A1-A0SB-01Z-00-DX1.B34C267B") == "TCGA-A1-A0SB-01Z-00-DX1.B34C267B"
    assert label_key("dir/TCGA-A1-A0SB-01Z-00-DX1.B34C267B.SVS") == \
        "TCGA-A1-A0SB-01Z-00-DX1.B34C267B"
    assert label_key("case.ome.tiff") == "case.ome" and label_key("a.mrxs") == "a"
    (tmp_path / "l.csv").write_text("slide,label\nTCGA-X-DX1.B34C267B,1\nTCGA-X-DX1.5F2E,0\n"
                                    "c.svs,0\n")
    labels = read_slide_labels(tmp_path / "l.csv")
    assert labels == {"TCGA-X-DX1.B34C267B": 1, "TCGA-X-DX1.5F2E": 0, "c": 0}  # not merged
    check_inputs(["/d/TCGA-X-DX1.B34C267B.svs", "/d/TCGA-X-DX1.5F2E.svs", "/d/c.svs"],
                 labels, None)
