"""A trained run rebuilt for inference: :func:`load_run` reads ``<run>/model/`` (written by
:func:`gen_ad.training.export.export_models`) and gives a :class:`Run` with its networks, sampler
and anomaly scorers, from the saved config alone (the family is found in the registry)."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gen_ad.config import from_dict
from gen_ad.errors import CheckpointError, ConfigError
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.scoring.stain import StainNormalizedScorer
from gen_ad.training.checkpoint import load_tensors
from gen_ad.training.export import read_export
from gen_ad.training.family import Family
from gen_ad.training.registry import family_class
from gen_ad.utils.io import load_safetensors_bytes

if TYPE_CHECKING:
    from gen_ad.data.stain import StainNormalizer


@dataclass
class Run:
    """A trained run rebuilt from ``model/``.

    Attributes:
        path: the run folder (the folder that holds ``model/``, also when ``load_run`` was given
            ``model/`` itself; a ``model.json`` folder found elsewhere is its own path).
        cfg: the resolved config.
        family: the family object (holds ``cfg``).
        models: networks in eval mode on ``device``; the EMA weights under the plain name where
            the run kept an EMA (the raw training weights are not loaded).
        step / kimg: how far the exported run had trained.
        stain: the run's stain normaliser when it trained on stain-normalised patches
            (``data.stain_norm``); its scorers then normalise every query the same way.
        stain_ref: the reference image ``stain`` was fitted on (``None`` without ``stain``).
    """

    path: Path
    cfg: Any
    family: Family
    models: dict[str, nn.Module]
    step: int
    kimg: float
    stain: StainNormalizer | None = None
    stain_ref: Path | None = None

    @property
    def device(self) -> torch.device:
        for m in self.models.values():
            for p in m.parameters():
                return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """``n`` generated images ``[n,3,H,W]`` in ``[-1,1]`` on CPU (batched, seeded)."""
        out = []
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for i in range(0, n, batch_size):
            x = self.family.sample(self.models, min(batch_size, n - i), gen)
            out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def scorers(self, **kwargs: Any) -> dict[str, AnomalyScorer]:
        """The anomaly scorers this run offers (e.g. ``anoddpm`` and ``autoddpm``); ``kwargs``
        are the family's typed scorer options (a bad key or value is a ConfigError). A
        stain-normalised run's scorers normalise their inputs as training did."""
        scorers = self.family.scorers(self.models, **kwargs)
        if self.stain is None:
            return scorers
        return {k: StainNormalizedScorer(s, self.stain) for k, s in scorers.items()}


