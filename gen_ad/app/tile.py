"""``gen-ad tile``: cut whole-slide images into tissue tiles (PNG files and one manifest)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from gen_ad.data.wsi import MANIFEST_NAME, tile_slides


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tile(slides: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], size: int,
         fresh: bool = False, **kwargs: Any) -> list[str]:
    """Tile every slide (``kwargs``: see :func:`~gen_ad.data.wsi.tile_slides`).

    A slide finished earlier into ``out`` with the same settings (its completion record, see
    :mod:`gen_ad.data.tile_records`) is reused, one stderr line each, unless ``fresh``; the
    others are tiled from an empty start. ``manifest.csv`` lists exactly these slides; files of
    slides tiled earlier but not named now stay in ``out``, unlisted (a stderr note says so).

    Returns:
        One summary line per slide and the manifest path.
    """
    summaries = tile_slides(slides, out, size, reuse=not fresh, keep_others=False, log=_say,
                            **kwargs)
    lines = []
    for s in summaries:
        mpp = (f"{s.mpp * s.downsample:.3g} um/px; level 0 {s.mpp:.4g} um/px, {s.mpp_source}"
               if s.mpp is not None else "mpp unknown")
        lines.append(f"{s.slide}: {s.backend}, level {s.level}, downsample {s.downsample:.3g} "
                     f"({mpp}), {len(s.records)} of {s.grid_cells} grid tiles kept"
                     f"{' (reused)' if s.reused else ''}")
    lines.append(f"manifest: {out}/{MANIFEST_NAME}")
    return lines
