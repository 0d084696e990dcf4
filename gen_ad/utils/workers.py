"""Data-loader workers leave stop signals to the main process.

A job scheduler (``scancel``, ``kill -TERM -<pgid>``, a container stop) and Ctrl-C signal the
whole process group. A worker that died of the signal made PyTorch's SIGCHLD check raise inside
the main process's clean-up ("DataLoader worker ... is killed by signal", printed as an ignored
exception after the command's one line). Workers ignore SIGINT/SIGTERM instead: the main process
stops (a training run checkpoints first) and shuts its workers down as after any loop; a worker
whose main process is gone exits on its own (PyTorch's parent watchdog). A batch the main process
was receiving when it stopped breaks the worker's file-descriptor hand-over
(``multiprocessing.resource_sharer``, which reports through ``sys.excepthook``); that
connection error is dropped in workers, any other error still reported.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import TracebackType

__all__ = ["ignore_stop_signals", "init_worker", "worker_init"]


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: SIGINT and SIGTERM are ignored in the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _drop_connection_errors(kind: type[BaseException], value: BaseException,
                            tb: TracebackType | None) -> None:
    """A worker's ``sys.excepthook``: a connection the stopped main process broke is not news."""
    if not issubclass(kind, ConnectionError):
        sys.__excepthook__(kind, value, tb)


def init_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: stop signals ignored, broken hand-overs not printed."""
    ignore_stop_signals(worker_id)
    sys.excepthook = _drop_connection_errors


def worker_init(num_workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` for a DataLoader with ``num_workers`` workers (None for none)."""
    return init_worker if num_workers > 0 else None
