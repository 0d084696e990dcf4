"""``gen-ad fid REAL FAKE``: FID/KID of generated images, where FAKE may be a trained run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gen_ad.metrics.fid import SampleFn, compute_fid
from gen_ad.training.runs import load_run


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """True for a trained run folder (it holds ``model/model.json``)."""
    return (Path(path) / "model" / "model.json").is_file()


def run_sampler(path: str | os.PathLike[str], *, batch_size: int = 64,
                device: str | torch.device = "cpu") -> SampleFn:
    """A :data:`~gen_ad.metrics.fid.SampleFn` drawing from a trained run.

    Each call samples with a seed drawn from the given generator, so a seeded generator gives a
    reproducible sequence of batches.
    """
    run = load_run(path, device=device)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        return run.sample(n, seed=seed, batch_size=batch_size)

    return sample


def fid(real: str | os.PathLike[str], fake: str | os.PathLike[str], *,
        device: str | None = None, batch_size: int = 64, **kwargs: Any) -> dict[str, Any]:
    """FID (and KID) of ``fake`` (image folder or run folder) against the ``real`` folder.

    ``kwargs`` go to :func:`~gen_ad.metrics.fid.compute_fid` (``n``, ``kid``, ``size``, ...).
    A run folder is sampled on ``device`` (default: CUDA when available).
    """
    source: str | os.PathLike[str] | SampleFn = fake
    if is_run_folder(fake):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        source = run_sampler(fake, batch_size=batch_size, device=dev)
    return compute_fid(real, source, device=device, batch_size=batch_size, **kwargs)
