"""Per-image arrays of a whole scored set (anomaly maps, ground-truth masks) in bounded memory.

A :class:`MapStore` is filled batch by batch while a dataset is scored and read back in chunks by
the metrics and one image at a time by the example figures. Small sets live in one preallocated
array in memory (no list of batches concatenated at the end, which held two copies); a set larger
than ``memory_bytes`` is written to an anonymous temporary file (deleted when closed or when the
process ends) with plain file writes and reads, so its pages sit in the kernel's page cache, not
in the process's resident memory: 100,000 maps of 64 px are 1.6 GB of float32, 26 GB at 256 px.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import torch

MEMORY_BYTES = 256 * 2**20  # a store larger than this spills to a temporary file
CHUNK_BYTES = 32 * 2**20  # default size of the chunks :meth:`MapStore.chunks` reads


def _numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu()
        if batch.dtype in (torch.bfloat16, torch.float16):
            batch = batch.float()
        batch = batch.numpy()
    return np.asarray(batch)


class MapStore:
    """``[N,H,W]`` arrays appended batch by batch, in memory or spilled to a temporary file.

    Args:
        n: number of images the store will hold (``len(dataset)``).
        dtype: element type (``float32`` maps, ``bool`` masks).
        memory_bytes: at most this many bytes in memory; a larger store spills to a file.
        spill_dir: folder of the temporary file (default: the system's temporary folder).
    """

    def __init__(self, n: int, dtype: Any = np.float32, *, memory_bytes: int = MEMORY_BYTES,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.n, self.dtype = int(n), np.dtype(dtype)
        self.memory_bytes, self.spill_dir = int(memory_bytes), spill_dir
        self.count = 0
        self.hw: tuple[int, int] | None = None
        self._array: np.ndarray | None = None
        self._file: IO[bytes] | None = None

    # -------------------------------------------------------------------------- writing

    def append(self, batch: Any) -> None:
        """Add ``[B,H,W]`` items (a tensor or array; cast to the store's dtype)."""
        b = _numpy(batch)
        if b.ndim != 3:
            raise ValueError(f"a store holds [B,H,W] batches, got shape {b.shape}")
        if self.hw is None:
            self._open((int(b.shape[1]), int(b.shape[2])))
        if b.shape[1:] != self.hw or self.count + b.shape[0] > self.n:
            raise ValueError(f"batch {b.shape} does not fit a store of {self.n} x {self.hw} "
                             f"holding {self.count}")
        b = np.ascontiguousarray(b, dtype=self.dtype)
        if self._array is not None:
            self._array[self.count:self.count + b.shape[0]] = b
        else:
            assert self._file is not None
            self._file.seek(self.count * self.item_bytes)
            self._file.write(b.data)  # contiguous: no copy
        self.count += b.shape[0]

    def _open(self, hw: tuple[int, int]) -> None:
        self.hw = hw
        if self.n * self.item_bytes <= self.memory_bytes:
            self._array = np.empty((self.n, *hw), dtype=self.dtype)
        else:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="gen_ad_maps_")

    # -------------------------------------------------------------------------- reading

    @property
    def item_bytes(self) -> int:
        """Bytes of one ``[H,W]`` item (0 before the first batch)."""
        return 0 if self.hw is None else self.hw[0] * self.hw[1] * self.dtype.itemsize

    @property
    def spilled(self) -> bool:
        """Whether the items live in a temporary file rather than in memory."""
        return self._file is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(items written, H, W)``."""
        h, w = self.hw or (0, 0)
        return self.count, h, w

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> np.ndarray:
        """Items ``start:stop`` as a ``[stop-start,H,W]`` array (a copy when spilled)."""
        start, stop = max(0, start), min(stop, self.count)
        if self._array is not None:
            return self._array[start:stop]
        if self._file is None or stop <= start:
            h, w = self.hw or (0, 0)
            return np.empty((0, h, w), dtype=self.dtype)
        self._file.seek(start * self.item_bytes)
        raw = self._file.read((stop - start) * self.item_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(stop - start, *self.hw)  # type: ignore[misc]

    def __getitem__(self, i: int) -> np.ndarray:
        """One ``[H,W]`` item."""
        i = int(i) + (self.count if int(i) < 0 else 0)
        if not 0 <= i < self.count:
            raise IndexError(f"item {i} of a store holding {self.count}")
        return self.read(i, i + 1)[0]

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, [C,H,W] items)`` in order, each chunk at most ``chunk_bytes`` (one item at
        least)."""
        step = max(1, chunk_bytes // max(self.item_bytes, 1))
        for start in range(0, self.count, step):
            yield start, self.read(start, start + step)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """Every item at once (what the exact, small-set metrics use)."""
        a = self.read(0, self.count)
        return a if dtype is None else a.astype(dtype)

    def close(self) -> None:
        """Free the memory or delete the temporary file."""
        if self._file is not None:
            self._file.close()
        self._file, self._array = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
