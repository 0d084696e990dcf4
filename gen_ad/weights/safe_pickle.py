"""Read pickles that hold only NumPy arrays in nested dicts, executing nothing else.

A pickle can call any importable function while it is read (``os.system`` included). The
:class:`ArrayUnpickler` resolves exactly three globals, the ones NumPy itself uses to pickle an
array (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``); any other
global stops the read before it is called. After reading, every container must be a ``dict``
with ``str`` keys and every leaf a numeric ``ndarray`` (no object arrays).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gen_ad.errors import CheckpointError

_ARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_KINDS = "biuf"


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as fn  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can build NumPy arrays and plain containers and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _ARRAY_MODULES and name == "_reconstruct":
            return _reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}' (only NumPy arrays "
                                     "are accepted)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids (only NumPy arrays are accepted)")


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise pickle.UnpicklingError(f"'{prefix}' is an array of dtype {obj.dtype} "
                                         "(only numeric arrays are accepted)")
        out[prefix] = obj
        return
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"'{prefix or '<root>'}' is a {type(obj).__name__} "
                                     "(only dicts of NumPy arrays are accepted)")
    for key, value in obj.items():
        if not isinstance(key, str) or "/" in key:
            raise pickle.UnpicklingError(f"invalid key {key!r} under '{prefix or '<root>'}'")
        _flatten(value, f"{prefix}/{key}" if prefix else key, out)


def load_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of a pickled nested dict, flattened to ``"a/b/c"`` keys.

    Raises:
        pickle.UnpicklingError: a global other than NumPy's array constructors, a non-dict
            container, a non-string key or a non-numeric array.
    """
    root = ArrayUnpickler(io.BytesIO(data)).load()
    if not isinstance(root, dict):
        raise pickle.UnpicklingError(f"the root is a {type(root).__name__}, not a dict")
    out: dict[str, np.ndarray] = {}
    _flatten(root, "", out)
    return out


def load_array_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """:func:`load_arrays` of a file; a refused or broken pickle is a :class:`CheckpointError`."""
    p = Path(path)
    try:
        return load_arrays(p.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise CheckpointError(f"{p} is not a pickle of NumPy arrays only: {e}") from e
