"""Bugs a static type check (mypy) found in region-annotation reading.

A GeoJSON geometry whose ``coordinates`` are null or not lists reached ``for r in poly`` and
raised a bare ``TypeError`` (a traceback from ``gen-ad slide``) instead of the module's
``DataError``; a null ``Polygon`` is now skipped like a null ``MultiPolygon`` always was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gen_ad.data.annotations import read_regions
from gen_ad.errors import DataError

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]


def _write(tmp_path: Path, *geoms: dict) -> Path:
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": g} for g in geoms]}))
    return p


def test_null_polygon_is_skipped_like_a_null_multipolygon(tmp_path: Path) -> None:
    p = _write(tmp_path, {"type": "Polygon", "coordinates": None},
               {"type": "MultiPolygon", "coordinates": None},
               {"type": "Polygon", "coordinates": [SQUARE]})
    regions = read_regions(p)
    assert len(regions.polygons) == 1
    assert regions.contains([50, 150], [50, 50]).tolist() == [True, False]


@pytest.mark.parametrize("geom", [
    {"type": "Polygon", "coordinates": 5},
    {"type": "MultiPolygon", "coordinates": [None]},
    {"type": "MultiPolygon", "coordinates": 7},
    {"type": "MultiPolygon", "coordinates": [[SQUARE], 3]},
])
def test_non_list_coordinates_are_a_data_error(tmp_path: Path, geom: dict) -> None:
    with pytest.raises(DataError, match="bad .*Polygon coordinates"):
        read_regions(_write(tmp_path, geom))


@pytest.mark.parametrize("features", [None, 5, "x", {"a": 1}])
def test_a_collection_whose_features_are_not_a_list(tmp_path: Path, features: object) -> None:
    """``"features": null`` is an empty collection; anything else not a list is a DataError
    naming the file (both were a bare TypeError or silently odd before)."""
    p = tmp_path / "f.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": features}),
                 encoding="utf-8")
    if features is None:
        regions = read_regions(p)
        assert not regions.polygons and not regions.exclusions
    else:
        with pytest.raises(DataError, match="f.geojson"):
            read_regions(p)


@pytest.mark.parametrize("doc", ['{"type": "FeatureCollection", "features": null}', "5", "null",
                                 '"text"'])
def test_cell_centroids_from_odd_geojson_are_clear_errors(tmp_path: Path, doc: str) -> None:
    from gen_ad.data.cells import read_centroids

    p = tmp_path / "c.geojson"
    p.write_text(doc, encoding="utf-8")
    with pytest.raises(DataError, match="c.geojson"):
        read_centroids(p)
