"""The KNN feature bank on disk: float32 ``.npy`` shards listed by one manifest, ``bank.json``.

**Layout.** ``bank.json`` lists the shards (plain ``.npy`` names inside the folder, with their
row counts), the vector ``count``, the source ``paths``, the extractor and the search settings;
a bank written by :func:`~gen_ad.baselines.knn.build_bank` or
:func:`~gen_ad.baselines.knn.extend_bank` also holds its ``threshold``, which records the
``count`` and shard list it was calibrated on, and names its ``calibration`` file (leave-one-out
ids and scores). Readers trust only what ``bank.json`` lists. ``threshold.json`` is a copy of the
threshold for ``gen-ad groups --threshold-file``, written just after ``bank.json``.

**Writes.** A fit or an extend is *staged*: new shards and the calibration file are written in
a hidden temporary folder inside the bank (``.staged.<pid>-<random>.tmp``; the bank folder itself
holds the writer lock, so it is never swapped whole), moved in beside the old files (not listed
yet), and ``bank.json`` is replaced last, by one rename. A process killed at any instant leaves
the previous bank as readers see it, or, for a first fit, no bank: a folder with a fit's
leftovers and no ``bank.json`` is refused as incomplete. The next writer removes the leftovers
(the lock sweeps the staging folder; a commit deletes files that ``bank.json`` does not list).

Banks of an earlier gen_ad (``version`` 1: ``bank.json`` rewritten after every shard, then
``calibration.npy`` and ``threshold.json``) still load. Their ``threshold.json`` is trusted
only when ``calibration.npy`` holds the rows a calibration of the current bank draws and the
threshold is their ``Q3 + 1.5 IQR``; one without ``threshold.json`` is an interrupted fit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gen_ad.data.folders import DECODER_VERSION
from gen_ad.errors import CheckpointError, ConfigError, DataError
from gen_ad.scoring.thresholds import Threshold, iqr_threshold
from gen_ad.utils.io import (
    atomic_dir,
    atomic_path,
    inside,
    json_object,
    unique_tag,
    write_json,
)

META = "bank.json"
CALIB = "calibration.npy"  # the calibration file of a version-1 bank
THRESH = "threshold.json"
VERSION = 2
STAGE = "staged"  # staging folders are .staged.<pid>-<random>.tmp inside the bank
_OWN_FILES = re.compile(r"^(?:features-\d+-.+|calibration(?:-.+)?)\.npy$")


def incomplete(root: Path, why: str) -> CheckpointError:
    """The error for a bank folder whose fit never wrote its final ``bank.json``."""
    return CheckpointError(f"incomplete bank at {root}: the fit was interrupted or is still "
                           f"running ({why}); re-run `gen-ad knn fit`")


def _leftovers(root: Path) -> bool:
    """Whether ``root`` holds what a fit writes before its ``bank.json``."""
    return any(root.glob(f".{STAGE}.*.tmp")) or any(root.glob("features-*.npy"))


def read_meta(root: Path) -> dict[str, Any]:
    """The parsed ``bank.json`` of ``root`` (a CheckpointError when absent or not JSON)."""
    path = root / META
    if not path.is_file():
        if _leftovers(root):
            raise incomplete(root, f"no {META} yet")
        raise CheckpointError(f"no feature bank at {root} (missing {META}); build one with "
                              "`gen-ad knn fit`")
    return json_object(path.read_bytes(), path)


def _interrupted_v1(root: Path) -> bool:
    """A version-1 ``bank.json`` without ``threshold.json``: a fit killed before its end."""
    try:
        meta = json.loads((root / META).read_text(encoding="utf-8"))
        return int(meta.get("version", 1)) < VERSION and not (root / THRESH).is_file()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError,
            ValueError):
        return False


def check_no_bank(root: str | os.PathLike[str]) -> None:
    """Refuse a folder that holds a feature bank already (ConfigError naming ``--extend``); an
    interrupted fit of an earlier gen_ad may be fitted over."""
    r = Path(root).expanduser()
    if (r / META).exists() and not _interrupted_v1(r):
        raise ConfigError(f"a feature bank already exists at {r}; pass --extend to add images "
                          "to it, or choose another --out")


def fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What a threshold records of the bank it was calibrated on: ``count`` and shard names."""
    return {"count": int(meta["count"]), "shards": [str(sh["file"]) for sh in meta["shards"]]}


