"""Encoder stages on a trained GAN: find its exported weights, load and freeze ``G`` and ``D``.

Used by the ``encoder`` stages of ``wgan`` (izi_f) and ``stylegan2`` (projection encoder), which
start from the ``model/`` export of a finished ``gan`` stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from gen_ad.config import read_yaml
from gen_ad.errors import CheckpointError
from gen_ad.training.export import verify_export
from gen_ad.utils.io import load_safetensors


def gan_stage_files(gan_run: str | Path | None, family: str) -> dict[str, Path]:
    """The exported ``G`` (its EMA copy when the run kept one) and ``D`` of a gan-stage run.

    Used by the encoder stages of ``wgan`` and ``stylegan2``, which start from a trained GAN.

    Raises:
        CheckpointError: no ``model/`` export, an encoder-stage run, or a missing file.
    """


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
