"""The library and trainers use only signals Windows has (SIGINT, SIGTERM, ...): the stop
handling of the training loop and its data workers must not fail there with AttributeError
(Windows has no SIGHUP, SIGUSR1, SIGKILL, SIGALRM, nor ``signal.alarm``/``setitimer``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WINDOWS_SIGNAL_NAMES = {  # what Python's signal module offers on Windows
    "SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM", "SIGBREAK", "SIG_DFL",
    "SIG_IGN", "CTRL_C_EVENT", "CTRL_BREAK_EVENT", "NSIG", "signal", "getsignal",
    "default_int_handler", "raise_signal", "strsignal", "valid_signals", "set_wakeup_fd",
    "Signals", "Handlers",
}


def test_only_signals_windows_has() -> None:
    found = []
    for d in ("gen_ad", "train"):
        for p in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(p.read_text(encoding="utf-8"))
            for n in ast.walk(tree):
                if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                        and n.value.id == "signal" and n.attr not in WINDOWS_SIGNAL_NAMES):
                    found.append(f"{p.relative_to(ROOT)}:{n.lineno}: signal.{n.attr}")
    assert not found, "not on Windows:\n" + "\n".join(found)


def test_the_loops_stop_handling_uses_only_sigint_and_sigterm() -> None:
    import inspect

    from gen_ad.training import loop
    from gen_ad.utils import workers

    src = inspect.getsource(loop._signal_guard) + inspect.getsource(workers.ignore_stop_signals)
    names = {n.attr for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "signal"}
    assert names <= {"SIGINT", "SIGTERM", "SIG_IGN", "signal", "getsignal"}, names
