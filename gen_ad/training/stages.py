"""Encoder stages on a trained GAN: read its verified export, check that the encoder stage's
config builds the same networks, load and freeze ``G`` and ``D``.

Used by the ``encoder`` stages of ``wgan`` (izi_f) and ``stylegan2`` (projection encoder), which
start from the ``model/`` export of a finished ``gan`` stage.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_ad.config import from_dict
from gen_ad.errors import CheckpointError, ConfigError
from gen_ad.training.checkpoint import load_tensors
from gen_ad.training.export import read_export
from gen_ad.training.resume_config import config_changes, plain_config
from gen_ad.utils.io import load_safetensors_bytes


@dataclass
class GanExport:
    """What an encoder stage takes from its gan run, all from one verified reading of the export.

    Attributes:
        model_dir: the gan run's ``model/`` folder.
        config: the gan run's config as its ``model.json`` records it (plain JSON values).
        weights: ``{"G": state dict (the EMA copy when the run kept one), "D": state dict}``.
    """

    model_dir: Path
    config: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]


def _gan_files(meta: Mapping[str, Any]) -> list[str]:
    """``G_ema`` (or ``G`` without an EMA) and ``D`` of a gan-stage export."""
    files = meta.get("files")
    if not isinstance(files, Mapping):
        raise CheckpointError("model.json has no file list")
    return [str(files.get("G_ema") or files.get("G") or "G.safetensors"),
            str(files.get("D") or "D.safetensors")]


def gan_stage_export(gan_run: str | Path | None, family: str) -> GanExport:
    """The exported ``G`` (its EMA copy when the run kept one), ``D`` and config of a gan-stage
    run, each file read once, checked against the export's manifest and loaded from those bytes
    (a training publishing a new export meanwhile cannot mix in another step's weights).

    Raises:
        CheckpointError: no ``model/`` export, an encoder-stage run, or a missing, damaged or
            mixed file.
    """
    run = Path(str(gan_run))
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"gan_run {run}: no model/ export found (train the gan stage "
                              f"first: gen-ad train {family} --config ... out={run})")
    meta, blobs = read_export(model_dir, _gan_files)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"gan_run {run}: {model_dir}/model.json has no config")
    if config.get("stage", "gan") != "gan":
        raise CheckpointError(f"gan_run {run} is an encoder-stage run; point to the gan run")
    g_file, d_file = _gan_files(meta)
    weights = {name: load_safetensors_bytes(blobs[f], model_dir / f)
               for name, f in (("G", g_file), ("D", d_file))}
    return GanExport(model_dir, config, weights)


def check_gan_config(cfg: Any, gan: GanExport, own: Collection[str] = ()) -> None:
    """Refuse an encoder-stage config whose networks differ from the gan run's.

    Compared: ``data.size`` and every ``model.*`` key but ``own`` (keys of the encoder stage's
    own networks), the gan run's values as its export's ``model.json`` records them (with the
    config schema's defaults for keys it predates).

    Raises:
        ConfigError: names each differing key with both values.
        CheckpointError: the export's config does not load with this family's schema.
    """
    try:
        theirs = plain_config(from_dict(type(cfg), gan.config))
    except ConfigError as e:
        raise CheckpointError(f"{gan.model_dir}/model.json has an invalid config: {e}") from e
    diff = [f"{k} is {ours!r} here, {gan_value!r} in the gan run"
            for k, gan_value, ours in config_changes(theirs, plain_config(cfg))
            if (k == "data.size" or k.startswith("model.")) and k not in own]
    if diff:
        raise ConfigError(
            f"config key(s) of stage 'encoder' differ from its gan_run's "
            f"({gan.model_dir / 'model.json'}): {'; '.join(diff)}. The encoder stage loads that "
            "run's G and D, so data.size and model.* (except the encoder's own keys) must "
            "equal the gan run's: set them to its values")


def unwrap_model(m: nn.Module) -> nn.Module:
    """The module inside a DDP/compile wrapper."""
    while hasattr(m, "module") and isinstance(m.module, nn.Module):
        m = m.module
    return m


def freeze_gan_stage(models: Mapping[str, nn.Module], cfg: Any, family: str, *,
                     load: bool = True, own: Collection[str] = ()) -> None:
    """Freeze ``G`` and ``D`` for an encoder stage, first loading them from ``cfg.gan_run``.

    Args:
        models: the family's models (``G``, ``D``, ``E``); wrapped ones are unwrapped.
        cfg: the encoder stage's config (``gan_run``: the gan stage's run folder, see
            :func:`gan_stage_export`).
        family: family name, for the error messages.
        load: ``False`` when resuming: the checkpoint restores G and D, so ``gan_run`` is
            not read and need not exist any more.
        own: the encoder's own ``model.*`` keys, which may differ from the gan run's.
    Raises:
        ConfigError: ``data.size`` or a ``model.*`` key differs from the gan run's.
        CheckpointError: no export, or a missing, damaged or mixed export.
    """
    gan = gan_stage_export(cfg.gan_run, family) if load else None
    if gan is not None:
        check_gan_config(cfg, gan, own)
    for name in ("G", "D"):
        module = unwrap_model(models[name])
        if gan is not None:
            load_tensors(module, gan.weights[name], f"model '{name}' of the gan run",
                         gan.model_dir)
        module.requires_grad_(False).eval()
