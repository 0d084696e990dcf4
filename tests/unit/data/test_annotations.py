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
    (tmp_path / "p.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
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
