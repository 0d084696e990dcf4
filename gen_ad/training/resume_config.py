"""What a resumed run may change in its config, and what it is told.

A state folder records the config it was trained with (``meta.json`` ``config``, with the family
and its stage). On resume the new config is compared with it:

* a different family or stage, or a change to what defines the model or the process it learns
  (the network, the data's size, resize mode and stain normalisation, the diffusion schedule and
  noise, the GAN an encoder stage inverts) is refused: the run would no longer continue the
  same training, and a resume must be exact;
* any other change (iterations, budgets, learning rates, losses, augmentation, logging) is applied
  and listed in one line, since ``config.yaml`` is then overwritten with the new values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from gen_ad.config import to_dict
from gen_ad.errors import CheckpointError

# keys (flattened, dot-separated) a resume must not change: prefixes ending in "." and exact keys
FROZEN_PREFIXES = ("model.", "schedule.", "noise.")
FROZEN_KEYS = frozenset({"stage", "gan_run", "data.size", "data.resize", "data.stain_norm"})
_IGNORED = frozenset({"out"})  # a run folder resumed under another path is the same run


def plain_config(cfg: Any) -> dict[str, Any]:
    """A config as the JSON a state's ``meta.json`` holds (tuples as lists, paths as text), so
    a recorded config and a new one compare equal when they are."""
    return json.loads(json.dumps(to_dict(cfg), default=str))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of a nested config dict; lists are values."""
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from flatten(v, key + ".")
        else:
            yield key, v


def is_frozen(key: str) -> bool:
    """Whether a resume may not change ``key``."""
    return key in FROZEN_KEYS or key.startswith(FROZEN_PREFIXES)


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every key that differs (absent = ``None``), sorted."""
    a, b = dict(flatten(saved)), dict(flatten(now))
    return sorted((k, a.get(k), b.get(k)) for k in a.keys() | b.keys()
                  if k not in _IGNORED and a.get(k) != b.get(k))


def check_resume(meta: Mapping[str, Any], family: str, cfg: Mapping[str, Any],
                 state: str) -> list[str]:
    """Refuse resuming ``state`` (its ``meta.json`` content ``meta``) with another family or a
    frozen change; return the allowed changes as ``"key: old -> new"`` lines.

    States written before the config was recorded are checked for their family only.

    Raises:
        CheckpointError: another family, or frozen keys changed (all of them named).
    """
    saved_family = meta.get("family")
    if saved_family is not None and saved_family != family:
        raise CheckpointError(f"{state} was written by the '{saved_family}' family, not "
                              f"'{family}': resume it with `gen-ad train {saved_family}`, or "
                              "train this family in another folder (out=...)")
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        return []
    changes = config_changes(saved, cfg)
    frozen = [c for c in changes if is_frozen(c[0])]
    if frozen:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in frozen)
        raise CheckpointError(
            f"cannot resume {state} with this config: {shown} (these define the model or what "
            "it learns, so the run would not continue the same training); restore the "
            "checkpoint's values, or start a new run in another folder (out=...)")
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changes]
