"""Full training state on disk: written atomically, read safely, last K kept.

Layout of ``<run>/state/step-<N>/`` (see ``checkpoints/README.md``): model and EMA weights as
safetensors, optimiser/schedule/scaler/RNG/family state through ``torch.save`` of plain data
(read back with ``weights_only=True``), and ``meta.json`` with the counters. A state folder is
assembled under a temporary name and renamed into place only when complete, so a process killed
at any instant leaves the previous state loadable.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gen_ad.errors import CheckpointError
from gen_ad.utils.io import (
    MANIFEST,
    check_manifest,
    load_safetensors,
    recover_dir,
    remove_dir,
    save_safetensors,
    torch_load,
    torch_save,
    unique_tag,
    write_json,
    write_manifest,
)

_STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FORMAT = 2  # 2: the folder has a manifest.json (sizes + sha256), written last
ABANDONED_PREFIX = "abandoned-after-step-"  # states of a branch left by a resume (never pruned)


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
    """Published state folders of a run as ``(step, path)``, oldest first.

    A folder counts once its manifest (written last) exists, or, for states written before
    manifests existed, its ``meta.json``. Whether its files are intact is checked by
    :func:`verify_state`.
    """
    root = state_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and ((p / MANIFEST).is_file() or (p / "meta.json").is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_state(path: Path) -> None:
    """Check a state folder against its manifest (every file present, sizes and sha256).

    A state without a manifest (written by an older gen_ad) is accepted with a warning.

    Raises:
        CheckpointError: incomplete or damaged (the message names the file).
    """
    if not (path / MANIFEST).is_file() and (path / "meta.json").is_file():
        if _meta_format(path / "meta.json") >= STATE_FORMAT:
            raise CheckpointError(f"{path} is incomplete: its {MANIFEST} is missing")
        warnings.warn(f"{path} has no integrity manifest (written by an older gen_ad); "
                      "loading it unverified", stacklevel=2)
        return
    check_manifest(path)


def _meta_format(meta: Path) -> int:
    """The ``format`` recorded in a state's ``meta.json`` (0: older gen_ad or unreadable)."""
    try:
        return int(json.loads(meta.read_text(encoding="utf-8")).get("format", 0))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
        return STATE_FORMAT  # damaged: treat as current, so the missing manifest is an error


def newest_complete(run_dir: str | Path, *, quiet: bool = False) -> Path | None:
    """The newest state of ``run_dir`` that passes :func:`verify_state` (``None`` if none).

    Damaged or incomplete newer states are skipped with a warning naming them and why.
    """
    for _, p in reversed(list_states(run_dir)):
        try:
            verify_state(p)
        except CheckpointError as e:
            if not quiet:
                warnings.warn(f"skipping damaged checkpoint {p}: {e}", stacklevel=2)
            continue
        return p
    return None


def recover_states(run_dir: str | Path) -> None:
    """Put back states whose re-save was killed between its two renames (see
    :func:`~gen_ad.utils.io.publish_dir`). Call with the run folder locked."""
    root = state_root(run_dir)
    if not root.is_dir():
        return
    for old in sorted(root.glob(".step-*.old-*")):
        recover_dir(root / old.name.split(".")[1])


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """``latest`` -> newest complete, intact state of ``run_dir``; otherwise a state folder
    (which must be intact) or a run folder (its newest intact state)."""
    if resume == "latest":
        if not list_states(run_dir):
            raise CheckpointError(
                f"--resume latest: no checkpoint found under {state_root(run_dir)}")
        found = newest_complete(run_dir)
        if found is None:
            raise CheckpointError(f"--resume latest: every checkpoint under "
                                  f"{state_root(run_dir)} is damaged or incomplete")
        return found
    p = Path(resume)
    if (p / MANIFEST).is_file() or (p / "meta.json").is_file():
        verify_state(p)
        return p
    if list_states(p):
        return resolve_resume(p, "latest")
    raise CheckpointError(f"--resume {resume}: not a state folder (no meta.json) nor a run folder")


def nonfinite_tensor(groups: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The name of the first non-finite floating tensor in ``groups`` (``None`` if all finite).

    Args:
        groups: ``{"model 'G'": state_dict, ...}``; nested dicts/lists are searched.
    """
    for label, sd in groups.items():
        bad = _first_nonfinite(sd, "")
        if bad is not None:
            return f"{bad} of {label}"
    return None


def _first_nonfinite(obj: Any, prefix: str) -> str | None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return prefix.rstrip(".") or "tensor"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else prefix
    items = obj.items() if isinstance(obj, Mapping) else \
        enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _first_nonfinite(v, f"{prefix}{k}.")
        if bad is not None:
            return bad.rstrip(".")
    return None


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
    meta = {"format": STATE_FORMAT, "step": counters.step, "images": counters.images,
            "time": time.time()}
    meta.update(extra_meta or {})
    write_json(path / "meta.json", meta)
    write_manifest(path, {"step": counters.step})  # written last: marks the folder complete


def load_weights(module: nn.Module, file: Path, what: str) -> None:
    """Load a safetensors state dict into ``module``; a mismatch is a clear CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint is missing {file} ({what})")
    load_tensors(module, load_safetensors(file), what, file)


def load_tensors(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                 source: str | Path) -> None:
    """Load the state dict ``sd`` (read from ``source``) into ``module``, strictly.

    Raises:
        CheckpointError: missing or unexpected keys or other shapes (the first three named).
    """
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
            f"checkpoint {source} does not match the config's {what}: {detail}. "
            "Was the run started with a different model config?")
    module.load_state_dict(sd)


