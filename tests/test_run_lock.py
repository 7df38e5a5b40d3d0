"""One writer per run folder (issue 21, findings 3 and 10): the kernel lock, the lease, and run-folder numbering.

Rivals are real processes where the kernel lock is part of what is tested; lease records of other hosts and of
reused PIDs are written by hand, as such a process would have left them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from gali.engine.errors import GaliError
from gali.engine.loop import run_lock
from gali.engine.loop.run_lock import LEASE_NAME, acquire_run_folder
from gali.engine.loop.runtime import create_run_dir

# Acquires the folder argv[1], forks a sleeping child with argv[2] == "fork" (and waits until the child runs: its
# fork handlers have run then), says "ready <child pid>", and releases on a line from stdin.
_HOLDER = """
import os, sys, time
from pathlib import Path
from gali.engine.loop.run_lock import acquire_run_folder

lock = acquire_run_folder(Path(sys.argv[1]), log=print)
child = 0
if sys.argv[2] == "fork":
    running, started = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(started, b"x")
        time.sleep(30)
        os._exit(0)
    os.read(running, 1)
print("ready", child, flush=True)
sys.stdin.readline()
lock.release()
"""


@contextmanager
def holder_process(run_dir: Path, fork: bool = False) -> Iterator[tuple[subprocess.Popen, int]]:
    """Another process that holds ``run_dir`` (and, with ``fork``, the PID of a child it forked)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir), "fork" if fork else "plain"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        ready, child_pid = process.stdout.readline().split()
        assert ready == "ready"
        child = int(child_pid)
        yield process, child
    finally:
        if child:
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.kill()
        process.wait()


def lease_record(run_dir: Path, **changes: object) -> dict:
    """A lease as this process writes it (taken and released here), with ``changes``."""
    with acquire_run_folder(run_dir, log=print) as lock:
        record = json.loads(lock.lease_path.read_text())
    return record | changes


def write_lease(run_dir: Path, record: dict) -> None:
    (run_dir / LEASE_NAME).write_text(json.dumps(record) + "\n")


def test_a_second_process_is_refused_with_the_holders_host_and_pid(tmp_path: Path) -> None:
    with holder_process(tmp_path) as (holder, _):
        with pytest.raises(GaliError) as refused:
            acquire_run_folder(tmp_path, log=print)
        message = str(refused.value)
        assert f"host {socket.gethostname()}, PID {holder.pid}" in message
        assert str(tmp_path / LEASE_NAME) in message
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / LEASE_NAME).exists()
    acquire_run_folder(tmp_path, log=print).release()


def test_the_lease_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    with holder_process(tmp_path) as (holder, _):
        holder.kill()
        holder.wait()
        assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == holder.pid
        with acquire_run_folder(tmp_path, log=print) as lock:
            assert json.loads(lock.lease_path.read_text())["pid"] == os.getpid()


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path: Path) -> None:
    with holder_process(tmp_path, fork=True) as (holder, child):
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child lives on, with the lock file's descriptor of its parent
        with acquire_run_folder(tmp_path, log=print) as lock:
            lock.check()


def test_a_live_pid_with_another_start_time_is_stale_and_the_same_start_time_is_not(tmp_path: Path) -> None:
    record = lease_record(tmp_path)
    write_lease(tmp_path, record)  # this very process, with the kernel lock free: the lease alone refuses
    with pytest.raises(GaliError, match=f"PID {os.getpid()}"):
        acquire_run_folder(tmp_path, log=print)
    write_lease(tmp_path, record | {"start_time": record["start_time"] + 1, "token": "reused"})
    acquire_run_folder(tmp_path, log=print).release()


def test_another_hosts_lease_refuses_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    other = lease_record(tmp_path, host="node-b17", pid=4242, slurm_job_id="987654", token="other")
    write_lease(tmp_path, other | {"heartbeat": time.time() - 10})
    with pytest.raises(GaliError) as refused:
        acquire_run_folder(tmp_path, log=print)
    assert "host node-b17, PID 4242, SLURM job 987654" in str(refused.value)
    write_lease(tmp_path, other | {"heartbeat": time.time() - run_lock.STALE_AFTER_S - 1})
    acquire_run_folder(tmp_path, log=print).release()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK], ids=["ENOSYS", "ENOLCK"])
def test_an_unsupported_kernel_lock_warns_and_the_lease_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def unsupported(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_lock.fcntl, "flock", unsupported)
    logged: list[str] = []
    with acquire_run_folder(tmp_path, log=logged.append):
        assert len(logged) == 1
        assert logged[0].startswith(f"warning: {tmp_path / run_lock.LOCK_NAME}")
        assert errno.errorcode[code] in logged[0]
        with pytest.raises(GaliError, match=f"PID {os.getpid()}"):
            acquire_run_folder(tmp_path, log=logged.append)
    acquire_run_folder(tmp_path, log=logged.append).release()


def test_check_raises_once_another_process_took_the_lease_over(tmp_path: Path) -> None:
    lock = acquire_run_folder(tmp_path, log=print)
    lock.check()
    other = json.loads(lock.lease_path.read_text()) | {"host": "node-c3", "pid": 777, "token": "other"}
    write_lease(tmp_path, other)
    with pytest.raises(GaliError, match=r"no longer this run's.*host node-c3, PID 777"):
        lock.check()
    lock.release()
    assert json.loads(lock.lease_path.read_text())["token"] == "other"  # release leaves the new holder's lease


def test_the_heartbeat_renews_the_lease_and_check_raises_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with acquire_run_folder(tmp_path, log=print) as lock:
        first = json.loads(lock.lease_path.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock.lease_path.read_text())["heartbeat"] > first

        def disk_full(path: Path, holder: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(run_lock, "_replace_lease", disk_full)
        monkeypatch.setattr(run_lock, "STALE_AFTER_S", 0.4)
        time.sleep(0.5)
        with pytest.raises(GaliError, match=r"last renewed .*No space left"):
            lock.check()


def test_a_missing_run_folder_is_a_message(tmp_path: Path) -> None:
    with pytest.raises(GaliError, match=re.escape(f"{tmp_path / 'absent' / run_lock.LOCK_NAME}: No such file")):
        acquire_run_folder(tmp_path / "absent", log=print)


def test_simultaneous_starts_each_get_their_own_run_folder(tmp_path: Path) -> None:
    starts = 200
    barrier = threading.Barrier(starts)
    made: list[Path] = []
    failed: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            made.append(create_run_dir(tmp_path, "svhn32.toml"))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(starts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed, f"{len(failed)} of {starts} failed, first: {failed[0]!r}"
    assert sorted(p.name for p in made) == [f"{n:05d}-svhn32" for n in range(starts)]
