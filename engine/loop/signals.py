"""Stopping a run on a signal or a time limit: a checkpoint at the next step boundary, then a documented exit code.

SIGTERM (a scheduler's or torchrun's shutdown), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal=USR1@120``) only set a
flag, as does ``run.max_time`` running out (:meth:`StopFlag.out_of_time`). At a step boundary (every
``run.stop_check_steps`` steps; the next one in a world of one) the ranks agree on it
(:meth:`gali.engine.loop.distributed.World.any`), the loop writes a checkpoint, requeues a SLURM job
(:func:`requeue_job`) and raises :class:`RunStopped`. A second signal while stopping exits at once; checkpoints are
written atomically, so the last complete one is untouched.
Exit codes of ``gali train``: 0 done; :data:`EXIT_STOPPED` (75, BSD's EX_TEMPFAIL: "try again") stopped after a
checkpoint, resume with ``gali train --resume RUN_DIR``; 2 refused (bad config, data or checkpoint: the message
says what to change); 1 a crash; 128 + N killed by a second signal N.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from gali.engine.errors import ConfigError, GaliError

EXIT_STOPPED = 75
SLURM_END_MARGIN_S = 300.0  # run.max_time=auto stops this long before the SLURM job's end
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
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
    """Set by the first stop signal (its name in :attr:`signal_name`); a second one exits the process.

    ``deadline`` (a ``time.time()``, from :func:`run_deadline`) sets it too, through :meth:`out_of_time`.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.deadline: float | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def out_of_time(self, next_seconds: float) -> bool:
        """Whether the next ``next_seconds`` of work would pass the deadline; if so the flag is set, named for it."""
        if self.deadline is not None and not self.requested and time.time() + next_seconds >= self.deadline:
            self.signal_name = "the time limit run.max_time"
        return self.requested

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


def parse_duration(text: str, *, key: str) -> float:
    """Seconds in a duration such as '23h30m', '90s', '1.5h' or '1d'; a ConfigError naming ``key`` otherwise."""
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text.strip():
        raise ConfigError(key, f"got {text!r}; give a duration such as '23h30m', '90s' or '1d', or 'auto' or ''")
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


def run_deadline(max_time: str, start: float) -> float | None:
    """The ``time.time()`` by which a run started at ``start`` must have stopped (``run.max_time``), or None."""
    if max_time == "auto":
        end = os.environ.get("SLURM_JOB_END_TIME")
        return float(end) - SLURM_END_MARGIN_S if end else None
    return start + parse_duration(max_time, key="run.max_time") if max_time else None


def requeue_job(mode: str, log: Callable[[str], None]) -> None:
    """After a stop: requeue the SLURM job (``scontrol requeue``, as PyTorch Lightning does) per ``run.requeue``."""
    job = os.environ.get("SLURM_JOB_ID")
    if mode == "off" or (mode == "auto" and not job):
        return
    if not job or shutil.which("scontrol") is None:
        log(f"warning: run.requeue={mode} but {'SLURM_JOB_ID is not set' if not job else 'scontrol is not on PATH'}")
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if done.returncode:
        log(f"warning: scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    else:
        log(f"requeued SLURM job {job}: it starts again with the same command line")
