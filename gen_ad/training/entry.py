"""Shared entry point of ``train/<family>.py`` and ``gen-ad train <family>``.

Works under plain ``python`` and ``accelerate launch`` (multi-GPU / multi-node DDP).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from gen_ad.config import family_class, load_config
from gen_ad.errors import GenAdError


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments common to every trainer."""
    p.add_argument("--config", required=True, help="YAML config (configs/<family>/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.max_steps=100 data.size=64")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue a run exactly: 'latest' state of the config's 'out', or a path")


def train(family_name: str, config: str | Path, overrides: Sequence[str] = (),
          resume: str | None = None) -> Path:
    """Load and validate the config, then train. Returns the run folder."""
    from gen_ad.training.loop import run_training

    cls = family_class(family_name)
    cfg = load_config(cls.config_cls, config, overrides)
    return run_training(cls(cfg), resume=resume)


def train_main(family_name: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and train; user errors print one line and return 2."""
    p = argparse.ArgumentParser(prog=f"train/{family_name}.py",
                                description=f"Train a {family_name} model on normal patches.")
    add_train_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from gen_ad.cli import parse_with_overrides

    args = parse_with_overrides(p, argv)
    try:
        run_dir = train(family_name, args.config, args.overrides, args.resume)
    except GenAdError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0
