"""One writer per run folder (DESIGN.md principle 11): a kernel lock plus a lease record, held by rank 0.

:func:`acquire_run_folder` takes ``flock`` on ``<run>/run.lock`` (opened read-write, as NFSv4 requires) and
claims ``<run>/run.lease``: a JSON record of the holder (host, PID namespace, PID, process start time, SLURM job
id, heartbeat time, a random token) that a daemon thread rewrites every ``HEARTBEAT_S`` seconds. A lock the file
system does not support (ENOSYS: Lustre ``noflock``; ENOLCK: NFS without lockd) is a warning through ``log``, and
the lease alone decides; where flock excludes one node only (GPFS, BeeGFS, Lustre ``localflock``, NFS ``nolock``,
FUSE), the lease decides between nodes. A lease of this host is stale at once when its PID is gone or runs
another process (another start time); one of another host once its heartbeat is ``STALE_AFTER_S`` old. Any
other holder is refused with a GaliError that names it, and a lock never ends in a traceback.
:meth:`RunFolderLock.check` before each checkpoint or log write raises once the lease is no longer this
process's; :meth:`RunFolderLock.release` (or leaving its ``with`` block) ends the hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from gali.engine.errors import GaliError

LOCK_NAME = "run.lock"
LEASE_NAME = "run.lease"
HEARTBEAT_S = 5.0  # the holder rewrites its lease this often
STALE_AFTER_S = 300.0  # a lease of another host whose heartbeat stood still this long is stale
TAKEOVER_SETTLE_S = 1.0  # after replacing a stale lease, wait this long and read it back: did a rival replace it too?
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}  # held by another process; any other errno: unsupported


@dataclasses.dataclass(frozen=True)
class Holder:
    """A lease record: who holds the run folder, and when it last said so (``heartbeat``, Unix time)."""

    host: str
    pid_namespace: int | None
    pid: int
    start_time: int | None
    slurm_job_id: str | None
    heartbeat: float
    token: str

    def describe(self) -> str:
        """'host H, PID P, SLURM job J' for messages."""
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, PID {self.pid}{job}"

    def on_this_host(self) -> bool:
        """Whether this process can see the holder's PID: same host and PID namespace (containers differ)."""
        return (self.host, self.pid_namespace) == (socket.gethostname(), _pid_namespace())

    def is_stale(self, now: float) -> bool:
        """This host's holder: its PID is gone or is another process; another host's: no heartbeat for minutes."""
        if not self.on_this_host():
            return now - self.heartbeat >= STALE_AFTER_S
        alive, start_time = _process(self.pid)
        return not alive or (None not in (start_time, self.start_time) and start_time != self.start_time)


