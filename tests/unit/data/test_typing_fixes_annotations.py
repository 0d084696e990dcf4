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
