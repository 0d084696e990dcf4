"""Atomic file writes, folders published as a whole, integrity manifests and safe loading.

Every file gen_ad writes goes to a temporary name in the same directory (unique per process:
pid + random) and is renamed into place, so a process killed at any instant leaves either the old
file or the new one, never a torn one. Folders that must change as a set (training states, the
``model/`` export) are assembled under a temporary name, get a manifest of their files' sizes and
sha256 checksums written last (:func:`write_manifest`), and are swapped in by
:func:`publish_dir`; readers check them with :func:`check_manifest` before trusting them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gen_ad.errors import CheckpointError, DiskFullError

if TYPE_CHECKING:  # torch and safetensors are imported where used: torch-free commands skip them
    import torch

MANIFEST = "manifest.json"
SAFE_TORCH_LOAD = (2, 6)  # torch <= 2.5.1: weights_only can be made to run code (CVE-2025-32434)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def unique_tag() -> str:
    """A name part unique to this process and call: ``<pid>-<8 random hex digits>``."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def disk_full(exc: BaseException, path: str | os.PathLike[str]) -> DiskFullError | None:
    """A new :class:`DiskFullError` naming ``path`` when ``exc`` is a plain ENOSPC/EDQUOT
    error, else ``None`` (re-raise ``exc`` as it is)."""
    if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in _FULL:
        return DiskFullError(f"no space left on the device while writing {path}")
    return None


