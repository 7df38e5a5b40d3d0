"""Run native code that may crash in a child process, so that a crash is one failed test and not a dead suite.

``run_isolated(fn, *args)`` forks a child from a server process that has imported torch and the engine and
run nothing (``multiprocessing``'s forkserver: no OpenMP pool exists yet, so the fork is safe and costs
milliseconds), runs ``fn(*args)`` there and returns its result. A child killed by a signal, or still running
after ``timeout`` seconds, raises :class:`Crashed` with the signal's name and the tail of the child's stderr;
an exception in the child is re-raised here as an ``AssertionError`` carrying its traceback.
``start_isolated`` starts such a child and hands back the process, for tests that kill it themselves. ``fn``
must be a module-level function of an importable module (tests/*.py are, as ``tests.<module>``).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any


class Crashed(AssertionError):
    """The child died from a signal (``signal_name``, e.g. SIGSEGV) or hung (``signal_name`` = 'timeout')."""

    def __init__(self, what: str, signal_name: str, stderr: str) -> None:
        super().__init__(f"{what} crashed in its child process: {signal_name}\n--- child's stderr (tail) ---\n{stderr}")
        self.signal_name = signal_name


@cache
def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    # loaded once in the server, not in every child: the main script, torch, the engine, the conv sweep
    context.set_forkserver_preload(["__main__", "torch", "gali.engine.cli", "tests.conv_sweep"])
    return context


def _child(connection: Any, stderr_path: str, fn: Callable[..., Any], args: tuple) -> None:
    with open(stderr_path, "w") as stderr:
        os.dup2(stderr.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    faulthandler.enable()
    try:
        connection.send(("ok", fn(*args)))
    except BaseException:
        connection.send(("error", traceback.format_exc()))


def _receive(connection: Any) -> tuple[str, Any] | None:
    try:
        return connection.recv()
    except EOFError:  # the child died before it sent anything
        return None


def start_isolated(fn: Callable[..., Any], *args: Any) -> multiprocessing.Process:
    """``fn(*args)`` started in a forked child, for a caller that waits on it or kills it itself."""
    child = _context().Process(target=fn, args=args, daemon=True)
    child.start()
    return child


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """``fn(*args)`` run in a forked child; its result, or :class:`Crashed` if the child died or hung."""
    what = f"{fn.__module__}.{fn.__qualname__}{args!r}"
    receive, send = _context().Pipe(duplex=False)
    with tempfile.TemporaryDirectory() as folder:
        stderr_path = str(Path(folder) / "stderr")
        child = start_isolated(_child, send, stderr_path, fn, args)
        send.close()
        hung = not receive.poll(timeout)
        message = None if hung else _receive(receive)
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
        stderr = Path(stderr_path).read_text(errors="replace")[-4000:] if Path(stderr_path).exists() else ""
    if message is None:
        code = child.exitcode
        name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
        raise Crashed(what, f"timeout after {timeout:g} s" if hung else name, stderr)
    status, value = message
    if status == "error":
        raise AssertionError(f"{what} failed in its child process:\n{value}")
    return value
