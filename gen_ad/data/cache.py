"""A decoded uint8 cache of a patch folder on disk, read through a memory map.

Training on a million patches should neither keep them in memory nor decode and re-check every
file at each start. :func:`cached_folder` keys a cache by the folder's content (every image's
relative path, size and modification time, walked folder by folder without keeping the listing)
and the decode settings (size, resize mode, classes, stain normalisation, the decoder's
:data:`~gen_ad.data.folders.DECODER_VERSION`: a cache older code built is rebuilt once after an
upgrade that changes decoding, never reused); the first call decodes
the folder once (DataLoader workers) into

* ``images.u8``: ``[N, size, size, 3]`` uint8 (raw, memory-mapped when read),
* ``labels.u8`` / ``classes.u16``: per-item label and class index,
* ``paths.txt`` + ``paths.i64``: the source paths and their byte offsets (read per item),
* ``cache.json``: the key, versions, count, size and class names, written last,

assembled in a temporary folder and renamed into place. Later calls with the same key open it
(:class:`PatchCache`) without touching the images; a cache another process installed first (two
ranks building at once) is used as it is, after checking its key and file sizes. Items equal
:class:`PatchFolder`'s exactly.
Each process (each DataLoader worker) maps the files itself; nothing per item is held in Python
memory, and mapped pages are file-backed, so the kernel can drop them under pressure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gen_ad.data.folders import (
    DECODER_VERSION,
    PatchFolder,
    ResizeMode,
    image_to_tensor,
    walk_images,
)
from gen_ad.errors import DataError
from gen_ad.utils.io import remove_dir, unique_tag, write_json
from gen_ad.utils.workers import worker_init

META = "cache.json"
# The cache's own layout. Bump it whenever the files or what a stored patch holds change; a
# change of how images decode bumps gen_ad.data.folders.DECODER_VERSION instead. Both are in
# the key and in cache.json, so a cache built by other code is rebuilt, never reused.
VERSION = 1
_WINDOWS = os.name == "nt"


def _walk_files(root: Path) -> Iterator[tuple[str, int, int]]:
    """``(relative posix path, size, mtime_ns)`` of every image under ``root``, in
    :func:`~gen_ad.data.folders.walk_images` order (the files :class:`PatchFolder` lists, linked
    folders included); a broken link counts with the link's own size and time (the folder
    check then reports it)."""
    for p in walk_images(root):
        try:
            st = p.stat()
        except OSError:
            st = p.lstat()
        yield p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns


def content_key(root: str | os.PathLike[str], settings: dict[str, Any]) -> str:
    """sha256 of the folder's image files (path, size, mtime) and the decode ``settings``."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for rel, size, mtime in _walk_files(Path(root).expanduser()):
        h.update(os.fsencode(rel) + f"\0{size}\0{mtime}\n".encode())  # any name's bytes
    return h.hexdigest()


