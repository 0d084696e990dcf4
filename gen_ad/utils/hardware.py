"""What machine a benchmark ran on (every bench/*.py JSON line carries this)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def check_device(name: str) -> str:
    """Validate a device name (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...) and return it.

    Raises:
        ConfigError: not a device name, or a CUDA device this machine does not have.
    """
    import torch

    from gen_ad.errors import ConfigError

    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device (use auto, cpu, cuda or cuda:N)") \
            from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"--device '{name}': this machine has {n} CUDA device(s)")
    return str(name)
