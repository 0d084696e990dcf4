"""Issue 16 on data folders: float RGB TIFFs are read, masks/ is never a class, and a tiling
manifest naming paths outside its folder is refused before anything is deleted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gen_ad.data.folders import PatchFolder, discover_classes, read_rgb
from gen_ad.data.wsi import MANIFEST_COLUMNS, read_manifest, tile_slides, update_manifest
from gen_ad.errors import DataError


def test_float_rgb_tiffs_are_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    unit = rng.random((6, 5, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "unit.tif", unit)
    tifffile.imwrite(tmp_path / "planar.tiff", np.moveaxis(unit, -1, 0).astype(np.float64),
                     photometric="rgb", planarconfig="separate")
    expected = np.rint(unit.astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_rgb(tmp_path / "unit.tif"), expected)
    np.testing.assert_array_equal(read_rgb(tmp_path / "planar.tiff"), expected)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "broken.tif")


def test_masks_folder_is_never_a_class(tmp_path: Path) -> None:
    for cls in ("normal", "anomalous", "masks"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / "0.png")
    found, flat = discover_classes(tmp_path)
    assert sorted(found) == ["anomalous", "normal"] and not flat
    ds = PatchFolder(root=tmp_path, size=8)  # what `gen-ad knn score` lists
    assert sorted({s.cls for s in ds.samples}) == ["anomalous", "normal"]


@pytest.mark.parametrize("rel", ["../victim.png", "/ABS/victim.png", "sub/../../victim.png"])
def test_manifest_outside_paths_are_refused(tmp_path: Path, rel: str) -> None:
    out = tmp_path / "tiles"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    rel = rel.replace("/ABS", str(tmp_path))
    (out / "manifest.csv").write_text(",".join(MANIFEST_COLUMNS) + f"\ns,0,0,0,1.0,{rel}\n")
    with pytest.raises(DataError, match="outside the folder|not relative"):
        read_manifest(out / "manifest.csv")
    with pytest.raises(DataError, match="refusing the path"):
        update_manifest(out, ["s"], [])
    assert victim.read_bytes() == b"keep"


def test_tile_refuses_a_hostile_manifest_before_deleting(shared_data: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    (out / "manifest.csv").write_text(",".join(MANIFEST_COLUMNS) +
                                      "\nCMU-1-Small-Region,0,0,0,1.0,../victim.png\n")
    with pytest.raises(DataError, match="outside the folder"):
        tile_slides([slide], out, 512, level=0, progress=False)
    assert victim.read_bytes() == b"keep"
