"""Region annotations of a slide (tumour outlines) and which points they cover.

Two formats, coordinates in level-0 pixels:

- **GeoJSON** (QuPath, napari, most tools): ``Polygon`` / ``MultiPolygon`` geometries (a
  ``FeatureCollection``, a list of features, one feature, a bare geometry or a
  ``GeometryCollection``); a polygon's first ring is its outline and the further rings are holes.
  A feature whose ``properties.classification`` (QuPath's ``{"name": ...}`` object, or a plain
  string) is named ``Exclusion`` or ``Ignore`` (case-insensitive, a trailing ``*`` as in QuPath's
  ``Ignore*`` class dropped) marks normal tissue and is subtracted, like ASAP's group ``_2``.
  Points and lines (``Point``, ``MultiPoint``, ``LineString``, ``MultiLineString``) cover no area
  and are skipped with a warning.
- **ASAP XML** (the Camelyon16 annotations): ``<Annotation Type="Polygon" PartOfGroup=...>``
  with ``<Coordinate X= Y=>`` vertices. As in Camelyon16, annotations of the group ``_2`` (or
  any group named ``Exclusion``) mark normal tissue inside tumour outlines and are subtracted;
  every other group (``_0``, ``_1``, ``Tumor``, ...) is tumour. Annotations of the types
  ``Dot``, ``PointSet`` and ``Measurement`` cover no area and are skipped with a warning.

A point is covered when it lies inside an outline, outside that outline's holes and outside
every exclusion (boundary points count as inside or not as matplotlib's ``Path`` decides).
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import numpy as np
from matplotlib.path import Path as MplPath

from gen_ad.errors import DataError

EXCLUSION_GROUPS = ("_2", "exclusion")  # ASAP PartOfGroup (lower case)
EXCLUSION_CLASSES = ("exclusion", "ignore")  # GeoJSON classification names (lower case, no *)
NON_AREA_ASAP = ("dot", "pointset", "measurement")
NON_AREA_GEOJSON = ("Point", "MultiPoint", "LineString", "MultiLineString")

Polygon = tuple[np.ndarray, list[np.ndarray]]


@dataclass
class Regions:
    """Annotated regions of one slide (level-0 pixel coordinates).

    Attributes:
        polygons: ``(outline [K,2], holes [[K,2], ...])`` pairs.
        exclusions: polygons (same form) whose inside is not covered, whatever ``polygons`` say.
    """

    polygons: list[Polygon] = field(default_factory=list)
    exclusions: list[Polygon] = field(default_factory=list)

    def contains(self, xs: Any, ys: Any) -> np.ndarray:
        """``[N]`` bool: which points ``(xs[i], ys[i])`` the regions cover."""
        pts = np.stack([np.asarray(xs, np.float64).reshape(-1),
                        np.asarray(ys, np.float64).reshape(-1)], axis=1)
        return _inside(self.polygons, pts) & ~_inside(self.exclusions, pts)


def _inside(polygons: list[Polygon], pts: np.ndarray) -> np.ndarray:
    """``[N]`` bool: points inside any of the polygons (outside their holes)."""
    inside = np.zeros(len(pts), dtype=bool)
    for outline, holes in polygons:
        hit = MplPath(outline).contains_points(pts)
        for hole in holes:
            hit &= ~MplPath(hole).contains_points(pts)
        inside |= hit
    return inside


def _ring(coords: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bad polygon coordinates ({e})") from e
    if ring.ndim != 2 or ring.shape[1] < 2 or ring.shape[0] < 3:
        raise DataError(f"{where}: a polygon ring needs at least 3 [x, y] vertices")
    return ring[:, :2]


def _features(doc: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(geometry, properties)`` of every feature or bare geometry (collections flattened)."""
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features") or []  # null: an empty collection
        if not isinstance(items, list):
            raise DataError(f"a FeatureCollection's features must be a list, got "
                            f"{type(items).__name__}")
    elif isinstance(doc, list):
        items = doc
    else:
        items = [doc]
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for f in items:
        if not isinstance(f, dict):
            continue
        is_feature = f.get("type") == "Feature"
        geom = (f.get("geometry") if is_feature else f) or {}
        props = (f.get("properties") if is_feature else None) or {}
        if geom.get("type") == "GeometryCollection":
            out.extend((g, props) for g in geom.get("geometries") or [] if isinstance(g, dict))
        else:
            out.append((geom, props))
    return out


