"""``gen-ad synth``: procedural H&E-like patches with planted anomalies, and a contact sheet."""

from __future__ import annotations

import os
from pathlib import Path

from gen_ad.data.synthetic import SHEET_NAME, generate, write_folder
from gen_ad.report.sheets import save_contact_sheet
from gen_ad.utils.lock import writes_folder


@writes_folder("out", "synth output folder")
def synth(out: str | os.PathLike[str], n: int, size: int = 64, anomaly_fraction: float = 0.0,
          seed: int = 0, sheet: str | os.PathLike[str] | None = None) -> str:
    """Write ``n`` patches (``normal/``, ``anomalous/``, ``masks/``, ``manifest.csv``) into ``out``
    and a contact sheet of the first 32 with mask outlines. A set written there before is
    replaced (its listed files deleted); a folder of other images is refused
    (:func:`~gen_ad.data.synthetic.write_folder`). Returns the summary line."""
    root = Path(out)
    counts = write_folder(root, n, size, seed, anomaly_fraction)
    shown = generate(min(n, 32), size, seed, anomaly_fraction)
    labels = ["" if k == "normal" else k for k in shown.kinds]
    path = save_contact_sheet(sheet or root / SHEET_NAME, shown.images, shown.masks,
                              ncol=8, labels=labels, scale=max(1, 128 // size))
    detail = ", ".join(f"{k} {v}" for k, v in counts.items()
                       if k not in ("normal", "anomalous", "replaced"))
    replaced = (f"; replaced the earlier set there ({counts['replaced']} files deleted)"
                if counts["replaced"] else "")
    return (f"synth: wrote {counts['normal']} normal + {counts['anomalous']} anomalous "
            f"({detail}) {size}px patches to {root}; contact sheet {path}{replaced}")
