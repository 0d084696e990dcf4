"""Region annotations of a slide (tumour outlines) and which points they cover.

Two formats, coordinates in level-0 pixels:

- **GeoJSON** (QuPath, napari, most tools): ``Polygon`` / ``MultiPolygon`` geometries (a
  ``FeatureCollection``, a list of features, one feature or a bare geometry); a polygon's first
  ring is its outline and the further rings are holes.
- **ASAP XML** (the Camelyon16 annotations): ``<Annotation Type="Polygon" PartOfGroup=...>``
  with ``<Coordinate X= Y=>`` vertices. As in Camelyon16, annotations of the group ``_2`` (or
  any group named ``Exclusion``) mark normal tissue inside tumour outlines and are subtracted;
  every other group (``_0``, ``_1``, ``Tumor``, ...) is tumour.

A point is covered when it lies inside an outline, outside that outline's holes and outside
every exclusion (boundary points count as inside or not as matplotlib's ``Path`` decides).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.path import Path as MplPath

from gen_ad.errors import DataError

EXCLUSION_GROUPS = ("_2", "exclusion")


@dataclass
class Regions:
    """Annotated regions of one slide (level-0 pixel coordinates).

    Attributes:
        polygons: ``(outline [K,2], holes [[K,2], ...])`` pairs.
        exclusions: rings whose inside is not covered, whatever the polygons say.
    """

    polygons: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)
    exclusions: list[np.ndarray] = field(default_factory=list)

    def contains(self, xs: Any, ys: Any) -> np.ndarray:
        """``[N]`` bool: which points ``(xs[i], ys[i])`` the regions cover."""
        pts = np.stack([np.asarray(xs, np.float64).reshape(-1),
                        np.asarray(ys, np.float64).reshape(-1)], axis=1)
        inside = np.zeros(len(pts), dtype=bool)
        for outline, holes in self.polygons:
            hit = MplPath(outline).contains_points(pts)
            for hole in holes:
                hit &= ~MplPath(hole).contains_points(pts)
            inside |= hit
        for ring in self.exclusions:
            inside &= ~MplPath(ring).contains_points(pts)
        return inside


def _ring(coords: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bad polygon coordinates ({e})") from e
    if ring.ndim != 2 or ring.shape[1] < 2 or ring.shape[0] < 3:
        raise DataError(f"{where}: a polygon ring needs at least 3 [x, y] vertices")
    return ring[:, :2]


def _geometries(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features", [])
    elif isinstance(doc, list):
        items = doc
    else:
        items = [doc]
    return [(f.get("geometry") if f.get("type") == "Feature" else f) or {}
            for f in items if isinstance(f, dict)]


def read_geojson(path: str | os.PathLike[str]) -> Regions:
    """Polygons (with holes) of a GeoJSON file; other geometry types are an error."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not readable GeoJSON ({e})") from e
    out = Regions()
    for geom in _geometries(doc):
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind == "Polygon":
            polys = [coords]
        elif kind == "MultiPolygon":
            polys = coords
        else:
            raise DataError(f"{p}: region annotations must be Polygon or MultiPolygon, "
                            f"found {kind!r}")
        for poly in polys or []:
            rings = [_ring(r, str(p)) for r in poly]
            if rings:
                out.polygons.append((rings[0], rings[1:]))
    return out


def read_asap_xml(path: str | os.PathLike[str]) -> Regions:
    """Polygons of an ASAP XML file (Camelyon16): group ``_2``/``Exclusion`` subtracted."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{p}: not readable ASAP XML ({e})") from e
    out = Regions()
    for ann in root.iter("Annotation"):
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            ring = _ring([[float(c.get("X", "")), float(c.get("Y", ""))] for c in coords],
                         f"{p} ({ann.get('Name', '?')})")
        except ValueError as e:
            raise DataError(f"{p}: bad coordinate in {ann.get('Name', '?')} ({e})") from e
        if (ann.get("PartOfGroup") or "").lower() in EXCLUSION_GROUPS:
            out.exclusions.append(ring)
        else:
            out.polygons.append((ring, []))
    return out


def read_regions(path: str | os.PathLike[str]) -> Regions:
    """GeoJSON (``.json``/``.geojson``) or ASAP XML (``.xml``) region annotations."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path)
    if suffix in (".json", ".geojson"):
        return read_geojson(path)
    raise DataError(f"{path}: unknown annotation format (use .geojson/.json or ASAP .xml)")


def find_annotation(folder: str | os.PathLike[str], stem: str) -> Path | None:
    """``folder/<stem>.{geojson,json,xml}`` if exactly one exists (``None`` if none)."""
    hits = [Path(folder) / f"{stem}{ext}" for ext in (".geojson", ".json", ".xml")]
    found = [h for h in hits if h.is_file()]
    if len(found) > 1:
        raise DataError(f"several annotation files for slide '{stem}': "
                        f"{', '.join(str(f) for f in found)}")
    return found[0] if found else None