class PatchCache(Dataset):
    """The cached folder as a map-style dataset with :class:`PatchFolder`'s items.

    Items: ``{"image": float32 [3,size,size] in [-1,1], "label": int, "path": str, "cls": str}``.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.meta: dict[str, Any] = json.loads((self.folder / META).read_text(
                encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSON or UTF-8 decoding
            raise DataError(f"no readable patch cache at {self.folder} ({e})") from e
        self.size, self.count = int(self.meta["size"]), int(self.meta["count"])
        self.class_names: list[str] = list(self.meta["classes"])
        self._maps: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:  # workers map the files themselves
        return {**self.__dict__, "_maps": None}

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            s, f = self.size, self.folder
            self._maps = {
                "images": np.memmap(f / "images.u8", np.uint8, "r", shape=(self.count, s, s, 3)),
                "labels": np.memmap(f / "labels.u8", np.uint8, "r", shape=(self.count,)),
                "classes": np.memmap(f / "classes.u16", np.uint16, "r", shape=(self.count,)),
                "offsets": np.memmap(f / "paths.i64", np.int64, "r", shape=(self.count + 1,)),
            }
        return self._maps

    def __len__(self) -> int:
        return self.count

    def path(self, index: int) -> str:
        """Source path of item ``index``."""
        off = self._arrays()["offsets"]
        start, end = int(off[index]), int(off[index + 1])
        with open(self.folder / "paths.txt", "rb") as fh:
            fh.seek(start)
            return fh.read(end - start).decode("utf-8")

    @property
    def labels(self) -> list[int]:
        """Label of every item (0 normal, 1 anomalous)."""
        return self._arrays()["labels"].astype(int).tolist()

    def rgb8(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``[size, size, 3]`` (a copy)."""
        return np.array(self._arrays()["images"][index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        index %= self.count
        a = self._arrays()
        return {"image": image_to_tensor(self.rgb8(index)), "label": int(a["labels"][index]),
                "path": self.path(index), "cls": self.class_names[int(a["classes"][index])]}


class _Decoded(Dataset):
    """uint8 patches of a :class:`PatchFolder` (what its items are made from)."""

    def __init__(self, folder: PatchFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.folder.rgb8(index)))  # writable copy


def build_cache(folder: PatchFolder, out: str | os.PathLike[str], key: str,
                workers: int = 0, batch: int = 256) -> PatchCache:
    """Decode ``folder`` once into a cache at ``out`` (assembled aside, renamed into place)."""
    final = Path(out)
    tmp = final.parent / f".{final.name}.tmp-{unique_tag()}"
    tmp.mkdir(parents=True)
    try:
        n, s = len(folder), folder.size
        images = np.memmap(tmp / "images.u8", np.uint8, "w+", shape=(n, s, s, 3))
        loader = DataLoader(_Decoded(folder), batch_size=batch, num_workers=workers,
                            worker_init_fn=worker_init(workers))
        done = 0
        for chunk in loader:
            images[done:done + len(chunk)] = chunk.numpy()
            done += len(chunk)
        images.flush()
        del images
        names = list(folder.classes)
        samples = folder.samples
        np.asarray([x.label for x in samples], np.uint8).tofile(tmp / "labels.u8")
        np.asarray([names.index(x.cls) for x in samples], np.uint16).tofile(tmp / "classes.u16")
        encoded = [x.path.encode("utf-8") for x in samples]
        np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64) \
            .tofile(tmp / "paths.i64")
        (tmp / "paths.txt").write_bytes(b"".join(encoded))
        write_json(tmp / META, {"version": VERSION, "decoder": DECODER_VERSION, "key": key,
                                "count": n, "size": s, "classes": names,
                                "root": str(folder.root)})
        _install(tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PatchCache(final)


def is_complete(where: Path, key: str) -> bool:
    """Whether ``where`` holds a finished cache for ``key``: ``cache.json`` readable with this
    key, this :data:`VERSION` and :data:`~gen_ad.data.folders.DECODER_VERSION` (a cache that
    older code wrote holds other pixels), and every data file of the size its count and patch
    size imply."""
    try:
        meta = json.loads((where / META).read_text(encoding="utf-8"))
        n, s = int(meta["count"]), int(meta["size"])
        if (meta.get("key"), meta.get("version"), meta.get("decoder", 1)) != \
                (key, VERSION, DECODER_VERSION):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    sizes = {"images.u8": n * s * s * 3, "labels.u8": n, "classes.u16": 2 * n,
             "paths.i64": 8 * (n + 1)}
    try:
        return all((where / f).stat().st_size == size for f, size in sizes.items()) \
            and (where / "paths.txt").is_file()
    except OSError:
        return False


def _install(tmp: Path, final: Path, key: str, tries: int = 3) -> None:
    """Rename the finished ``tmp`` to ``final``; when another process (another rank, another
    machine on a shared disk) installed the same cache first, keep its and drop ``tmp``.

    A stale or damaged folder under ``final`` is renamed away and deleted, then ``tmp`` goes in.

    Raises:
        DataError: ``final`` kept being replaced by something else.
    """
    for _ in range(tries):
        try:
            os.replace(tmp, final)  # a directory replaces only a missing or empty one
            return
        except OSError as e:
            if not _occupied(e, final):
                raise
        if is_complete(final, key):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            remove_dir(final)
        except FileNotFoundError:  # another process removed it meanwhile
            pass
    raise DataError(f"could not install the patch cache at {final}: another process keeps "
                    "replacing it with a different one")


def _occupied(e: OSError, final: Path) -> bool:
    """``os.replace`` failed with ``e`` because a folder is at ``final`` (Windows refuses to
    replace any existing folder, with access denied; POSIX a non-empty one)."""
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
        return True
    return _WINDOWS and e.errno == errno.EACCES and final.is_dir()


def cached_folder(cache_dir: str | os.PathLike[str], *, root: str | os.PathLike[str], size: int,
                  classes: Sequence[str] | None = None,
                  normal_classes: Sequence[str] = ("normal",), resize: ResizeMode = "resize",
                  max_bad_fraction: float = 0.05, stain: Any = None,
                  stain_settings: dict[str, Any] | None = None, workers: int = 0) -> PatchCache:
    """The cache of a :class:`PatchFolder` with these arguments: opened when present, else built.

    Args:
        cache_dir: folder that holds caches (one subfolder per key).
        root, size, classes, normal_classes, resize, max_bad_fraction, stain: as
            :class:`PatchFolder`.
        stain_settings: what identifies ``stain`` (method, reference file) in the key.
        workers: DataLoader workers decoding while the cache is built.
    """
    settings = {"version": VERSION, "decoder": DECODER_VERSION, "size": size, "resize": resize,
                "max_bad": max_bad_fraction,
                "classes": None if classes is None else list(classes),
                "normal": list(normal_classes), "stain": stain_settings}
    key = content_key(root, settings)
    where = Path(cache_dir).expanduser() / key[:24]
    if is_complete(where, key):
        return PatchCache(where)
    if where.exists():
        warnings.warn(f"the patch cache at {where} is incomplete or stale: rebuilding it",
                      stacklevel=2)
    _drop_abandoned(where)
    folder = PatchFolder(root=root, size=size, classes=classes, normal_classes=normal_classes,
                         resize=resize, max_bad_fraction=max_bad_fraction, stain=stain)
    return build_cache(folder, where, key, workers)


def _drop_abandoned(final: Path, idle_s: float = 3600.0) -> list[Path]:
    """Delete the build folders (``.<key>.tmp-<pid>-*``) and trash of ``final`` that a killed
    build left: their process is not running on this machine and nothing in them changed for
    ``idle_s`` (a build on another machine sharing the disk keeps writing its files)."""
    removed = []
    for p in final.parent.glob(f".{final.name}.*-*-*"):
        m = re.fullmatch(rf"\.{re.escape(final.name)}\.(?:tmp|trash)-(\d+)-[0-9a-f]{{8}}", p.name)
        if m is None or _pid_alive(int(m.group(1))) or not _idle(p, idle_s):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        warnings.warn(f"removed {len(removed)} abandoned patch-cache build folder(s) beside "
                      f"{final}", stacklevel=3)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (never signals it on Windows, where
    ``os.kill`` terminates the process whatever the signal)."""
    if _WINDOWS:
        return _windows_pid_alive(pid, *_windows_kernel32())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259
_ERROR_ACCESS_DENIED = 5


def _windows_kernel32() -> tuple[Any, Callable[[], int]]:
    """kernel32 through ctypes (Windows only) and the reader of its last error."""
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k32.GetExitCodeProcess.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
    k32.CloseHandle.argtypes = [wintypes.HANDLE]
    return k32, ctypes.get_last_error  # type: ignore[attr-defined]


def _windows_pid_alive(pid: int, kernel32: Any, last_error: Callable[[], int]) -> bool:
    """``pid`` is alive on Windows: it opens (or exists but is denied to us) and has no exit
    code yet. When unsure it says alive, so nothing of a running build is deleted."""
    import ctypes

    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return last_error() == _ERROR_ACCESS_DENIED  # else no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.pointer(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _idle(folder: Path, idle_s: float) -> bool:
    """Nothing in ``folder`` (itself and its files) was modified in the last ``idle_s``."""
    try:
        newest = max([folder.stat().st_mtime,
                      *(p.stat().st_mtime for p in folder.iterdir())])
    except OSError:
        return False
    return time.time() - newest >= idle_s
