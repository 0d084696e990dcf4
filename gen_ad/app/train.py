"""``gen-ad train <family>`` (and ``train/<family>.py``): load and validate a config, then train.

Works under plain ``python`` and ``accelerate launch`` (multi-GPU / multi-node DDP).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gen_ad.config import load_config
from gen_ad.training.loop import run_training
from gen_ad.training.registry import family_class


def train(family_name: str, config: str | Path, overrides: Sequence[str] = (),
          resume: str | None = None) -> Path:
    """Load and validate the config of ``family_name``, then train. Returns the run folder."""
    cls = family_class(family_name)
    cfg = load_config(cls.config_cls, config, overrides)
    return run_training(cls(cfg), resume=resume)
