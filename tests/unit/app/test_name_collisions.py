"""Outputs named by a file's stem: names that differ only by letter case are refused, since macOS
and Windows file systems would write both into one folder (one overwriting the other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.errors import DataError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    return path


def test_slide_names_equal_but_for_case_are_refused(tmp_path: Path) -> None:
    from gen_ad.app.cohort import check_inputs

    with pytest.raises(DataError, match="share the name S1, s1 .*letter case"):
        check_inputs([tmp_path / "a" / "S1.svs", tmp_path / "b" / "s1.svs"], None, None)
    check_inputs([tmp_path / "a" / "S1.svs", tmp_path / "b" / "S2.svs"], None, None)


def test_tiling_refuses_slides_equal_but_for_case(tmp_path: Path) -> None:
    from gen_ad.data.wsi import tile_slides

    a, b = _png(tmp_path / "a" / "Liver.png"), _png(tmp_path / "b" / "liver.png")
    with pytest.raises(DataError, match="share the name 'liver' \\(letter case aside\\)"):
        tile_slides([a, b], tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cell_inputs_equal_but_for_case_are_refused(tmp_path: Path) -> None:
    from gen_ad.app.cells import _inputs

    a, b = _png(tmp_path / "a" / "F1.png"), _png(tmp_path / "b" / "f1.png")
    with pytest.raises(DataError, match="share the name 'f1' \\(letter case aside\\)"):
        _inputs([a, b])
    assert _inputs([a, a]) == [a]  # the same file twice is one input


@pytest.mark.parametrize("name", ["...svs", "..png"])
def test_inputs_whose_stem_is_dots_are_refused(tmp_path: Path, name: str) -> None:
    """A file named ``...svs`` has the stem ``..``: its outputs went to the parent of ``--out``
    (slides), and the cells' stale-crop clean-up deleted PNGs there."""
    from gen_ad.app.cells import _inputs
    from gen_ad.app.cohort import check_inputs
    from gen_ad.data.wsi import tile_slides

    f = _png(tmp_path / "in" / "x.png").rename(tmp_path / "in" / name)
    for call in (lambda: check_inputs([f], None, None), lambda: tile_slides([f], tmp_path / "o", 8),
                 lambda: _inputs([f])):
        with pytest.raises(DataError, match="empty, '.' or '..'"):
            call()


@pytest.mark.parametrize("entry,key", [({"name": "ok\n"}, "methods[0].name"),
                                       ({"run": ".."}, "methods[0].name"),
                                       ({"run": "/"}, "methods[0].name")])
def test_benchmark_method_names_must_name_a_folder(tmp_path: Path, entry: dict[str, str],
                                                   key: str) -> None:
    """A method's outputs go to ``<out>/methods/<name>/``: a name with a trailing newline passed
    the check, and a name derived from a run folder ``..`` wrote into ``<out>`` itself."""
    from gen_ad.app.benchmark import BenchmarkConfig
    from gen_ad.config import from_dict
    from gen_ad.errors import ConfigError

    method = {"scorer": None, "run": str(tmp_path / "run"), **entry}
    raw = {"out": str(tmp_path / "b"), "data": {"test": "t", "val": "v"}, "methods": [method]}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(BenchmarkConfig, raw).validate("")