def _reraise(exc: OSError, path: str | os.PathLike[str]) -> NoReturn:
    full = disk_full(exc, path)
    if full is None:
        raise exc
    raise full from exc


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: final destination (its parent directory is created).
    Yields:
        A temporary path to write to. It is removed if the block raises.
    Raises:
        DiskFullError: the disk filled up (the message names ``path``).
    """
    dst = Path(path)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_file(dst)
    except OSError as e:
        _reraise(e, dst)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, dst)
    except OSError as e:
        _reraise(e, dst)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file(dst: Path) -> Path:
    """Create an empty ``.<name>.<pid>-<random>.tmp`` beside ``dst``: exclusively (never through
    an existing name or link) and with the umask's usual mode, which the kernel applies (the
    process umask is never changed, so files other threads create meanwhile keep theirs)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = dst.with_name(f".{dst.name}.{unique_tag()}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (the one place file contents reach the disk)."""
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        _write_file(tmp, data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line (append is atomic enough for single small lines on POSIX)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(p, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")
    except OSError as e:
        _reraise(e, p)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a torn last line (killed writer) is ignored."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def check_state_dict(sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                     what: str) -> None:
    """Key-by-key and shape-by-shape equality of ``sd`` with ``ref`` before a strict load.

    Raises:
        CheckpointError: ``"<what>: missing k; unexpected k; k has shape (..), expected (..)"``,
            the first three problems named.
    """
    problems = [f"missing {k}" for k in ref if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in ref]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in ref.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{what}: {'; '.join(problems[:3])}{more}")


def save_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors (contiguous CPU copies)."""
    from safetensors.torch import save as safetensors_bytes

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_bytes(path, safetensors_bytes(flat, metadata=dict(metadata) if metadata else None))


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file into a dict of tensors.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except FileNotFoundError as e:
        raise CheckpointError(f"weights file not found: {path}") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _not_safetensors(e, path) from e


def load_safetensors_bytes(data: bytes, source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file's ``data`` (already read, e.g. by :func:`checked_bytes`) into a
    dict of CPU tensors; ``source`` names it in errors.

    Raises:
        CheckpointError: ``data`` is truncated or not a safetensors file.
    """
    from safetensors.torch import load as safetensors_load

    try:
        return safetensors_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _not_safetensors(e, source) from e


def _not_safetensors(e: Exception, source: str | os.PathLike[str]) -> CheckpointError:
    """The error for safetensors data that does not load (its first message line)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"{source} is damaged or not a safetensors file ({msg})")


def torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically ``torch.save`` plain data (tensors, numbers, lists, dicts; never modules)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a :func:`torch_save` file with ``weights_only=True`` (no arbitrary pickles).

    Raises:
        CheckpointError: the file is missing or damaged, or holds Python objects other than
            tensors and plain data (it is refused, never executed).
    """
    import torch

    if torch.__version__ < SAFE_TORCH_LOAD:
        warnings.warn(f"torch {torch.__version__}'s weights_only loader can be made to run code "
                      f"(CVE-2025-32434, fixed in torch 2.6, gen_ad's floor): reading {path}; "
                      "load .pt/.pth files only from sources you trust, or upgrade torch",
                      RuntimeWarning, stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"file not found: {path}") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and plain data, "
            "and gen_ad never unpickles those (convert it to safetensors)") from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... when torn
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is damaged or truncated ({msg})") from e


# ----------------------------------------------------------------------------- folders


def atomic_dir(final: str | os.PathLike[str]) -> Path:
    """A fresh temporary directory ``.<name>.<pid>-<random>.tmp`` beside ``final``, for
    :func:`publish_dir`.

    It is made with mode ``0o777`` less the process umask, as ``os.mkdir`` makes any folder
    (``tempfile.mkdtemp`` made it ``0o700``, so a published folder was unreadable to colleagues
    sharing the server), and exclusively: an existing name (or link) is never reused.
    """
    dst = Path(final)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = dst.with_name(f".{dst.name}.{unique_tag()}.tmp")
            try:
                os.mkdir(tmp, 0o777)
                return tmp
            except FileExistsError:
                continue
    except OSError as e:
        _reraise(e, dst)


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{unique_tag()}")


def publish_dir(tmp: Path, final: str | os.PathLike[str]) -> None:
    """Swap a finished temporary directory in as ``final``: rename the old one away, rename
    ``tmp`` into place, then delete the old one.

    A kill between the two renames leaves ``final`` absent and the previous version under
    ``.<name>.old-*``; :func:`recover_dir` puts it back.
    """
    dst = Path(final)
    if dst.exists():
        old = _old_name(dst)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a published folder without ever leaving it half-deleted under its own name:
    rename it to a hidden ``.<name>.trash-*`` first, then delete that."""
    p = Path(path)
    if not p.exists():
        return
    trash = p.with_name(f".{p.name}.trash-{unique_tag()}")
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:\d+-[0-9a-z_]{6,}\.tmp|trash-\d+-[0-9a-f]{8}"
                      r"|(?P<old>old)-\d+-[0-9a-f]{8})$")


def sweep_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete what interrupted writes left in ``folder`` and its direct subfolders.

    Only gen_ad's own names are touched: :func:`atomic_path` / :func:`atomic_dir` temporaries
    (``.<name>.<pid>-<random>.tmp``), :func:`remove_dir` trash (``.<name>.trash-<tag>``) and a
    swap's previous version (``.<name>.old-<tag>``) once ``<name>`` exists again (without it,
    :func:`recover_dir` may still need it). Call only with ``folder``'s writer lock held: then
    no other process is writing them.

    Returns:
        The removed paths.
    """
    root = Path(folder)
    dirs = [root, *(p for p in _entries(root) if p.is_dir() and not p.name.startswith("."))]
    removed = []
    for d in dirs:
        for p in _entries(d):
            m = _TEMP_RE.match(p.name)
            if m is None or (m.group("old") and not (d / m.group("name")).exists()):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def recover_dir(final: str | os.PathLike[str]) -> Path | None:
    """Put back the previous version of ``final`` when a :func:`publish_dir` was killed between
    its two renames (``final`` missing, ``.<name>.old-*`` present). Returns what was restored."""
    dst = Path(final)
    if dst.exists() or not dst.parent.is_dir():
        return None
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    os.replace(olds[-1], dst)
    warnings.warn(f"restored {dst} from {olds[-1].name} (an interrupted swap)", stacklevel=2)
    return dst


# ----------------------------------------------------------------------------- manifests


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's contents (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike[str], extra: Mapping[str, Any] | None = None,
                   name: str = MANIFEST) -> dict[str, Any]:
    """Record every file under ``folder`` (size + sha256) in ``folder/name``, written last.

    Returns:
        The manifest (``{"files": {relative path: {"size", "sha256"}}, **extra}``).
    """
    root = Path(folder)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != name:
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"files": files, **dict(extra or {})}
    write_json(root / name, manifest, indent=1)
    return manifest


def inside(root: str | os.PathLike[str], rel: str) -> Path:
    """``root/rel`` when ``rel`` is a relative path that stays inside ``root``.

    Raises:
        CheckpointError: ``rel`` is absolute or leaves ``root`` (``..``, a link outside).
    """
    base = Path(root).resolve()
    if not rel or Path(rel).is_absolute():
        raise CheckpointError(f"{root}: refusing the path {rel!r} (not relative to the folder)")
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise CheckpointError(f"{root}: refusing the path {rel!r}: it points outside the folder")
    return base / rel


