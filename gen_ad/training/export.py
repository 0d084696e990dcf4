"""Inference export (``<run>/model/``) and :func:`load_run`, which rebuilds a trained run.

``model/`` holds one safetensors file per network (EMA copies as ``<name>_ema``),
``model.json`` with the family name, the resolved config, the counters and the file list, and
``manifest.json`` (sizes and sha256 of every file, written last). A run is rebuilt from its saved
config alone, without pickles and without the training code's state. The folder is assembled
under a temporary name and swapped in as a set, and :func:`load_run` checks the manifest, so
weights of different steps are never mixed and damaged files are never loaded.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_ad.config import family_class, from_dict, to_dict
from gen_ad.errors import CheckpointError, ConfigError
from gen_ad.scoring.base import AnomalyScorer
from gen_ad.training.family import Family
from gen_ad.utils.io import (
    MANIFEST,
    atomic_dir,
    check_manifest,
    load_safetensors,
    publish_dir,
    save_safetensors,
    write_json,
    write_manifest,
)

FORMAT_VERSION = 2


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
        write_json(tmp / "model.json", {
            "format": FORMAT_VERSION,
            "family": family.name,
            "files": files,
            "ema": sorted(ema),
            "step": counters.step,
            "kimg": counters.kimg,
            "config": to_dict(family.cfg),
        })
        write_manifest(tmp, {"step": counters.step})
        publish_dir(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        raise CheckpointError(f"refusing the damaged or mixed export {model_dir}: {e} "
                              "(resume the run to export it again)") from e
    if "model.json" not in manifest["files"]:
        raise CheckpointError(f"refusing the export {model_dir}: its manifest does not list "
                              "model.json")


@dataclass
class Run:
    """A trained run rebuilt from ``model/``.

    Attributes:
        path: the run folder.
        cfg: the resolved config.
        family: the family object (holds ``cfg``).
        models: networks in eval mode on ``device``; the EMA weights under the plain name where
            the run kept an EMA (the raw training weights are in ``raw_models``).
        raw_models: the training weights of models that have an EMA.
        step / kimg: how far the exported run had trained.
    """

    path: Path
    cfg: Any
    family: Family
    models: dict[str, nn.Module]
    raw_models: dict[str, nn.Module]
    step: int
    kimg: float

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
        """The anomaly scorers this run offers (e.g. ``anoddpm`` and ``autoddpm``)."""
        return self.family.scorers(self.models, **kwargs)


def read_model_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Find and read ``model.json`` of a run folder (or of a ``model/`` folder)."""
    p = Path(path)
    for cand in (p / "model" / "model.json", p / "model.json", *_swapped_away(p / "model")):
        if cand.is_file():
            try:
                return cand.parent, json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cand} is not valid JSON: {e}") from e
    if not p.exists():
        raise CheckpointError(f"run folder not found: {p}")
    raise CheckpointError(f"{p} is not a trained run: no model/model.json (train it first, "
                          "or point to the run folder that holds model/)")


def _swapped_away(model_dir: Path) -> list[Path]:
    """``model.json`` of the previous export when a swap was killed half-way (``model/``
    missing, ``.model.old-*`` present); the next training call puts it back."""
    if model_dir.exists() or not model_dir.parent.is_dir():
        return []
    olds = sorted(model_dir.parent.glob(".model.old-*"), key=lambda q: q.stat().st_mtime)
    return [q / "model.json" for q in reversed(olds)]


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
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
    from gen_ad.training.checkpoint import load_weights

    model_dir, meta = read_model_json(path)
    verify_export(model_dir)
    try:
        cls = family_class(meta["family"])
        cfg = from_dict(cls.config_cls, meta["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{model_dir}/model.json has an invalid config: {e}") from e
    family = cls(cfg)
    models = family.build_models()
    raw: dict[str, nn.Module] = {}
    for name, m in models.items():
        load_weights(m, model_dir / f"{name}.safetensors", f"model '{name}'")
    for name in meta.get("ema", []):
        raw[name] = models[name]
        ema = family.build_models()[name]
        load_weights(ema, model_dir / f"{name}_ema.safetensors", f"EMA of '{name}'")
        models[name] = ema
    for m in list(models.values()) + list(raw.values()):
        m.to(device).eval().requires_grad_(False)
    return Run(Path(path), cfg, family, models, raw, int(meta.get("step", 0)),
               float(meta.get("kimg", 0.0)))


def gan_stage_files(gan_run: str | Path | None, family: str) -> dict[str, Path]:
    """The exported ``G`` (its EMA copy when the run kept one) and ``D`` of a gan-stage run.

    Used by the encoder stages of ``wgan`` and ``stylegan2``, which start from a trained GAN.

    Raises:
        CheckpointError: no ``model/`` export, an encoder-stage run, or a missing file.
    """
    from gen_ad.config import read_yaml

    run = Path(str(gan_run))
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"gan_run {run}: no model/ export found (train the gan stage "
                              f"first: gen-ad train {family} --config ... out={run})")
    cfg_file = run / "config.yaml"
    if cfg_file.is_file() and read_yaml(cfg_file).get("stage", "gan") != "gan":
        raise CheckpointError(f"gan_run {run} is an encoder-stage run; point to the gan run")
    g = model_dir / "G_ema.safetensors"
    files = {"G": g if g.is_file() else model_dir / "G.safetensors",
             "D": model_dir / "D.safetensors"}
    for p in files.values():
        if not p.is_file():
            raise CheckpointError(f"gan_run {run}: {p.name} missing in {model_dir}")
    verify_export(model_dir)
    return files


def unwrap_model(m: nn.Module) -> nn.Module:
    """The module inside a DDP/compile wrapper."""
    while hasattr(m, "module") and isinstance(m.module, nn.Module):
        m = m.module
    return m


def freeze_gan_stage(models: Mapping[str, nn.Module], gan_run: str | None, family: str, *,
                     load: bool = True) -> None:
    """Freeze ``G`` and ``D`` for an encoder stage, first loading them from ``gan_run``.

    Args:
        models: the family's models (``G``, ``D``, ``E``); wrapped ones are unwrapped.
        gan_run: run folder of the gan stage (see :func:`gan_stage_files`).
        family: family name, for the error messages.
        load: ``False`` when resuming: the checkpoint restores G and D, so ``gan_run`` is
            not read and need not exist any more.
    Raises:
        CheckpointError: no export, or weights that do not match the config's networks.
    """
    files = gan_stage_files(gan_run, family) if load else {}
    for name in ("G", "D"):
        module = unwrap_model(models[name])
        if name in files:
            try:
                module.load_state_dict(load_safetensors(files[name]), strict=True)
            except RuntimeError as e:
                raise CheckpointError(
                    f"{files[name]} does not match this config's networks (model.* and "
                    f"data.size must equal those of the gan run): {str(e).splitlines()[0]}"
                ) from e
        module.requires_grad_(False).eval()
