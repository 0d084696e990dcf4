"""What runs around every ``gen-ad`` command: one-line warnings and errors, exit statuses, and
SIGTERM handled like Ctrl-C (cleanup runs). :mod:`gen_ad.cli` parses; this guards the run.

Exit statuses: 0 ok, 2 a user error (one ``gen-ad: error: ...`` line), 130 an interrupt, 143
SIGTERM, 1 anything else (one ``internal error`` line; ``--debug`` shows tracebacks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator

from gen_ad.errors import ConfigError, GenAdError

__all__ = ["Terminated", "cli_warnings", "guarded", "print_error", "process_rank",
           "sigterm_as_exception"]


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's ``scancel``, ``kill``, a container stop) raised as an exception in
    the main thread, so that what a Ctrl-C cleans up (temporaries, worker pools, partly written
    folders) is cleaned up too, instead of the process vanishing mid-write."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in this process's main thread (the
    training loop installs its own handler, which checkpoints first). A forked child that
    inherited the handler (a worker) dies of the signal as it would have without it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def cli_warnings(debug: bool = False) -> Iterator[None]:
    """Show warnings as one line ``gen-ad: warning: <message>``, each distinct message once,
    while a command runs; the previous ``warnings.formatwarning`` comes back after, and
    ``debug`` keeps Python's full format (file, line and source line)."""
    if debug:
        yield
        return
    previous = warnings.formatwarning
    warnings.formatwarning = _once_per_message()
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _once_per_message() -> Callable[..., str]:
    """A ``warnings.formatwarning`` giving ``gen-ad: warning: <message>``, then ``""`` (nothing
    is written) for a message it has formatted before. Under a multi-process launch only the
    main process writes warnings: the others meet the same config and data and would repeat
    each one per process (``--debug`` shows every process's)."""
    seen: set[str] = set()
    quiet = process_rank() > 0

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int,
            line: str | None = None) -> str:
        text = str(message)
        if quiet or text in seen:
            return ""
        seen.add(text)
        return f"gen-ad: warning: {text}\n"

    return fmt


def process_rank() -> int:
    """This process's rank under ``accelerate launch`` / ``torchrun`` (``RANK``), else 0."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def print_error(e: GenAdError) -> None:
    """One ``gen-ad: error:`` line; under a multi-process launch the other processes stay
    quiet about errors every process meets alike (a config error, or one handed on by the main
    process), and name themselves otherwise."""
    rank = process_rank()
    if rank and (isinstance(e, ConfigError) or getattr(e, "from_main_process", False)):
        return
    where = f" (process {rank})" if rank else ""
    print(f"gen-ad: error{where}: {e}", file=sys.stderr)


def guarded(run: Callable[[], int | None], debug: bool) -> int:
    """Run a command with one-line warnings; user errors print one line and give 2,
    an interrupt 130 (SIGTERM: 143), anything else one ``internal error`` line and 1
    (``debug``: tracebacks)."""
    try:
        from gen_ad.utils.determinism import deterministic_from_environment

        with cli_warnings(debug=debug), sigterm_as_exception(), deterministic_from_environment():
            rc = run()
        return int(rc or 0)
    except GenAdError as e:
        if debug:
            traceback.print_exc()
        print_error(e)
        return 2
    except Terminated:
        print("gen-ad: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("gen-ad: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: no bare traceback for users
        if debug:
            raise
        print(f"gen-ad: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
