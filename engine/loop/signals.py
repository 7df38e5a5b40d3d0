"""Stopping a run on a signal: a checkpoint at the next step boundary, then a documented exit code.

SIGTERM (a scheduler's or torchrun's shutdown), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal=USR1@120``) only set a
flag. At the next step boundary the ranks agree on it (:meth:`gali.engine.loop.distributed.World.any`), the loop writes
a checkpoint and raises :class:`RunStopped`. A second signal while stopping exits at once; checkpoints are written
atomically, so the last complete one is untouched.
Exit codes of ``gali train``: 0 done; :data:`EXIT_STOPPED` (75, BSD's EX_TEMPFAIL: "try again") stopped by a signal
after a checkpoint, resume with ``gali train --resume RUN_DIR``; 2 refused (bad config, data or checkpoint: the message
says what to change); 1 a crash; 128 + N killed by a second signal N.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from gali.engine.errors import GaliError

EXIT_STOPPED = 75
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class RunStopped(GaliError):
    """The run stopped on a signal after writing a checkpoint; ``gali`` exits with :data:`EXIT_STOPPED`."""

    exit_code = EXIT_STOPPED

    @classmethod
    def after(cls, flag: StopFlag, images_seen: int, run_dir: Path) -> RunStopped:
        """The error for a run stopped by ``flag``'s signal (or another rank's) at ``images_seen``."""
        return cls(
            f"stopped by {flag.signal_name or 'a signal on another rank'} at {images_seen / 1000:g} kimg "
            f"after writing a checkpoint; go on with: gali train --resume {run_dir}"
        )


class StopFlag:
    """Set by the first stop signal (its name in :attr:`signal_name`); a second one exits the process."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            os._exit(128 + signum)  # at once: the last complete checkpoint was written atomically
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Inside: the stop signals set the returned flag instead of ending the process; as before after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