class RunFolderLock:
    """Rank 0's hold on a run folder: the kernel lock's descriptor, the lease and the thread that renews it."""

    def __init__(self, run_dir: Path, fd: int | None, me: Holder) -> None:
        self.run_dir = run_dir
        self.lease_path = run_dir / LEASE_NAME
        self._fd = fd
        self._me = me
        self._released = False
        self._refreshed = time.monotonic()
        self._error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gali-run-lease", daemon=True)
        _HELD.add(self)
        self._thread.start()

    def check(self) -> None:
        """Raise GaliError unless the lease is still this process's and its heartbeat runs (one small read)."""
        try:
            holder = _read_lease(self.lease_path)
        except ValueError:
            holder = None
        except OSError:  # unreadable for now (a network file system's hiccup): the heartbeat's age decides below
            holder = self._me
        if holder is None or holder.token != self._me.token:
            now = f"names {holder.describe()}" if holder else "is gone or holds no whole record"
            raise GaliError(
                f"run folder {self.run_dir} is no longer this run's: its lease {self.lease_path} {now} (another run "
                "took it over, or it was deleted). This run stops here so that two runs never write one folder; "
                "its checkpoints so far are whole. Resume it once the other run has ended."
            )
        silent = time.monotonic() - self._refreshed
        if not self._thread.is_alive() or silent > STALE_AFTER_S / 2:
            why = f" ({self._error})" if self._error else ""
            raise GaliError(
                f"run folder {self.run_dir}: the lease {self.lease_path} was last renewed {silent:.0f} s ago{why}, "
                f"so another run may take the folder over after {STALE_AFTER_S:.0f} s; this run stops here. "
                "Check that the folder is writable and its disk has space, then resume."
            )

    def release(self) -> None:
        """Stop the heartbeat, remove the lease if it is still ours, release the kernel lock (idempotent)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        _HELD.discard(self)
        with contextlib.suppress(OSError, ValueError):
            if (holder := _read_lease(self.lease_path)) and holder.token == self._me.token:
                self.lease_path.unlink()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        """Rewrite the lease every HEARTBEAT_S; stop for good once it names another holder or is gone."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = _read_lease(self.lease_path)
                if holder is None or holder.token != self._me.token:
                    return
                self._me = dataclasses.replace(self._me, heartbeat=time.time())
                _replace_lease(self.lease_path, self._me)
                self._refreshed = time.monotonic()
            except ValueError:
                return
            except OSError as exc:  # a full disk, a network hiccup: check() reports it once the lease grows old
                self._error = exc

    def _forget(self) -> None:
        """In a forked child: close the descriptor without unlocking, so the lock still ends with rank 0."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._released = True


_HELD: weakref.WeakSet[RunFolderLock] = weakref.WeakSet()


def _forget_held_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: drop it there, never unlock it."""
    for lock in list(_HELD):
        lock._forget()
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held_locks_in_child)


def acquire_run_folder(run_dir: Path, *, log: Callable[[str], None]) -> RunFolderLock:
    """Make this process the run folder's one writer, or raise GaliError naming the current one.

    Call on rank 0 once the folder exists and before anything is written there; keep the result for the run's
    life (``with`` or ``release()``).
    """
    run_dir = Path(run_dir)
    fd = _kernel_lock(run_dir, log)
    try:
        me = Holder(
            host=socket.gethostname(),
            pid_namespace=_pid_namespace(),
            pid=os.getpid(),
            start_time=_process(os.getpid())[1],
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            heartbeat=time.time(),
            token=secrets.token_hex(16),
        )
        _claim_lease(run_dir, me)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return RunFolderLock(run_dir, fd, me)


def _kernel_lock(run_dir: Path, log: Callable[[str], None]) -> int | None:
    """The descriptor of run.lock, locked with flock; None where the file system answers with an error."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise GaliError(
            f"cannot open the run folder's lock file {path}: {exc.strerror}; "
            "the run folder must exist and be writable by this user"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            try:
                holder = _read_lease(run_dir / LEASE_NAME)
            except (OSError, ValueError):
                holder = None
            if holder is not None and holder.is_stale(time.time()):
                raise GaliError(
                    f"run folder {run_dir}: its lock {path} is still held, though the run in its lease "
                    f"({holder.describe()}) is gone: a process that run started still runs; end it (`fuser {path}` "
                    "on that host names it), then start again"
                ) from None
            raise _in_use(run_dir, holder) from None
        log(
            f"warning: {path}: this file system does not support file locks ({errno.errorcode.get(exc.errno, '?')}: "
            f"{exc.strerror}); the lease {run_dir / LEASE_NAME} alone keeps a second run out of {run_dir}"
        )
        return None
    return fd


def _claim_lease(run_dir: Path, me: Holder) -> None:
    """Write ``me`` as the lease: created where there is none, replaced where it is stale; else refuse."""
    lease = run_dir / LEASE_NAME
    try:
        try:
            _create_lease(lease, me)
            return
        except FileExistsError:
            pass
        holder = _read_rival(run_dir)
        if holder is not None and not holder.is_stale(time.time()):
            raise _in_use(run_dir, holder)
        _replace_lease(lease, me)
        time.sleep(TAKEOVER_SETTLE_S)  # two contenders that both judged it stale: the last write wins
        winner = _read_lease(lease)
    except (OSError, ValueError) as exc:
        raise GaliError(
            f"cannot read or write the run folder's lease {lease}: {exc}; "
            "the run folder must be writable by this user and its disk must have space"
        ) from None
    if winner is None or winner.token != me.token:
        raise _in_use(run_dir, winner)


def _read_rival(run_dir: Path) -> Holder | None:
    """The lease's holder; None where there is none to respect (gone, or unreadable for STALE_AFTER_S)."""
    lease = run_dir / LEASE_NAME
    try:
        return _read_lease(lease)
    except ValueError:
        with contextlib.suppress(FileNotFoundError):
            age = time.time() - lease.stat().st_mtime
            if age < STALE_AFTER_S:
                raise GaliError(
                    f"run folder {run_dir}: its lease {lease} holds no whole record, written {age:.0f} s ago (by a "
                    "run starting just now, or damaged); start again in a few seconds, or, if no other run uses "
                    "this folder, delete that file"
                ) from None
    return None