def is_exclusion_class(properties: dict[str, Any]) -> bool:
    """Whether a GeoJSON feature's ``classification`` names an exclusion (see the module)."""
    cls = properties.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    return isinstance(name, str) and name.strip().rstrip("*").lower() in EXCLUSION_CLASSES


def read_geojson(path: str | os.PathLike[str]) -> Regions:
    """Polygons (with holes) of a GeoJSON file, exclusion-classified ones subtracted; points
    and lines skipped with a warning; any other geometry type is an error."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8
        raise DataError(f"{p}: not readable GeoJSON ({e})") from e
    out = Regions()
    skipped: dict[str, int] = {}
    try:
        features = _features(doc)
    except DataError as e:
        raise DataError(f"{p}: {e}") from e
    for geom, props in features:
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind == "Polygon":
            polys = [] if coords is None else [coords]  # null: no polygon, as for MultiPolygon
        elif kind == "MultiPolygon":
            polys = coords or []
        elif kind in NON_AREA_GEOJSON:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        else:
            raise DataError(f"{p}: region annotations must be Polygon or MultiPolygon, "
                            f"found {kind!r}")
        if not isinstance(polys, list) or not all(isinstance(q, list) for q in polys):
            raise DataError(f"{p}: bad {kind} coordinates (a polygon is a list of rings)")
        dest = out.exclusions if is_exclusion_class(props) else out.polygons
        for poly in polys:
            rings = [_ring(r, str(p)) for r in poly]
            if rings:
                dest.append((rings[0], rings[1:]))
    if skipped:
        what = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
        warnings.warn(f"{p}: skipped {what} geometries (no area; regions are polygons)",
                      RuntimeWarning, stacklevel=2)
    return out


def _refuse_doctype(data: bytes, p: Path) -> None:
    """Refuse an XML document type declaration: ASAP files have none, and its entities are how
    a file expands to gigabytes ("billion laughs"), whichever expat version Python uses."""
    def refuse(*_: Any) -> None:
        raise DataError(f"{p}: refusing an XML document type declaration (<!DOCTYPE>, entities); "
                        "ASAP XML has none")

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.Parse(data, True)


def read_asap_xml(path: str | os.PathLike[str]) -> Regions:
    """Polygons of an ASAP XML file (Camelyon16): group ``_2``/``Exclusion`` subtracted;
    ``Dot``/``PointSet``/``Measurement`` annotations skipped with a warning; a ``<!DOCTYPE>``
    (entity declarations) is refused."""
    p = Path(path)
    try:
        data = p.read_bytes()
        _refuse_doctype(data, p)
        root = ET.fromstring(data)
    except (OSError, ET.ParseError, expat.ExpatError) as e:
        raise DataError(f"{p}: not readable ASAP XML ({e})") from e
    out = Regions()
    skipped: list[str] = []
    for ann in root.iter("Annotation"):
        name = ann.get("Name", "?")
        if (ann.get("Type") or "").lower() in NON_AREA_ASAP:
            skipped.append(f"{name} ({ann.get('Type')})")
            continue
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            ring = _ring([[float(c.get("X", "")), float(c.get("Y", ""))] for c in coords],
                         f"{p} ({name})")
        except ValueError as e:
            raise DataError(f"{p}: bad coordinate in {name} ({e})") from e
        if (ann.get("PartOfGroup") or "").lower() in EXCLUSION_GROUPS:
            out.exclusions.append((ring, []))
        else:
            out.polygons.append((ring, []))
    if skipped:
        warnings.warn(f"{p}: skipped {len(skipped)} annotation(s) without area: "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                      RuntimeWarning, stacklevel=2)
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