def find_model_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding the ``model.json`` of a run folder (or of a ``model/`` folder)."""
    p = Path(path)
    for cand in (p / "model" / "model.json", p / "model.json", *_swapped_away(p / "model")):
        if cand.is_file():
            return cand.parent
    if not p.exists():
        raise CheckpointError(f"run folder not found: {p}")
    raise CheckpointError(f"{p} is not a trained run: no model/model.json (train it first, "
                          "or point to the run folder that holds model/)")


def _is_export_name(name: str) -> bool:
    """``model`` or a previous export swapped away (``.model.old-*``) inside a run folder."""
    return name == "model" or name.startswith(".model.old-")


def _swapped_away(model_dir: Path) -> list[Path]:
    """``model.json`` of the previous export when a swap was killed half-way (``model/``
    missing, ``.model.old-*`` present); the next training call puts it back."""
    if model_dir.exists() or not model_dir.parent.is_dir():
        return []
    olds = sorted(model_dir.parent.glob(".model.old-*"), key=lambda q: q.stat().st_mtime)
    return [q / "model.json" for q in reversed(olds)]


def _without_train_compile(cfg: Any) -> Any:
    """``cfg`` with ``speed.compile_train`` off: it compiles training models in place, which
    scoring does not want (a first CPU forward of a tiny UNet took 88 s instead of 0.1 s, and it
    needs a C++ compiler); scorers choose their own speed settings."""
    speed = getattr(cfg, "speed", None)
    if speed is None or not getattr(speed, "compile_train", False):
        return cfg
    return dataclasses.replace(cfg, speed=dataclasses.replace(speed, compile_train=False))


def load_run(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Run:
    """Rebuild a trained run's models from its exported weights and saved config alone.

    Args:
        path: run folder (``checkpoints/<run>``) or its ``model/`` folder.
        device: where to put the models.
    Returns:
        A :class:`Run` with models in eval mode.
    Raises:
        CheckpointError: missing, damaged or mixed export (checked against its manifest), or
            weights that do not match the config.
    """
    model_dir = find_model_dir(path)
    meta, blobs = read_export(model_dir, _export_files)  # read once, checked, loaded as read
    try:
        cls = family_class(meta["family"])
        cfg = from_dict(cls.config_cls, meta["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{model_dir}/model.json has an invalid config: {e}") from e
    family = cls(_without_train_compile(cfg))
    models = family.build_models()  # built once: an EMA'd model gets its EMA weights only
    ema = set(meta.get("ema", []))
    for name, m in models.items():
        file = f"{name}_ema" if name in ema else name
        what = f"EMA of '{name}'" if name in ema else f"model '{name}'"
        _load_from(m, blobs, model_dir, f"{file}.safetensors", what)
        m.to(device).eval().requires_grad_(False)
        if torch.device(device).type == "cpu":  # the family picks channels-last when CUDA
            m.to(memory_format=torch.contiguous_format)  # exists, for training: not on a CPU
    stain = run_stain(model_dir, meta, cfg, blobs)
    run_dir = model_dir.parent if _is_export_name(model_dir.name) else model_dir
    return Run(run_dir, cfg, family, models, int(meta.get("step", 0)),
               float(meta.get("kimg", 0.0)), stain,
               stain_reference(model_dir, meta, cfg) if stain is not None else None)


def _export_files(meta: Mapping[str, Any]) -> list[str]:
    """The export's files :func:`load_run` loads: every weight file of ``model.json``'s list
    but the raw weights of a model kept with an EMA (its EMA copy is loaded instead), and the
    stain reference copied into the export."""
    files, ema = meta.get("files"), set(meta.get("ema", []))
    if not isinstance(files, Mapping):
        raise CheckpointError("model.json has no file list")
    stain_ref = [str(meta["stain_ref"])] if meta.get("stain_ref") else []
    return [str(f) for key, f in files.items() if key not in ema] + stain_ref


def _load_from(module: nn.Module, blobs: Mapping[str, bytes], model_dir: Path, rel: str,
               what: str) -> None:
    """Load ``module`` from the verified bytes of ``model_dir/rel``."""
    if rel not in blobs:
        raise CheckpointError(f"checkpoint is missing {model_dir / rel} ({what})")
    source = model_dir / rel
    load_tensors(module, load_safetensors_bytes(blobs[rel], source), what, source)


def stain_reference(model_dir: Path, meta: dict[str, Any], cfg: Any) -> Path | None:
    """The stain reference of a run trained with ``data.stain_norm`` (else ``None``): the copy
    in the export, or, for an export without it, ``data.stain_ref`` as the config names it."""
    data = getattr(cfg, "data", None)
    if data is None or getattr(data, "stain_norm", "none") == "none":
        return None
    return model_dir / meta["stain_ref"] if meta.get("stain_ref") else Path(str(data.stain_ref))


def run_stain(model_dir: Path, meta: dict[str, Any], cfg: Any,
              blobs: Mapping[str, bytes] | None = None) -> StainNormalizer | None:
    """The stain normaliser of a run trained with ``data.stain_norm`` (else ``None``), fitted on
    :func:`stain_reference`: from its verified bytes in ``blobs`` when the export holds it
    (never the file opened again, which a new export may have replaced since the check).

    Raises:
        CheckpointError: neither reference image can be found.
    """
    ref = stain_reference(model_dir, meta, cfg)
    if ref is None:
        return None
    data = cfg.data
    if not ref.is_file():
        raise CheckpointError(
            f"the run in {model_dir.parent} was trained on {data.stain_norm}-normalised patches "
            f"and its scorers normalise queries the same way, but the stain reference {ref} is "
            "missing (put the image there, or export the run again with gen_ad >= this version, "
            "which copies it into model/)")
    from gen_ad.data.stain import StainNormalizer

    checked = (blobs or {}).get(str(meta.get("stain_ref")))
    reference = _decode_rgb(checked, ref) if checked is not None else ref
    return StainNormalizer(method=data.stain_norm, reference=reference)


def _decode_rgb(data: bytes, source: Path) -> np.ndarray:
    """The uint8 RGB ``[H,W,3]`` image of an export's verified PNG bytes."""
    from PIL import Image

    from gen_ad.data.folders import pil_to_rgb8

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_rgb8(im)
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
        raise CheckpointError(f"cannot decode the stain reference {source}: {e}") from e
