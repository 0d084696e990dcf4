"""What produced a result: gen_ad's version and source commit, the packages that change numbers,
the interpreter, the machine.

Recorded with every training start (``<run>/environment.jsonl``), every export (``model.json``)
and every benchmark (``results.json``, shown in its report), so a number can be traced to the
code and libraries that made it. Nothing here touches the network; a missing package or a
source tree without git reads as ``None``.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# Distributions whose versions can change a figure gen_ad reports (first installed name wins).
_PACKAGES: tuple[tuple[str, ...], ...] = (
    ("torch",), ("torchvision",), ("accelerate",), ("diffusers",), ("numpy",), ("scipy",),
    ("scikit-learn",), ("scikit-image",), ("pillow",), ("lpips",), ("torch-fidelity",),
    ("timm",), ("torchstain",), ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"),
    ("safetensors",), ("huggingface-hub",),
    # slide and TIFF decoders: another version can decode other pixels
    ("tifffile",), ("imagecodecs",), ("openslide-python",), ("openslide-bin",), ("tiffslide",),
)
_GIT_TIMEOUT_S = 5.0


def package_versions() -> dict[str, str | None]:
    """``{distribution: version}`` of the packages that can change gen_ad's numbers (``None``
    when not installed; of alternatives such as faiss-cpu / faiss-gpu, the one installed)."""
    out: dict[str, str | None] = {}
    for names in _PACKAGES:
        found = [(n, v) for n, v in ((n, _version(n)) for n in names) if v is not None]
        name, version = found[0] if found else (names[0], None)
        out[name] = version
    return out


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def source_commit(root: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout gen_ad runs from, else ``None``
    (an installed wheel; git missing or failing).

    ``dirty``: tracked files differ from the commit (untracked files are not counted).
    """
    root = root if root is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=_GIT_TIMEOUT_S, check=True)
    return done.stdout.strip()


def environment(device: str | None = None) -> dict[str, Any]:
    """What this process runs: gen_ad (version, source commit), Python, platform, CPU and torch's
    thread count (training trajectories depend on it), the CUDA
    and cuDNN versions torch was built with (``None`` for a CPU build), the device and its
    name when ``device`` is a CUDA one, :func:`package_versions`, and ``deterministic``:
    :func:`~gen_ad.utils.determinism.deterministic_state` (deterministic mode and TF32)."""
    import torch

    from gen_ad._version import __version__
    from gen_ad.utils.determinism import deterministic_state
    from gen_ad.utils.hardware import cpu_name

    env: dict[str, Any] = {
        "gen_ad": __version__, "source": source_commit(), "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda, "torch_cudnn": torch.backends.cudnn.version()
        if torch.backends.cudnn.is_available() else None,
        "packages": package_versions(), "deterministic": deterministic_state(),
    }
    if device is not None:
        env["device"] = device
        if str(device).startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a report: ``gen_ad 0.1.0 (commit abc1234, modified) · torch 2.5.1 ...``
    (ending ``· deterministic mode`` when it was on)."""
    src = env.get("source")
    where = ("" if not src else
             f" (commit {str(src['commit'])[:7]}{', modified' if src.get('dirty') else ''})")
    pk = env.get("packages") or {}
    libs = ", ".join(f"{k} {v}" for k, v in pk.items()
                     if v and (k in ("torch", "diffusers", "accelerate", "timm")
                               or k.startswith("faiss")))
    det = env.get("deterministic")
    mode = " · deterministic mode" if isinstance(det, dict) and det.get("enabled") else ""
    return (f"gen_ad {env.get('gen_ad', '?')}{where} · Python {env.get('python', '?')} · "
            f"{libs}{mode}")
