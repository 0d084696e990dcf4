"""Inference export (``<run>/model/``); :func:`gen_ad.training.runs.load_run` rebuilds a run.

``model/`` holds one safetensors file per network (EMA copies as ``<name>_ema``),
``model.json`` with the family name, the resolved config, the counters and the file list,
``stain_ref.png`` for a run trained on stain-normalised patches (its scorers normalise queries
towards it), and ``manifest.json`` (sizes and sha256 of every file, written last). A run is
rebuilt from its saved config alone, without pickles and without the training code's state.
The folder is assembled under a temporary name and swapped in as a set, and ``load_run`` checks
the manifest, so weights of different steps are never mixed and damaged files are never loaded.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gen_ad.config import to_dict
from gen_ad.errors import CheckpointError
from gen_ad.training.family import Family
from gen_ad.utils.io import (
    MANIFEST,
    atomic_dir,
    check_manifest,
    publish_dir,
    save_safetensors,
    write_json,
    write_manifest,
)

FORMAT_VERSION = 2
STAIN_REF = "stain_ref.png"  # the stain reference of a stain-normalised run, copied in


def export_models(model_dir: Path, *, family: Family, models: Mapping[str, nn.Module],
                  ema: Mapping[str, nn.Module], counters: Any) -> None:
    """Publish ``model_dir`` as a whole: ``<name>.safetensors`` for every model and EMA copy,
    ``model.json``, then ``manifest.json``, assembled aside and swapped in as a set."""
    tmp = atomic_dir(model_dir)
    try:
        files = {}
        for name, m in models.items():
            save_safetensors(tmp / f"{name}.safetensors", m.state_dict())
            files[name] = f"{name}.safetensors"
        for name, m in ema.items():
            save_safetensors(tmp / f"{name}_ema.safetensors", m.state_dict())
            files[f"{name}_ema"] = f"{name}_ema.safetensors"
        meta = {
            "format": FORMAT_VERSION,
            "family": family.name,
            "files": files,
            "ema": sorted(ema),
            "step": counters.step,
            "kimg": counters.kimg,
            "config": to_dict(family.cfg),
        }
        stain_ref = _copy_stain_reference(family.cfg, tmp)
        if stain_ref is not None:
            meta["stain_ref"] = stain_ref
        write_json(tmp / "model.json", meta)
        write_manifest(tmp, {"step": counters.step})
        publish_dir(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_stain_reference(cfg: Any, folder: Path) -> str | None:
    """Copy the stain reference of a stain-normalised run into the export (as PNG), so scoring
    normalises queries the same way wherever the run folder goes; returns its file name."""
    data = getattr(cfg, "data", None)
    if data is None or getattr(data, "stain_norm", "none") == "none" or data.stain_ref is None:
        return None
    from PIL import Image

    from gen_ad.data.folders import read_rgb

    Image.fromarray(read_rgb(data.stain_ref)).save(folder / STAIN_REF, format="PNG")
    return STAIN_REF


def _json_field(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def verify_export(model_dir: Path) -> None:
    """Check an export against its manifest (a legacy export without one only warns).

    Raises:
        CheckpointError: a file is missing, damaged, or from another export (mixed steps).
    """
    if not (model_dir / MANIFEST).is_file():
        fmt = _json_field(model_dir / "model.json", "format")
        if not isinstance(fmt, int) or fmt >= FORMAT_VERSION:
            raise CheckpointError(f"refusing the export {model_dir}: its {MANIFEST} is missing "
                                  "(incomplete or damaged; resume the run to export it again)")
        warnings.warn(f"{model_dir} has no integrity manifest (exported by an older gen_ad); "
                      "loading it unverified", stacklevel=2)
        return
    try:
        manifest = check_manifest(model_dir)
    except CheckpointError as e:
        raise CheckpointError(f"refusing the damaged or mixed export {model_dir}: {e}; a file "
                              "changed after the export (damaged, or edited by hand: the config "
                              "an export carries is what rebuilds its networks); resume the run "
                              "to export it again") from e
    if "model.json" not in manifest["files"]:
        raise CheckpointError(f"refusing the export {model_dir}: its manifest does not list "
                              "model.json")