def _in_use(run_dir: Path, holder: Holder | None) -> GaliError:
    """The refusal: who holds the folder, and what to do."""
    lease = run_dir / LEASE_NAME
    if holder is None:
        return GaliError(
            f"run folder {run_dir} is in use: another process holds its lock {run_dir / LOCK_NAME} and has not "
            "written its lease yet; wait until that run ends, then start again"
        )
    age = max(time.time() - holder.heartbeat, 0.0)
    stale = (
        "once that process is gone"
        if holder.on_this_host()
        else f"{STALE_AFTER_S / 60:.0f} min after its last heartbeat"
    )
    return GaliError(
        f"run folder {run_dir} is in use by another run ({holder.describe()}; last heartbeat {age:.0f} s ago): "
        f"two runs must not write one folder. Wait until that run ends (its lease goes stale by itself {stale}), "
        f"or, if you are sure it is gone, delete {lease} and start again"
    )


def _read_lease(path: Path) -> Holder | None:
    """The record in ``path``; None where there is none; ValueError where it is not a whole record."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        holder = Holder(
            host=str(data["host"]),
            pid_namespace=None if data["pid_namespace"] is None else int(data["pid_namespace"]),
            pid=int(data["pid"]),
            start_time=None if data["start_time"] is None else int(data["start_time"]),
            slurm_job_id=None if data["slurm_job_id"] is None else str(data["slurm_job_id"]),
            heartbeat=float(data["heartbeat"]),
            token=str(data["token"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a lease record ({exc})") from None
    if not 0 < holder.pid < 2**31 or not math.isfinite(holder.heartbeat):  # os.kill takes 0 and -1 for groups
        raise ValueError(f"{path}: PID {holder.pid} or heartbeat {holder.heartbeat} out of range")
    return holder


def _create_lease(path: Path, holder: Holder) -> None:
    """Create the lease, failing with FileExistsError where one exists (O_EXCL: one of two creators wins)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_encode(holder))
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()  # ours, half-written: it would hold the folder for STALE_AFTER_S
        raise


def _replace_lease(path: Path, holder: Holder) -> None:
    """Replace the lease in one rename, so a reader sees the old record or the new one, never a part.

    Not files.atomic_write: its one temporary name would let a rival's takeover and the holder's heartbeat
    write the same file, and a lease needs no fsync (it means nothing after a power cut).
    """
    tmp = path.with_name(f"{path.name}.{holder.token}.tmp")
    try:
        tmp.write_text(_encode(holder), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _encode(holder: Holder) -> str:
    return json.dumps(dataclasses.asdict(holder), indent=1) + "\n"


def _pid_namespace() -> int | None:
    """This process's PID namespace (its inode), None where /proc does not show it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process(pid: int) -> tuple[bool, int | None]:
    """Whether ``pid`` runs here (a zombie does not), and its start time (/proc/<pid>/stat field 22) if shown."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # another user's process: alive
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()  # the name may hold ') '
        return fields[0] not in (b"Z", b"X"), int(fields[19])
    except (OSError, IndexError, ValueError):  # not Linux, or hidden (hidepid)
        return True, None
