"""Read pickles that hold only NumPy arrays in nested dicts, executing nothing else.

A pickle can call any importable function while it is read (``os.system`` included). The
:class:`ArrayUnpickler` resolves exactly three globals, the ones NumPy itself uses to pickle an
array (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``); any other
global stops the read before it is called. ``numpy.ndarray`` is only ``_reconstruct``'s first
argument (never called), and ``_reconstruct`` refuses an array larger than the pickle itself (an
array's data is in the pickle). After reading, every container must be a ``dict`` with ``str``
keys, nested at most :data:`MAX_DEPTH` deep and reached once (a dict shared or containing itself
would expand exponentially or without end), and every leaf a numeric ``ndarray`` (no object
arrays).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from gen_ad.errors import CheckpointError

_ARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_KINDS = "biuf"
_NDARRAY = object()  # what the global ``numpy.ndarray`` resolves to: a marker, not callable
MAX_DEPTH = 64


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as fn  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can build NumPy arrays and plain containers and nothing else.

    Args:
        file: the pickle stream.
        max_bytes: the largest array it may allocate (the pickle's size: arrays carry their data).
    """

    def __init__(self, file: IO[bytes], max_bytes: int) -> None:
        super().__init__(file)
        self._max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if module in _ARRAY_MODULES and name == "_reconstruct":
            return self._bounded_reconstruct
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}' (only NumPy arrays "
                                     "are accepted)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids (only NumPy arrays are accepted)")

    def _bounded_reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        """NumPy's ``_reconstruct`` of a plain ndarray no larger than the pickle."""
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if subtype is not _NDARRAY or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise pickle.UnpicklingError("refusing an array reconstruction other than NumPy's")
        nbytes = math.prod(dims) * np.dtype(dtype).itemsize
        if nbytes > self._max_bytes:
            raise pickle.UnpicklingError(f"an array of shape {dims} ({nbytes} bytes) is larger "
                                         f"than the pickle ({self._max_bytes} bytes)")
        return _reconstruct()(np.ndarray, dims, dtype)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int],
             depth: int = 0) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise pickle.UnpicklingError(f"'{prefix}' is an array of dtype {obj.dtype} "
                                         "(only numeric arrays are accepted)")
        out[prefix] = obj
        return
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"'{prefix or '<root>'}' is a {type(obj).__name__} "
                                     "(only dicts of NumPy arrays are accepted)")
    if id(obj) in seen or depth > MAX_DEPTH:
        raise pickle.UnpicklingError(f"'{prefix or '<root>'}' is a dict reached twice or nested "
                                     f"over {MAX_DEPTH} deep (only trees of dicts are accepted)")
    seen.add(id(obj))
    for key, value in obj.items():
        if not isinstance(key, str) or "/" in key:
            raise pickle.UnpicklingError(f"invalid key {key!r} under '{prefix or '<root>'}'")
        _flatten(value, f"{prefix}/{key}" if prefix else key, out, seen, depth + 1)


def load_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of a pickled nested dict, flattened to ``"a/b/c"`` keys.

    Raises:
        pickle.UnpicklingError: a global other than NumPy's array constructors, an array
            larger than ``data``, a non-dict container, a dict shared or nested too deep, a
            non-string key or a non-numeric array.
    """
    root = ArrayUnpickler(io.BytesIO(data), max_bytes=len(data)).load()
    if not isinstance(root, dict):
        raise pickle.UnpicklingError(f"the root is a {type(root).__name__}, not a dict")
    out: dict[str, np.ndarray] = {}
    _flatten(root, "", out, set())
    return out


def load_array_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """:func:`load_arrays` of a file; a refused or broken pickle is a :class:`CheckpointError`."""
    p = Path(path)
    try:
        return load_arrays(p.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise CheckpointError(f"{p} is not a pickle of NumPy arrays only: {e}") from e
