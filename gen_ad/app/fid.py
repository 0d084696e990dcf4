"""``gen-ad fid REAL FAKE``: FID/KID of generated images, where FAKE may be a trained run folder.

A run folder's samples come at its training size, stain-normalised when it trained with
``data.stain_norm``; the real images are then read the same way (``data.size``, ``data.resize``,
then the run's stain normaliser), unless a size / resize mode is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gen_ad.data.folders import ResizeMode
from gen_ad.metrics.fid import ImageTransform, SampleFn, compute_fid, stain_transform
from gen_ad.training.runs import load_run


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """True for a trained run folder (it holds ``model/model.json``)."""
    return (Path(path) / "model" / "model.json").is_file()


def _sampler(run: Any, batch_size: int) -> SampleFn:
    """Each call samples with a seed drawn from the given generator, so a seeded generator gives
    a reproducible sequence of batches."""

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        return run.sample(n, seed=seed, batch_size=batch_size)

    return sample


def run_sampler(path: str | os.PathLike[str], *, batch_size: int = 64,
                device: str | torch.device = "cpu") -> SampleFn:
    """A :data:`~gen_ad.metrics.fid.SampleFn` drawing from a trained run.

    Each call samples with a seed drawn from the given generator, so a seeded generator gives a
    reproducible sequence of batches.
    """
    return _sampler(load_run(path, device=device), batch_size)


def run_reading(run: Any, size: int | None, resize: ResizeMode | None
                ) -> tuple[int | None, ResizeMode, ImageTransform | None, str]:
    """How to read the real images for ``run``: size and resize mode (the given ones, else the
    run's ``data.size`` / ``data.resize``; ``resize`` for runs saved without one), its stain
    normalisation as a transform, and where the size came from (``run`` or ``argument``)."""
    data = getattr(getattr(run, "cfg", None), "data", None)
    from_run = size is None and data is not None
    if from_run:
        size = int(data.size)
    mode: ResizeMode = resize or getattr(data, "resize", "resize")
    stain, ref = getattr(run, "stain", None), getattr(run, "stain_ref", None)
    transform = stain_transform(stain, ref) if stain is not None and ref is not None else None
    return size, mode, transform, "run" if from_run else "argument"


def fid(real: str | os.PathLike[str], fake: str | os.PathLike[str], *,
        device: str | None = None, batch_size: int = 64, size: int | None = None,
        resize: ResizeMode | None = None, **kwargs: Any) -> dict[str, Any]:
    """FID (and KID) of ``fake`` (image folder or run folder) against the ``real`` folder.

    ``kwargs`` go to :func:`~gen_ad.metrics.fid.compute_fid` (``n``, ``kid``, ...). A run folder
    is sampled on ``device`` (default: CUDA when available) and ``real`` is read as the run
    trained (:func:`run_reading`). The result adds ``size`` and ``resize`` (how the images were
    read), ``size_from`` (``argument``, ``run`` or ``images``: their own size) and
    ``real_stain`` (``{"method", "reference"}`` of the real images' stain normalisation, or
    ``None``).
    """
    source: str | os.PathLike[str] | SampleFn = fake
    mode: ResizeMode = resize or "resize"
    transform, size_from, stain = None, "argument", None
    if is_run_folder(fake):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        run = load_run(fake, device=dev)
        source = _sampler(run, batch_size)
        size, mode, transform, size_from = run_reading(run, size, resize)
        if transform is not None:
            stain = {"method": run.stain.method, "reference": str(run.stain_ref)}
    result = compute_fid(real, source, device=device, batch_size=batch_size, size=size,
                         resize=mode, transform=transform, **kwargs)
    return {**result, "size": size, "resize": mode,
            "size_from": size_from if size is not None else "images", "real_stain": stain}