def calibration_ids(count: int, calib_size: int, seed: int) -> np.ndarray:
    """The bank rows a leave-one-out calibration scores: ``min(count, calib_size)`` of them,
    drawn without replacement with ``seed``, sorted."""
    n = min(int(count), int(calib_size))
    return np.sort(np.random.default_rng(seed).choice(int(count), size=n, replace=False))


def sweep_unlisted(root: Path, meta: dict[str, Any]) -> list[Path]:
    """Delete the shard and calibration files of ``root`` that ``meta`` does not list (left by
    an interrupted write, or replaced). Only gen_ad's own names; call with the writer lock."""
    keep = {str(sh["file"]) for sh in meta["shards"]} | {str(meta.get("calibration"))}
    gone = []
    for p in root.iterdir():
        if _OWN_FILES.match(p.name) and p.name not in keep and p.is_file() \
                and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


class FeatureBank:
    """Normal feature vectors on disk: float32 ``.npy`` shards + the ``bank.json`` manifest.

    ``bank.json`` holds the extractor (name, weights, ``weights_identity`` (file, sha256, size),
    random_init, tiny, dim, embedding ``precision``, training resolution), ``count``, the search
    settings, the shard list, the source ``paths``, and the threshold (see the module text).

    Writing: :meth:`stage` starts a write that readers do not see until :meth:`commit`;
    :meth:`abort` drops it. :meth:`append` outside a staged write (a bank from :meth:`create`
    without ``staged``) rewrites ``bank.json`` after each shard.

    Raises:
        CheckpointError: no ``bank.json`` (an incomplete bank when a fit's leftovers are there),
            a damaged one, shards outside the folder, missing or not as recorded.
    """

    root: Path
    meta: dict[str, Any]
    _stage: Path | None
    _staged: set[str]
    _committed: dict[str, Any] | None

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._reset(Path(root).expanduser(), {})
        self.meta = read_meta(self.root)
        self._check()
        if self.version < VERSION and not (self.root / THRESH).is_file():
            raise incomplete(self.root, f"its {META} was written by an earlier gen_ad and no "
                                        f"{THRESH} was saved")

    def _reset(self, root: Path, meta: dict[str, Any]) -> None:
        self.root, self.meta = root, meta
        self._stage, self._staged, self._committed = None, set(), None

    def _check(self) -> None:
        """Refuse a ``bank.json`` whose shards leave the bank folder, are missing, or do not
        hold the rows it records (checked from the ``.npy`` headers, without reading data)."""
        where = self.root / META
        try:
            dim, count, shards = int(self.meta["dim"]), int(self.meta["count"]), \
                list(self.meta["shards"])
            rows = [int(sh["count"]) for sh in shards]
            files = [str(sh["file"]) for sh in shards]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where} is damaged: {type(e).__name__} {e}") from e
        for name, n in zip(files, rows):
            if Path(name).name != name or not name.endswith(".npy"):
                raise CheckpointError(f"{where}: refusing the shard path {name!r} (shards are "
                                      "plain .npy names inside the bank folder)")
            path = inside(self.root, name)
            try:
                mm = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{where}: shard {name} is missing or damaged "
                                      f"({type(e).__name__})") from e
            shape, size, offset = mm.shape, path.stat().st_size, int(mm.offset)
            del mm
            if shape != (n, dim) or size != offset + n * dim * 4:
                raise CheckpointError(f"{where}: shard {name} holds {shape}, the bank records "
                                      f"({n}, {dim})")
        if sum(rows) != count or len(self.meta.get("paths", [])) != count:
            raise CheckpointError(f"{where} is inconsistent: {count} vectors recorded, "
                                  f"{sum(rows)} in shards, {len(self.meta.get('paths', []))} paths")

    @classmethod
    def create(cls, root: str | os.PathLike[str], dim: int, extractor: dict[str, Any],
               settings: dict[str, Any] | None = None, staged: bool = False) -> FeatureBank:
        """Start an empty bank at ``root`` (an existing bank there is an error).

        ``staged``: nothing is published before :meth:`commit` (how a fit writes); otherwise
        ``bank.json`` is written now and after every :meth:`append`.
        """
        r = Path(root).expanduser()
        check_no_bank(r)
        r.mkdir(parents=True, exist_ok=True)
        bank = cls.__new__(cls)
        bank._reset(r, {"version": VERSION, "dim": int(dim), "count": 0, "extractor": extractor,
                        "settings": dict(settings or {}), "shards": [], "paths": [],
                        "decoder": DECODER_VERSION})
        if staged:
            bank.stage()
        else:
            bank.save_meta()
        return bank

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 1))

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def paths(self) -> list[str]:
        return list(self.meta["paths"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.meta.get("settings", {}))

    def save_meta(self) -> None:
        """Atomically rewrite ``bank.json`` (not during a staged write: :meth:`commit` does)."""
        if self._stage is not None:
            raise ConfigError(f"a staged write of the bank at {self.root} is in progress; "
                              "commit() publishes it")
        write_json(self.root / META, self.meta, indent=1)

    # -- writing
    def stage(self) -> Path:
        """Start a write: new files go to a hidden temporary folder in the bank, and the bank
        as read stays the previous one until :meth:`commit`. Returns that folder."""
        if self._stage is None:
            self._repair_threshold_file()
            self._stage = atomic_dir(self.root / STAGE)
            self._committed = copy.deepcopy(self.meta)
        return self._stage

    def _repair_threshold_file(self) -> None:
        """Rewrite ``threshold.json`` when a kill between ``bank.json`` and it left it stale."""
        rec = self.meta.get("threshold")
        path = self.root / THRESH
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == rec
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            same = False
        if rec is not None and not same:
            write_json(path, rec)

    def append(self, feats: np.ndarray, paths: list[str] | None = None) -> None:
        """Add ``feats`` ``[n, dim]`` as a new shard (float32), with their source paths."""
        arr = np.ascontiguousarray(feats, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise DataError(f"features must be [n, {self.dim}], got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise DataError("features contain NaN or infinite values")
        paths = list(paths) if paths is not None else [""] * len(arr)
        if len(paths) != len(arr):
            raise DataError(f"{len(paths)} paths for {len(arr)} feature rows")
        if len(arr) == 0:
            return
        name = f"features-{len(self.meta['shards']):05d}-{unique_tag()}.npy"  # never reused
        with atomic_path((self._stage or self.root) / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        self.meta["shards"].append({"file": name, "count": int(len(arr))})
        self.meta["paths"].extend(paths)
        self.meta["count"] = self.count + len(arr)
        if self._stage is None:
            self.save_meta()
        else:
            self._staged.add(name)

    def commit(self, threshold: Threshold, ids: np.ndarray, scores: np.ndarray) -> None:
        """Publish the bank with its leave-one-out calibration (``ids``, ``scores`` ``[n]``)
        and ``threshold``: the staged files are moved in (not listed yet), ``bank.json`` is
        replaced (one rename: readers switch from the old bank to the new one), then
        ``threshold.json``; files no longer listed are deleted."""
        stage = self.stage()
        calib = f"calibration-{unique_tag()}.npy"
        table = np.stack([np.asarray(ids, np.float64), np.asarray(scores, np.float64)], axis=1)
        with atomic_path(stage / calib) as tmp, open(tmp, "wb") as f:
            np.save(f, table)
        record = {**threshold.to_dict(), "bank": fingerprint(self.meta)}
        self.meta.update(version=VERSION, threshold=record, calibration=calib)
        for name in sorted(self._staged | {calib}):
            os.replace(stage / name, self.root / name)
        write_json(self.root / META, self.meta, indent=1)  # the commit
        write_json(self.root / THRESH, record)
        self._reset(self.root, self.meta)
        shutil.rmtree(stage, ignore_errors=True)
        sweep_unlisted(self.root, self.meta)

    def abort(self) -> None:
        """Drop a staged write (its files are deleted); the bank on disk stays as it was."""
        if self._stage is None:
            return
        shutil.rmtree(self._stage, ignore_errors=True)
        self._reset(self.root, self._committed if self._committed is not None else self.meta)

    # -- reading
    def _file(self, name: str) -> Path:
        """Where shard ``name`` is: the staging folder until committed, else the bank."""
        return self._stage / name if self._stage is not None and name in self._staged \
            else self.root / name

    def _shard(self, i: int) -> np.memmap:
        return np.load(self._file(self.meta["shards"][i]["file"]), mmap_mode="r")

    def blocks(self, max_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(offset, block)`` float32 copies of at most ``max_rows`` rows, in order.

        Blocks are read with plain file reads (no memory map stays open), so resident memory
        stays near one block whatever the bank size.
        """
        offset = 0
        for i, sh in enumerate(self.meta["shards"]):
            mm = self._shard(i)
            header, n = int(mm.offset), len(mm)
            del mm  # read with plain file reads: mapped pages would stay resident
            with open(self._file(sh["file"]), "rb") as f:
                for s in range(0, n, max_rows):
                    rows = min(max_rows, n - s)
                    f.seek(header + s * self.dim * 4)
                    block = np.fromfile(f, dtype=np.float32, count=rows * self.dim)
                    yield offset + s, block.reshape(rows, self.dim)
            offset += n

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Copy the rows with global indices ``ids`` ``[n]`` -> ``[n, dim]`` (any order)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        offset = 0
        for i, sh in enumerate(self.meta["shards"]):
            sel = np.nonzero((ids >= offset) & (ids < offset + sh["count"]))[0]
            if len(sel):
                mm = self._shard(i)
                out[sel] = mm[ids[sel] - offset]
                del mm
            offset += sh["count"]
        return out

    def load(self) -> np.ndarray:
        """The whole bank in memory ``[count, dim]`` float32."""
        if self.count == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([b for _, b in self.blocks(1 << 30)], axis=0)

    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """The saved leave-one-out calibration: ``(ids [n] int64, scores [n] float64)``."""
        name = str(self.meta.get("calibration") or CALIB)
        try:
            table = np.load(inside(self.root, name))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.root}: the calibration file {name} is missing or "
                                  f"damaged ({type(e).__name__})") from e
        return table[:, 0].astype(np.int64), table[:, 1].astype(np.float64)


# ----------------------------------------------------------------------------- thresholds


def _threshold(rec: Any, where: Path) -> Threshold:
    """A :class:`Threshold` from a ``bank.json`` record (a CheckpointError when damaged)."""
    try:
        thr = Threshold(value=float(rec["value"]), method=str(rec.get("method", "iqr")),
                        params={k: float(v) for k, v in dict(rec.get("params", {})).items()},
                        n=int(rec.get("n", 0)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: the threshold record is damaged "
                              f"({type(e).__name__})") from e
    if not math.isfinite(thr.value):
        raise CheckpointError(f"{where}: the threshold is not finite")
    return thr


def _mismatch(was: Any, now: dict[str, Any]) -> str:
    if not isinstance(was, dict) or "count" not in was:
        return "its threshold does not record the vectors it was calibrated on"
    n_was = len(was.get("shards") or [])
    other = " (other shard files)" if (was["count"], n_was) == (now["count"],
                                                                 len(now["shards"])) else ""
    return (f"its threshold was calibrated on {was['count']} vectors in {n_was} shard(s), the "
            f"bank holds {now['count']} in {len(now['shards'])}{other}")


def _legacy_threshold(bank: FeatureBank) -> tuple[Threshold | None, str]:
    """A version-1 ``threshold.json``, checked against ``calibration.npy`` (an interrupted
    ``--extend`` of an earlier gen_ad left the grown bank with the old pair, or with a new
    ``calibration.npy`` and the old ``threshold.json``)."""
    path = bank.root / THRESH
    if not path.is_file():
        return None, ""
    try:
        thr = Threshold.load(path)
    except DataError as e:
        raise CheckpointError(str(e)) from e
    try:
        table = np.load(bank.root / CALIB)
    except (OSError, ValueError):
        return thr, f"its {THRESH} cannot be checked ({CALIB} is missing or damaged)"
    st = bank.settings
    ids = calibration_ids(bank.count, int(st.get("calib_size", 5000)), int(st.get("seed", 0)))
    ok = (table.ndim == 2 and table.shape == (len(ids), 2)
          and np.array_equal(table[:, 0], ids) and thr.method == "iqr"
          and bool(np.all(np.isfinite(table[:, 1])))
          and math.isclose(iqr_threshold(table[:, 1]), thr.value, rel_tol=1e-12))
    return thr, "" if ok else (f"its {THRESH} (written by an earlier gen_ad) was not "
                               f"calibrated on the {bank.count} vectors it holds (an "
                               "interrupted --extend)")


def saved_threshold(bank: FeatureBank) -> tuple[Threshold | None, str]:
    """The threshold saved with ``bank`` and, when it was calibrated on other vectors than the
    bank holds, why (``""`` when it belongs to them, or when none was saved).

    Raises:
        CheckpointError: the saved threshold is damaged.
    """
    rec = bank.meta.get("threshold")
    if rec is None:
        return _legacy_threshold(bank) if bank.version < VERSION else (None, "")
    thr = _threshold(rec, bank.root / META)
    now = fingerprint(bank.meta)
    was = rec.get("bank") if isinstance(rec, dict) else None
    return thr, "" if was == now else _mismatch(was, now)
