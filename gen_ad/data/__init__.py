"""Data: patch folders, synthetic tissue, stain normalisation, tissue masks and slide tiling.

:func:`build_dataset` turns a :class:`~gen_ad.config.DataConfig` into the dataset the training
loop and the evaluation read: items are dicts ``{"image": float32 [3,H,W] in [-1,1], "label": int,
"path": str, "cls": str}`` (plus ``"mask"`` ``[H,W]`` where ground truth exists).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gen_ad.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from gen_ad.config import DataConfig
    from gen_ad.data.folders import (
        IMAGE_EXTENSIONS,
        PatchFolder,
        discover_classes,
        fit_size,
        image_to_tensor,
        load_image,
        read_rgb,
        split,
        subset,
        tensor_to_uint8,
    )

__all__ = [
    "IMAGE_EXTENSIONS", "PatchFolder", "build_dataset", "discover_classes", "fit_size",
    "image_to_tensor", "load_image", "read_rgb", "split", "stain_coverage", "subset",
    "tensor_to_uint8",
]

#: Names re-exported from the module that defines them, imported on first use (PEP 562), so
#: that torch-free commands (``gen-ad tile``) which import a :mod:`gen_ad.data` submodule do not
#: load torch through this package.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("IMAGE_EXTENSIONS", "PatchFolder", "discover_classes", "fit_size",
                     "image_to_tensor", "load_image", "read_rgb", "split", "subset",
                     "subset_indices", "tensor_to_uint8"), "gen_ad.data.folders"),
    "Dataset": "torch.utils.data",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


SYNTHETIC = "synthetic"
_VAL_SEED_OFFSET = 1_000_003  # synthetic validation patches differ from the training ones


def build_dataset(data_cfg: DataConfig, split: str = "train", seed: int = 0) -> Dataset:
    """The dataset of normal patches described by a data config.

    ``data.train == "synthetic"`` gives :class:`~gen_ad.data.synthetic.SyntheticTissue` with
    ``data.synthetic`` patches (for ``split="val"`` without ``data.val``: another seed). Otherwise a
    :class:`PatchFolder` over ``data.train`` (or ``data.val``) restricted to ``data.normal_classes``
    (a folder holding images directly is used whole), with ``resize``, ``max_bad_fraction`` and
    stain normalisation; ``data.subset`` (training split only) keeps a seeded random subset.

    Args:
        data_cfg: the ``data`` section of a training config.
        split: ``train`` or ``val``.
        seed: seed of the synthetic data and of the subset choice.
    Raises:
        DataError: bad split name, ``data.val`` unset for a real-data ``val`` split, or any
            problem reading the folder.
    """
    from gen_ad.data.folders import PatchFolder, discover_classes, subset

    if split not in ("train", "val"):
        raise DataError(f"unknown data split '{split}' (use 'train' or 'val')")
    root = data_cfg.train if split == "train" else data_cfg.val
    if root is None:
        if data_cfg.train != SYNTHETIC:
            raise DataError("data.val is not set: give a folder of normal validation patches")
        root, seed = SYNTHETIC, seed + _VAL_SEED_OFFSET
    if root == SYNTHETIC:
        from gen_ad.data.synthetic import SyntheticTissue

        return SyntheticTissue(n=data_cfg.synthetic, size=data_cfg.size, seed=seed)
    stain = None
    if data_cfg.stain_norm != "none":
        from gen_ad.data.stain import StainNormalizer

        stain = StainNormalizer(method=data_cfg.stain_norm, reference=data_cfg.stain_ref)
    found, flat = discover_classes(root)
    classes = normal = list(found) if flat else list(data_cfg.normal_classes)
    ds: Dataset
    if data_cfg.cache is not None:
        from gen_ad.data.cache import cached_folder
        from gen_ad.data.stain import cache_settings

        ds = cached_folder(data_cfg.cache, root=root, size=data_cfg.size, classes=classes,
                           normal_classes=normal, resize=data_cfg.resize,
                           max_bad_fraction=data_cfg.max_bad_fraction, stain=stain,
                           stain_settings=None if stain is None else
                           cache_settings(stain, data_cfg.stain_ref),
                           workers=data_cfg.num_workers)
    else:
        ds = PatchFolder(root=root, size=data_cfg.size, classes=classes,
                         normal_classes=normal, resize=data_cfg.resize,
                         max_bad_fraction=data_cfg.max_bad_fraction, stain=stain)
    if split == "train" and data_cfg.subset is not None:
        ds = subset(ds, data_cfg.subset, seed)
    return ds


def stain_coverage(data_cfg: DataConfig, dataset: Dataset, n: int = 128,
                   seed: int = 0) -> tuple[int, int] | None:
    """How many of a seeded sample of ``n`` patches of ``dataset`` (built by
    :func:`build_dataset` from ``data_cfg``) the run's stain normaliser leaves unchanged (too
    little tissue, or the estimate failed): ``(unchanged, sampled)``; ``None`` without
    ``data.stain_norm``. Such patches train in their own stain, so a large share undoes the
    normalisation; the patch cache and DataLoader workers cannot count them, so this re-reads the
    sampled files."""
    if data_cfg.stain_norm == "none" or str(data_cfg.train) == SYNTHETIC:
        return None
    from gen_ad.data.folders import fit_size, read_rgb, subset_indices
    from gen_ad.data.stain import StainNormalizer, unchanged_count

    norm = StainNormalizer(method=data_cfg.stain_norm, reference=data_cfg.stain_ref)
    total = len(dataset)  # type: ignore[arg-type]
    paths = [dataset[i]["path"] for i in subset_indices(total, min(n, total), seed)]
    return unchanged_count(norm, (fit_size(read_rgb(p), data_cfg.size, data_cfg.resize)
                                  for p in paths))
