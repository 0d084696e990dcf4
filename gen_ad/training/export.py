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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gen_ad.config import to_dict
from gen_ad.errors import CheckpointError
from gen_ad.training.checkpoint import Counters
from gen_ad.training.family import Family
from gen_ad.utils.io import (
    MANIFEST,
    atomic_dir,
    check_files,
    checked_bytes,
    inside,
    json_object,
    publish_dir,
    read_manifest_file,
    save_safetensors,
    write_json,
    write_manifest,
)
from gen_ad.utils.provenance import environment

FORMAT_VERSION = 2
STAIN_REF = "stain_ref.png"  # the stain reference of a stain-normalised run, copied in


def export_models(model_dir: Path, *, family: Family, models: Mapping[str, nn.Module],
                  ema: Mapping[str, nn.Module], counters: Counters) -> None:
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
            "environment": environment(),
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


#: Which files of an export to read, given its ``model.json`` content (file names in ``model/``).
Pick = Callable[[Mapping[str, Any]], Iterable[str]]


def read_export(model_dir: Path, pick: Pick, attempts: int = 3,
                ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``model.json`` and the files ``pick(model.json)`` names, each read once and checked
    against one reading of the manifest, which the export's other files are checked against too.

    Load from the returned bytes, never by opening the files again: a training publishing a new
    export meanwhile would mix in weights of another step. A check that fails while the manifest
    changed under it (a new export was published during the read) is retried.

    Returns:
        ``(model.json content, {file name: verified bytes})``.
    Raises:
        CheckpointError: a file is missing, damaged, or from another export (mixed steps), or
            the export has no manifest (a legacy export without one only warns).
    """
    for _ in range(attempts - 1):
        before = _manifest_bytes(model_dir)
        try:
            return _read_once(model_dir, pick)
        except CheckpointError:
            if _manifest_bytes(model_dir) == before:
                raise
            # published anew while being read: read the new export as a whole
    return _read_once(model_dir, pick)


def _manifest_bytes(model_dir: Path) -> bytes | None:
    try:
        return (model_dir / MANIFEST).read_bytes()
    except OSError:
        return None


def _read_once(model_dir: Path, pick: Pick) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not (model_dir / MANIFEST).is_file():
        if _legacy(model_dir):
            return _read_legacy(model_dir, pick)
        raise CheckpointError(f"refusing the export {model_dir}: its {MANIFEST} is missing "
                              "(incomplete or damaged; resume the run to export it again)")
    manifest = read_manifest_file(model_dir)
    if "model.json" not in manifest["files"]:
        raise CheckpointError(f"refusing the export {model_dir}: its manifest does not list "
                              "model.json")
    try:
        meta = _parse_meta(checked_bytes(model_dir, manifest, "model.json"), model_dir)
        blobs = {rel: checked_bytes(model_dir, manifest, rel) for rel in pick(meta)}
        check_files(model_dir, manifest, skip={"model.json", *blobs})
    except CheckpointError as e:
        raise CheckpointError(
            f"refusing the damaged or mixed export {model_dir}: {e}; a file changed after the "
            "export (damaged, or edited by hand: the config an export carries is what rebuilds "
            "its networks); resume the run to export it again") from e
    return meta, blobs


def _legacy(model_dir: Path) -> bool:
    """An export written before manifests (``format`` < 2): loaded unverified, with a warning."""
    fmt = _json_field(model_dir / "model.json", "format")
    return isinstance(fmt, int) and fmt < FORMAT_VERSION


def _read_legacy(model_dir: Path, pick: Pick) -> tuple[dict[str, Any], dict[str, bytes]]:
    warnings.warn(f"{model_dir} has no integrity manifest (exported by an older gen_ad); "
                  "loading it unverified", stacklevel=3)
    try:
        meta = _parse_meta((model_dir / "model.json").read_bytes(), model_dir)
        return meta, {rel: inside(model_dir, rel).read_bytes() for rel in pick(meta)}
    except FileNotFoundError as e:
        raise CheckpointError(f"{model_dir} is incomplete: {Path(str(e.filename)).name} is "
                              "missing") from e


def _parse_meta(data: bytes, model_dir: Path) -> dict[str, Any]:
    return json_object(data, f"{model_dir}/model.json", "an export description")


def verify_export(model_dir: Path) -> None:
    """Check an export against its manifest (a legacy export without one only warns).

    Raises:
        CheckpointError: a file is missing, damaged, or from another export (mixed steps).
    """
    read_export(model_dir, lambda meta: ())