def json_object(data: bytes | str, where: str | os.PathLike[str],
                what: str = "a JSON object") -> dict[str, Any]:
    """Parse ``data`` (read from ``where``, named in errors) as one JSON object.

    Raises:
        CheckpointError: not UTF-8, not JSON, or not an object (``what`` says what it should be).
    """
    try:
        obj = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[...
        raise CheckpointError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} is damaged: not {what}")
    return obj


def read_manifest_file(folder: str | os.PathLike[str], name: str = MANIFEST) -> dict[str, Any]:
    """Read ``folder/name`` (a CheckpointError when missing or not a manifest)."""
    p = Path(folder) / name
    if p.exists() and not p.is_file():  # a FIFO would block the read
        raise CheckpointError(f"{p} is damaged: not a regular file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is incomplete: no {name}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{p} is damaged: {type(e).__name__}") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{p} is damaged: no file list")
    return data


def _entry(folder: str | os.PathLike[str], name: str, manifest: Mapping[str, Any],
           rel: str) -> tuple[Path, int, str]:
    """``(path, size, sha256)`` of the manifest's entry for ``rel``."""
    rec = manifest["files"].get(rel)
    if rec is None:
        raise CheckpointError(f"{folder}/{name} does not list {rel}")
    p = inside(folder, rel)
    try:
        return p, int(rec["size"]), str(rec["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/{name} is damaged (entry {rel})") from e


def _mismatch(folder: str | os.PathLike[str], rel: str, size: int, recorded: int) -> NoReturn:
    if size != recorded:
        raise CheckpointError(f"{folder}: {rel} has {size} bytes, the manifest recorded "
                              f"{recorded} (truncated or replaced)")
    raise CheckpointError(f"{folder}: {rel} does not match its recorded sha256 "
                          "(damaged or replaced)")


def _check_file(folder: str | os.PathLike[str], name: str, manifest: Mapping[str, Any],
                rel: str) -> None:
    """Check ``folder/rel`` on disk against the manifest (streamed: no copy kept)."""
    p, size, digest = _entry(folder, name, manifest, rel)
    if not p.is_file():
        raise CheckpointError(f"{folder} is incomplete: {rel} is missing")
    if p.stat().st_size != size or sha256_file(p) != digest:
        _mismatch(folder, rel, p.stat().st_size, size)


def checked_bytes(folder: str | os.PathLike[str], manifest: Mapping[str, Any], rel: str,
                  name: str = MANIFEST) -> bytes:
    """The contents of ``folder/rel``, read once and checked (size, sha256) against
    ``manifest`` (from :func:`read_manifest_file`).

    Load from the returned bytes, never by opening the file again: a folder published anew
    between a check and a later read would hand over another version's file.

    Raises:
        CheckpointError: ``rel`` is not listed, missing, outside the folder, or differs.
    """
    p, size, digest = _entry(folder, name, manifest, rel)
    if p.exists() and not (p.is_file() or p.is_dir()):  # a FIFO or device: blocks or never ends
        raise CheckpointError(f"{folder}: {rel} is not a regular file")
    try:
        with open(p, "rb") as f:
            got = os.fstat(f.fileno()).st_size
            if got != size:  # refused unread (a huge file would fill the memory first)
                _mismatch(folder, rel, got, size)
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise CheckpointError(f"{folder} is incomplete: {rel} is missing") from e
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        _mismatch(folder, rel, len(data), size)
    return data


def check_files(folder: str | os.PathLike[str], manifest: Mapping[str, Any],
                skip: Collection[str] = (), name: str = MANIFEST) -> None:
    """Check every file ``manifest`` lists but ``skip`` (those read by :func:`checked_bytes`)
    on disk (inside the folder, size, sha256).

    Raises:
        CheckpointError: a file is missing, outside the folder, of the wrong size or has a
            different checksum (the message names it).
    """
    for rel in manifest["files"]:
        if rel not in skip:
            _check_file(folder, name, manifest, rel)


def check_manifest(folder: str | os.PathLike[str], name: str = MANIFEST) -> dict[str, Any]:
    """Verify every file listed in ``folder/name`` (inside the folder, size, sha256).

    Returns:
        The manifest.
    Raises:
        CheckpointError: the manifest is missing or damaged, or a file is missing, outside the
            folder, of the wrong size or has a different checksum (the message names it).
    """
    manifest = read_manifest_file(folder, name)
    check_files(folder, manifest, name=name)
    return manifest
