"""Deterministic mode: the same command, seed, code, libraries and hardware give the same bits on
CUDA too.

On CPU gen_ad already repeats bitwise (same thread count). On CUDA it does not by default: cuDNN
picks convolution algorithms by timing them, several backward kernels add with atomics, cuBLAS
splits reductions over a workspace, scatter/index_add add in arrival order. Deterministic mode
(:func:`enable_deterministic`, process-wide) sets:

* ``torch.use_deterministic_algorithms(True)``, **not** ``warn_only``: an operation that has only
  a non-deterministic kernel on the device raises instead of silently breaking the promise; the
  error becomes a :class:`NondeterministicOpError` naming the operation and the switch
  (:func:`nondeterministic_errors`);
* ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when the variable is absent (``:16:8`` is accepted too).
  cuBLAS reads it once, when it first runs: a warning says so when CUDA was already initialised
  in this process, or when the variable holds another value (cuBLAS matmuls then raise).

TF32 is left as it is (PyTorch's defaults: TF32 for cuDNN convolutions, full float32 for
matmuls): a TF32 kernel is deterministic, so it does not break repeatability; turning it off would
change the numbers and slow convolutions for a reason unrelated to repeating them.
:func:`deterministic_state` records the TF32 settings with the rest, for provenance.

Switches: ``train.deterministic: true`` (one training run, :func:`deterministic_mode` restores the
previous flags after it) and the environment variable ``GEN_AD_DETERMINISTIC=1`` (every command,
:func:`deterministic_from_environment`). Either turns the mode on; neither turns off what the
other turned on. Deterministic kernels can be slower; ``torch.empty`` memory is filled with NaN
(``torch.utils.deterministic.fill_uninitialized_memory``), so a read of unset memory shows.

torch is imported inside the functions: the command line stays fast when the mode is off.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from gen_ad.errors import ConfigError, GenAdError

ENV_VAR = "GEN_AD_DETERMINISTIC"
CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
#: The workspace settings that make cuBLAS deterministic (PyTorch accepts these two).
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
# torch's messages: "<op> does not have a deterministic implementation, but you set ..." and the
# cuBLAS one ("... this operation is not deterministic because it uses CuBLAS ...").
_OP_RE = re.compile(r"(\S+) does not have a deterministic implementation")
_CUBLAS_RE = re.compile(r"not deterministic because it uses CuBLAS")
#: What in gen_ad runs an operation known to lack a deterministic CUDA kernel (name fragments).
_KNOWN_USES: tuple[tuple[str, str], ...] = (
    ("grid_sampler_2d_backward", "StyleGAN2's ADA geometric augmentation; keep only colour "
     "transforms (augment.transforms) or disable it (augment.ada=false augment.p=0)"),
    ("reflection_pad2d_backward", "StyleGAN2's ADA geometric augmentation; keep only colour "
     "transforms (augment.transforms) or disable it (augment.ada=false augment.p=0)"),
    ("adaptive_avg_pool2d_backward", "the StyleGAN2 projector's LPIPS downscaling (images "
     "larger than its lpips_size)"),
)


class NondeterministicOpError(GenAdError):
    """Deterministic mode is on and an operation has only a non-deterministic kernel here."""


def requested_by_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``GEN_AD_DETERMINISTIC`` asks for deterministic mode (``1``/``true``/``yes``/
    ``on``; ``0``/``false``/``no``/``off`` or unset: no; case-insensitive).

    Raises:
        ConfigError: another value (named with the variable).
    """
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"environment variable {ENV_VAR}={raw!r}: use 1 (deterministic mode on) "
                      "or 0 (off)")


def enable_deterministic() -> None:
    """Turn deterministic mode on for this process (see the module text); call it before any
    CUDA work. Idempotent."""
    import torch

    _set_cublas_workspace()
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _set_cublas_workspace() -> None:
    """``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when absent; warn when it holds another value, or when
    it is set now but CUDA already started (cuBLAS may have read the old value)."""
    import torch

    value = os.environ.get(CUBLAS_VAR)
    if value is not None and value.strip() in CUBLAS_DETERMINISTIC:
        return
    if value is not None:
        warnings.warn(f"deterministic mode: {CUBLAS_VAR}={value!r} is not one of "
                      f"{' or '.join(CUBLAS_DETERMINISTIC)}: cuBLAS matmuls on CUDA will raise; "
                      f"set {CUBLAS_VAR}={CUBLAS_DETERMINISTIC[0]} (or unset it) before starting",
                      stacklevel=3)
        return
    os.environ[CUBLAS_VAR] = CUBLAS_DETERMINISTIC[0]
    if torch.cuda.is_initialized():
        warnings.warn(f"deterministic mode: CUDA was initialised before {CUBLAS_VAR} was set; "
                      "cuBLAS may already use a non-deterministic workspace: turn the mode on "
                      f"before any CUDA work, or export {CUBLAS_VAR}={CUBLAS_DETERMINISTIC[0]} "
                      "before starting", stacklevel=3)


