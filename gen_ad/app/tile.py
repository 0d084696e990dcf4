"""``gen-ad tile``: cut whole-slide images into tissue tiles (PNG files and one manifest)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from gen_ad.data.wsi import MANIFEST_NAME, tile_slides


def tile(slides: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], size: int,
         **kwargs: Any) -> list[str]:
    """Tile every slide (``kwargs``: see :func:`~gen_ad.data.wsi.tile_slides`); returns one
    summary line per slide and the manifest path."""
    summaries = tile_slides(slides, out, size, **kwargs)
    lines = []
    for s in summaries:
        mpp = (f"{s.mpp * s.downsample:.3g} um/px; level 0 {s.mpp:.4g} um/px, {s.mpp_source}"
               if s.mpp is not None else "mpp unknown")
        lines.append(f"{s.slide}: {s.backend}, level {s.level}, downsample {s.downsample:.3g} "
                     f"({mpp}), {len(s.records)} of {s.grid_cells} grid tiles kept")
    lines.append(f"manifest: {out}/{MANIFEST_NAME}")
    return lines