def load_state(path: Path, *, models: Mapping[str, nn.Module], ema: Mapping[str, nn.Module],
               optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
               scaler: Any | None) -> tuple[Counters, dict[str, Any]]:
    """Load a state folder into the given objects.

    Returns:
        The counters and the family state (to pass to ``family.load_state_dict``).
    """
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
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
    """Delete all but the newest ``keep_last`` states, and stale temporary folders.

    A pruned folder is renamed away first (:func:`~gen_ad.utils.io.remove_dir`), so a kill
    never leaves a half-deleted folder under a ``step-<N>`` name. States set aside by
    :func:`set_aside_newer` are never pruned. Call with the run locked.
    """
    states = list_states(run_dir)
    for _, p in states[:-keep_last]:
        remove_dir(p)
    for p in state_root(run_dir).glob(".step-*"):
        shutil.rmtree(p, ignore_errors=True)


def state_step(path: Path) -> int:
    """The step of a state folder (its ``meta.json``)."""
    try:
        return int(json.loads((path / "meta.json").read_text(encoding="utf-8"))["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path / 'meta.json'} is unreadable ({e})") from e


def set_aside_newer(run_dir: str | Path, step: int) -> tuple[Path, list[str]] | None:
    """Move the states of ``run_dir`` newer than ``step`` into ``state/abandoned-...``.

    A run resumed from step ``step`` while newer states exist (a roll-back to an older state, or
    newer ones skipped as damaged) continues a new branch: left in place, the abandoned branch's
    higher step numbers would win keep-last pruning (deleting the new branch's states) and
    ``--resume latest``. Nothing is deleted: the folders are renamed, one by one, into
    ``state/abandoned-after-step-<step>-<time>/``, which :func:`list_states` ignores. Call with
    the run locked.

    Returns:
        ``(folder, moved names)``, or ``None`` when no newer state exists.
    """
    root = state_root(run_dir)
    newer = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                   if (m := _STEP_RE.match(p.name)) and int(m.group(1)) > step)
    if not newer:
        return None
    folder = root / f"{ABANDONED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if folder.exists():
        folder = folder.with_name(f"{folder.name}-{unique_tag()}")
    folder.mkdir()
    for _, p in reversed(newer):  # newest first; a kill midway: the same command moves the rest
        os.replace(p, folder / p.name)
    return folder, [p.name for _, p in newer]


# ----------------------------------------------------------------------------- optimiser settings


def optimizer_settings(optimizers: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The hyper-parameters of every param group (``lr``, ``betas``, ...; no tensors), as the
    config built them. Take this before loading a state, for :func:`apply_optimizer_settings`."""
    return {name: [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
            for name, o in optimizers.items()}


def apply_optimizer_settings(optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
                             config: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Give resumed optimisers the config's hyper-parameters where the checkpoint differs.

    A learning rate under a schedule is rescaled: the schedule's base rate becomes the
    config's (``initial_lr``) and the current rate keeps its position in the schedule. Other
    settings (betas, eps, weight decay, ...) are set as the config says.

    Returns:
        One ``"<optimizer>.<key>: old -> new"`` line per change.
    """
    changes: list[str] = []
    for name, o in optimizers.items():
        sched = schedulers.get(name)
        for i, (g, want) in enumerate(zip(o.param_groups, config.get(name, []))):
            base = "initial_lr" if "initial_lr" in want else "lr"
            old_base, new_base = g.get(base), want[base]
            if old_base != new_base:
                changes.append(f"{name}.lr: {old_base} -> {new_base}")
                g["lr"] = g["lr"] * new_base / old_base if base == "initial_lr" and old_base \
                    else new_base
                g[base] = new_base
                if sched is not None and hasattr(sched, "base_lrs"):
                    sched.base_lrs[i] = new_base
                    sched._last_lr = [pg["lr"] for pg in o.param_groups]
            for k, v in want.items():
                if k not in ("lr", "initial_lr") and g.get(k) != v:
                    changes.append(f"{name}.{k}: {g.get(k)} -> {v}")
                    g[k] = v
    return changes