def deterministic_state() -> dict[str, Any]:
    """The settings that decide whether this process's CUDA numbers repeat, for provenance:
    ``enabled`` (deterministic algorithms), ``warn_only``, ``cudnn_deterministic``,
    ``cudnn_benchmark``, ``cublas_workspace_config`` (``None``: unset), ``matmul_precision``
    (``highest`` = no TF32 for float32 matmuls) and ``cudnn_conv_tf32`` (``None``: unknown).
    Reads flags only (does not initialise CUDA)."""
    import torch

    return {
        "enabled": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get(CUBLAS_VAR),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_conv_tf32": _cudnn_conv_tf32(),
    }


def _cudnn_conv_tf32() -> bool | None:
    """Whether cuDNN convolutions may use TF32 (the new ``fp32_precision`` API when torch has
    it: reading the legacy flag raises after a mix of both APIs)."""
    import torch

    try:
        conv = getattr(torch.backends.cudnn, "conv", None)
        precision = getattr(conv, "fp32_precision", None)
        if isinstance(precision, str) and precision != "none":
            return precision == "tf32"
        return bool(torch.backends.cudnn.allow_tf32)
    except (RuntimeError, AttributeError):
        return None


def translate(error: BaseException, switch: str | None = None) -> NondeterministicOpError | None:
    """torch's error for an operation without a deterministic kernel under deterministic mode, as
    a :class:`NondeterministicOpError` naming the operation, what in gen_ad uses it (when
    known) and ``switch`` (what turned the mode on); ``None`` for any other error."""
    text = str(error)
    found = _OP_RE.search(text)
    if found is not None:
        op = found.group(1)
    elif _CUBLAS_RE.search(text):
        op = f"a cuBLAS matmul ({CUBLAS_VAR} is not {' or '.join(CUBLAS_DETERMINISTIC)})"
    else:
        return None
    uses = [use for name, use in _KNOWN_USES if name in op]
    used_by = f" (used by {uses[0]})" if uses else ""
    how = switch or f"train.deterministic=true or {ENV_VAR}=1"
    return NondeterministicOpError(
        f"deterministic mode is on ({how}) and {op}{used_by} has no deterministic "
        f"implementation on this device: avoid it, or turn deterministic mode off "
        f"(train.deterministic=false, {ENV_VAR} unset or 0) to run non-deterministically")


@contextmanager
def nondeterministic_errors(switch: str | None = None) -> Iterator[None]:
    """Re-raise torch's 'no deterministic implementation' errors in the block as
    :class:`NondeterministicOpError` (see :func:`translate`); other errors pass unchanged."""
    try:
        yield
    except RuntimeError as e:
        translated = translate(e, switch)
        if translated is None:
            raise
        raise translated from e


@contextmanager
def deterministic_mode(enabled: bool = True, switch: str | None = None) -> Iterator[None]:
    """Deterministic mode for the block when ``enabled`` (the previous torch flags come back
    after it; ``CUBLAS_WORKSPACE_CONFIG`` stays set, cuBLAS having read it); ``enabled=False``
    leaves the flags as they are. Either way torch's errors for operations without a
    deterministic kernel become :class:`NondeterministicOpError` naming ``switch``."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        enable_deterministic()
    try:
        with nondeterministic_errors(switch):
            yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


@contextmanager
def deterministic_from_environment() -> Iterator[None]:
    """For a command's whole run: deterministic mode when ``GEN_AD_DETERMINISTIC`` asks for it
    (torch is imported only then), else nothing.

    Raises:
        ConfigError: ``GEN_AD_DETERMINISTIC`` holds a value that is neither on nor off.
    """
    if not requested_by_environment():
        yield
        return
    with deterministic_mode(True, switch=f"{ENV_VAR}=1"):
        yield
