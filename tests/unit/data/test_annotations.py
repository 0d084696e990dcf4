"""Region annotations: GeoJSON polygons with holes, ASAP XML with Camelyon16 exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gen_ad.data.annotations import find_annotation, read_regions
from gen_ad.errors import DataError

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]


def test_geojson_polygon_with_hole_and_multipolygon(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": "Tumor"},
         "geometry": {"type": "Polygon", "coordinates": [SQUARE, HOLE]}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[200, 200], [220, 200], [220, 220], [200, 220]]]]}}]}
    (tmp_path / "s.geojson").write_text(json.dumps(doc))
    regions = read_regions(tmp_path / "s.geojson")
    xs = np.array([10, 50, 150, 210, 99])
    ys = np.array([10, 50, 150, 210, 50])
    assert regions.contains(xs, ys).tolist() == [True, False, False, True, True]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"type": "Polygon", "coordinates": [SQUARE]}))
    assert read_regions(bare).contains([50], [50]).tolist() == [True]


def test_asap_xml_subtracts_camelyon_exclusions(tmp_path: Path) -> None:
    def ann(name: str, group: str, ring: list[list[int]]) -> str:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />'
                         for i, (x, y) in enumerate(ring[:-1]))
        return (f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}">'
                f"<Coordinates>{coords}</Coordinates></Annotation>")
    xml = ('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
           + ann("Annotation 0", "_0", SQUARE) + ann("Annotation 1", "_2", HOLE)
           + "</Annotations></ASAP_Annotations>")
    (tmp_path / "t.xml").write_text(xml)
    regions = read_regions(tmp_path / "t.xml")
    assert len(regions.polygons) == 1 and len(regions.exclusions) == 1
    assert regions.contains([10, 50, 150], [10, 50, 150]).tolist() == [True, False, False]


def test_annotation_errors(tmp_path: Path) -> None:
    (tmp_path / "p.geojson").write_text(json.dumps({"type": "Circle", "coordinates": [1, 2]}))
    with pytest.raises(DataError, match="Polygon or MultiPolygon"):
        read_regions(tmp_path / "p.geojson")
    (tmp_path / "thin.geojson").write_text(json.dumps(
        {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}))
    with pytest.raises(DataError, match="at least 3"):
        read_regions(tmp_path / "thin.geojson")
    (tmp_path / "bad.xml").write_text("<ASAP_Annotations>")
    with pytest.raises(DataError, match="ASAP XML"):
        read_regions(tmp_path / "bad.xml")
    with pytest.raises(DataError, match="unknown annotation format"):
        read_regions(tmp_path / "a.csv")
    assert find_annotation(tmp_path, "none") is None
    (tmp_path / "p.xml").write_text("<ASAP_Annotations/>")
    with pytest.raises(DataError, match="several annotation files"):
        find_annotation(tmp_path, "p")


def test_geojson_exclusion_classes_and_points_lines_skipped(tmp_path: Path) -> None:
    def feat(geom: dict, cls: object = None) -> dict:
        props = {} if cls is None else {"classification": cls}
        return {"type": "Feature", "properties": props, "geometry": geom}
    big = {"type": "Polygon", "coordinates": [[[0, 0], [300, 0], [300, 100], [0, 100]]]}
    doc = {"type": "FeatureCollection", "features": [
        feat(big, {"name": "Tumor", "color": [200, 0, 0]}),
        feat({"type": "Polygon", "coordinates": [HOLE]}, {"name": "Exclusion"}),
        feat({"type": "Polygon", "coordinates": [[[110, 10], [130, 10], [130, 30], [110, 30]]]},
             {"name": "Ignore*"}),  # QuPath's ignore class
        feat({"type": "MultiPolygon", "coordinates": [[[[210, 10], [230, 10], [230, 30],
                                                        [210, 30]]]]}, "ignore"),
        feat({"type": "Point", "coordinates": [50, 50]}, {"name": "Tumor"}),
        feat({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        feat({"type": "Polygon", "coordinates": [[[400, 0], [500, 0], [500, 100]]]},
             {"name": "Ignored tissue"}),  # only the exact names exclude
    ]}
    (tmp_path / "q.geojson").write_text(json.dumps(doc))
    with pytest.warns(RuntimeWarning, match="1 LineString, 1 Point"):
        regions = read_regions(tmp_path / "q.geojson")
    assert len(regions.polygons) == 2 and len(regions.exclusions) == 3
    xs, ys = [10, 50, 120, 220, 290, 480], [10, 50, 20, 20, 90, 20]
    assert regions.contains(xs, ys).tolist() == [True, False, False, False, True, True]


def test_asap_xml_skips_dots_and_point_sets(tmp_path: Path) -> None:
    def ann(kind: str, group: str, ring: list[list[int]]) -> str:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />'
                         for i, (x, y) in enumerate(ring))
        return (f'<Annotation Name="{kind} a" Type="{kind}" PartOfGroup="{group}">'
                f"<Coordinates>{coords}</Coordinates></Annotation>")
    xml = ('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
           + ann("Polygon", "_0", SQUARE[:-1]) + ann("Dot", "_0", [[50, 50]])
           + ann("PointSet", "_1", [[1, 1], [2, 2], [3, 3], [4, 1]])
           + ann("Spline", "Tumor", [[200, 200], [220, 200], [220, 220], [200, 220]])
           + "</Annotations></ASAP_Annotations>")
    (tmp_path / "d.xml").write_text(xml)
    with pytest.warns(RuntimeWarning, match=r"2 annotation\(s\) without area: Dot a \(Dot\)"):
        regions = read_regions(tmp_path / "d.xml")
    assert len(regions.polygons) == 2 and not regions.exclusions
    assert regions.contains([50, 210, 150], [50, 210, 150]).tolist() == [True, True, False]
