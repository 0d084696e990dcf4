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


SAMPLE_CHUNK = 32  # images per seeded run.sample call (the sample set's unit, not the batch's)


def run_images(run: Any, chunk: int = SAMPLE_CHUNK, batch_size: int | None = None) -> SampleFn:
    """A :data:`~gen_ad.metrics.fid.SampleFn` of a trained run whose ``i``-th image depends on
    the computation's seed and ``i`` alone, whatever batch sizes the caller asks for.

    A plain sampler draws one seed per call, so another ``--batch-size`` drew another sample set
    (and another FID). Here images come in chunks of ``chunk``: chunk ``k`` is
    ``run.sample(chunk, seed=f(base, k))``, ``base`` drawn once from the generator of a
    computation (a new generator object starts the stream afresh); the caller's batches are cut
    from that stream. ``batch_size`` caps how many images the network generates at once (memory):
    at or above ``chunk`` it changes nothing; below, each chunk is generated in pieces of that
    size, which draws other noise and so another sample set (a smaller GPU, another FID sample).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    piece = min(chunk, batch_size or chunk)
    state: dict[str, Any] = {"gen": None}

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        if state["gen"] is not generator:
            base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                     device=generator.device))
            state.update(gen=generator, base=base, chunk=0, ready=[])
        ready: list[torch.Tensor] = state["ready"]
        while sum(x.shape[0] for x in ready) < n:
            seed = (state["base"] * 1_000_003 + state["chunk"] * 7919 + 1) % (2**31 - 1)
            ready.append(run.sample(chunk, seed=seed, batch_size=piece))
            state["chunk"] += 1
        images = torch.cat(ready)
        state["ready"] = [images[n:]]
        return images[:n]

    return sample


def run_sampler(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                ) -> SampleFn:
    """:func:`run_images` of the trained run at ``path``."""
    return run_images(load_run(path, device=device))


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
        source = run_images(run, batch_size=batch_size)
        size, mode, transform, size_from = run_reading(run, size, resize)
        if transform is not None:
            stain = {"method": run.stain.method, "reference": str(run.stain_ref)}
    result = compute_fid(real, source, device=device, batch_size=batch_size, size=size,
                         resize=mode, transform=transform, **kwargs)
    return {**result, "size": size, "resize": mode,
            "size_from": size_from if size is not None else "images", "real_stain": stain}
