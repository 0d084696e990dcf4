"""Full training state on disk: written atomically, read safely, last K kept.

Layout of ``<run>/state/step-<N>/`` (see ``checkpoints/README.md``): model and EMA weights as
safetensors, optimiser/schedule/scaler/RNG/family state through ``torch.save`` of plain data
(read back with ``weights_only=True``), and ``meta.json`` with the counters. A state folder is
assembled under a temporary name and renamed into place only when complete, so a process killed
at any instant leaves the previous state loadable.
"""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gen_ad.errors import CheckpointError
from gen_ad.utils.io import load_safetensors, save_safetensors, torch_load, torch_save, write_json

_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class Counters:
    """Progress counters saved with every state."""

    step: int = 0
    images: int = 0

    @property
    def kimg(self) -> float:
        return self.images / 1000.0


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as plain tensors/numbers (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"],
                         state["numpy_cached"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"]),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- folders


def state_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "state"


def list_states(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete state folders of a run as ``(step, path)``, oldest first."""
    root = state_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """``latest`` -> newest complete state of ``run_dir``; otherwise a state folder path."""
    if resume == "latest":
        states = list_states(run_dir)
        if not states:
            raise CheckpointError(
                f"--resume latest: no checkpoint found under {state_root(run_dir)}")
        return states[-1][1]
    p = Path(resume)
    if (p / "meta.json").is_file():
        return p
    if list_states(p):
        return list_states(p)[-1][1]
    raise CheckpointError(f"--resume {resume}: not a state folder (no meta.json) nor a run folder")


# ----------------------------------------------------------------------------- save / load


def save_state(path: Path, *, models: Mapping[str, nn.Module], ema: Mapping[str, nn.Module],
               optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
               scaler: Any | None, family_state: Mapping[str, Any], counters: Counters,
               extra_meta: Mapping[str, Any] | None = None) -> None:
    """Write the main process's part of a state into the (temporary) folder ``path``.

    Args:
        path: folder being assembled (not yet published).
        models: unwrapped models by name; ema: EMA copies by name.
        optimizers / schedulers: by name (anything with ``state_dict``).
        scaler: the AMP grad scaler or ``None``.
        family_state: the family's adaptive state (tensors and plain numbers).
        counters: step and image counters.
    """
    for name, m in models.items():
        save_safetensors(path / "models" / f"{name}.safetensors", m.state_dict())
    for name, m in ema.items():
        save_safetensors(path / "models" / f"{name}_ema.safetensors", m.state_dict())
    for name, o in optimizers.items():
        torch_save(path / "optim" / f"{name}.pt", o.state_dict())
    for name, s in schedulers.items():
        torch_save(path / "sched" / f"{name}.pt", s.state_dict())
    if scaler is not None:
        torch_save(path / "scaler.pt", scaler.state_dict())
    torch_save(path / "family.pt", dict(family_state))
    meta = {"step": counters.step, "images": counters.images, "time": time.time()}
    meta.update(extra_meta or {})
    write_json(path / "meta.json", meta)  # written last: marks the folder complete


def load_weights(module: nn.Module, file: Path, what: str) -> None:
    """Load a safetensors state dict into ``module``; a mismatch is a clear CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint is missing {file} ({what})")
    sd = load_safetensors(file)
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            ([f"missing {missing[:3]}"] if missing else [])
            + ([f"unexpected {unexpected[:3]}"] if unexpected else []) + shapes[:3])
        raise CheckpointError(
            f"checkpoint {file} does not match the config's {what}: {detail}. "
            "Was the run started with a different model config?")
    module.load_state_dict(sd)


def load_state(path: Path, *, models: Mapping[str, nn.Module], ema: Mapping[str, nn.Module],
               optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
               scaler: Any | None) -> tuple[Counters, dict[str, Any]]:
    """Load a state folder into the given objects.

    Returns:
        The counters and the family state (to pass to ``family.load_state_dict``).
    """
    import json

    meta = json.loads((path / "meta.json").read_text())
    for name, m in models.items():
        load_weights(m, path / "models" / f"{name}.safetensors", f"model '{name}'")
    for name, m in ema.items():
        load_weights(m, path / "models" / f"{name}_ema.safetensors", f"EMA of '{name}'")
    for name, o in optimizers.items():
        o.load_state_dict(_load_required(path / "optim" / f"{name}.pt"))
    for name, s in schedulers.items():
        s.load_state_dict(_load_required(path / "sched" / f"{name}.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch_load(path / "scaler.pt"))
    family_state = torch_load(path / "family.pt") if (path / "family.pt").is_file() else {}
    return Counters(step=int(meta["step"]), images=int(meta["images"])), family_state


def _load_required(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"checkpoint is missing {file}")
    return torch_load(file)


def prune_states(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete states (and stale temporary folders)."""
    states = list_states(run_dir)
    for _, p in states[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    root = state_root(run_dir)
    for p in root.glob(".step-*"):
        shutil.rmtree(p, ignore_errors=True)
