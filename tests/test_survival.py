"""Runs that survive: stop signals, SIGKILL mid-write, non-finite steps, a full disk, bounded checkpoints."""

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from gali.engine.cli import main
from gali.engine.errors import ConfigError, GaliError
from gali.engine.loop import checkpoint as checkpoint_module
from gali.engine.loop.checkpoint import load_checkpoint, prune_checkpoints
from gali.engine.loop.config import load_config
from gali.engine.loop.signals import EXIT_STOPPED
from gali.engine.loop.train import resume, train
from gali.engine.step import eager
from gali.engine.step.eager import GaliStep
from tests.isolation import start_isolated

# The digits' 1,437 training images: 44 batches of 32 per epoch; a checkpoint every 20 steps.
TINY = [
    "run.device=cpu",
    "model.width=0.125",
    "model.latent_dim=8",
    "run.batch_size=32",
    "data.workers=0",
    "run.kimg=1.6",
    "run.tick_kimg=0.064",
    "run.snapshot_kimg=0.64",
    "run.grid_size=2",
    "run.tensorboard=off",
    "run.progress=lines",
    "run.identity_images=0",
]  # no identity classifier to fit at each start


def gali(
    *args: str,
    cache: Path,
    cwd: Path,
    ranks: int = 1,
    restarts: int = 0,
    prelude: str = "",
    prefix: Sequence[str] = (),
) -> subprocess.Popen:
    """``gali ARGS`` (under torchrun with ``ranks`` > 1, and ``--max-restarts``) as a child process in a process
    group of its own (a job), one thread per rank.

    ``prelude`` is Python run first in a single-process child (a test's stand-in for a slow disk); ``prefix``
    runs before the command (a wrapper script).
    """
    if prelude:
        launcher = [
            sys.executable,
            "-c",
            prelude + "import sys; from gali.engine.cli import main; sys.exit(main(sys.argv[1:]))",
        ]
    elif ranks == 1:
        launcher = [sys.executable, "-m", "gali"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--max-restarts={restarts}",
            "--standalone",
            "-m",
            "gali",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GALI_CACHE": str(cache)}
    return subprocess.Popen(
        [*prefix, *launcher, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> int:
    """The child's exit code once it ends (its output read meanwhile, so that it never blocks on a full pipe)."""
    _, stderr = process.communicate(timeout=900)
    if process.returncode:
        print(stderr[-3000:])
    return process.returncode


def wait_for_ticks(process: subprocess.Popen, ticks: int) -> list[str]:
    """Read the child's output until ``ticks`` tick lines have been printed."""
    lines = []
    while sum(line.startswith("kimg") for line in lines) < ticks:
        line = process.stdout.readline()
        assert line, f"the run ended early: {process.wait()} {process.stderr.read()[-2000:]}"
        lines.append(line)
    return lines


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(sorted(run_dir.glob("checkpoint-*.pt"))[-1])[1]


def assert_same_state(got: dict, want: dict) -> None:
    assert got["images_seen"] == want["images_seen"]
    for name in ("G", "E", "D"):
        assert all(torch.equal(got[name][k], v) for k, v in want[name].items()), name
    for side in ("opt_d", "opt_ge"):
        for index, state in want[side]["state"].items():
            assert all(torch.equal(got[side]["state"][index][k], v) for k, v in state.items()), f"{side}[{index}]"
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])


# A cluster job's stop: SIGTERM to the whole process group (SLURM at the time limit, scancel, a torchrun agent
# shutting down), data workers included. Three launches: plain, a wrapper script that execs, torchrun with 2 ranks.
LAUNCHES = {"plain": 1, "wrapper": 1, "torchrun": 2}
WORKERS = ["data.workers=2", "data.prefetch=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, dict]:
    """The final state of an uninterrupted run with data workers, by rank count (run once each)."""
    states = {}
    for ranks in sorted(set(LAUNCHES.values())):
        tmp = tmp_path_factory.mktemp(f"uninterrupted-{ranks}")
        run = gali("train", *TINY, *WORKERS, f"run.out_dir={tmp / 'runs'}", cache=tmp / "cache", cwd=tmp, ranks=ranks)
        assert finish(run) == 0
        states[ranks] = final_state(next((tmp / "runs").iterdir()))
    return states


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_sigterm_to_the_process_group_checkpoints_exits_75_and_resumes_to_the_uninterrupted_run(
    launch, uninterrupted, tmp_path
):
    ranks, cache, out = LAUNCHES[launch], tmp_path / "cache", tmp_path / "runs"
    wrapper = tmp_path / "job.sh"
    wrapper.write_text(
        '#!/bin/bash\n# a batch script: exec, so that the job\'s signal reaches gali itself\nexec "$@"\n'
    )
    wrapper.chmod(0o755)
    prefix = [str(wrapper)] if launch == "wrapper" else []
    run = gali("train", *TINY, *WORKERS, f"run.out_dir={out}", cache=cache, cwd=tmp_path, ranks=ranks, prefix=prefix)
    wait_for_ticks(run, 3)
    os.killpg(run.pid, signal.SIGTERM)  # the job: gali, its data workers, torchrun's agent and ranks
    _, stderr = run.communicate(timeout=300)
    # torchrun's agent prints its own traceback (SignalException) and exits 1 whatever its ranks did; each rank
    # stops with 75 and no traceback
    agent_tracebacks = stderr.count("SignalException: Process") if launch == "torchrun" else 0
    assert stderr.count("stopped by SIGTERM at") == ranks, stderr[-4000:]
    assert stderr.count("Traceback") == agent_tracebacks, stderr[-4000:]
    assert run.returncode == (EXIT_STOPPED if launch != "torchrun" else 1)
    run_dir = next(out.iterdir())
    assert len(list(run_dir.glob("checkpoint-*.pt"))) == 1 and not list(run_dir.glob("*.tmp"))
    assert final_state(run_dir)["images_seen"] % 640 != 0  # the stop's own checkpoint, between two snapshots
    resumed = gali("train", "--resume", str(run_dir), *WORKERS, cache=cache, cwd=tmp_path, ranks=ranks)
    assert finish(resumed) == 0
    assert_same_state(final_state(run_dir), uninterrupted[ranks])


@pytest.mark.slow
def test_sigint_stops_the_same_way_without_a_traceback_or_a_temporary_file(tmp_path):
    run = gali("train", *TINY, f"run.out_dir={tmp_path / 'runs'}", cache=tmp_path / "cache", cwd=tmp_path)
    wait_for_ticks(run, 2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 75 and "stopped by SIGINT" in stderr and "Traceback" not in stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert not list(run_dir.glob("*.tmp*")) and list(run_dir.glob("checkpoint-*.pt"))


# A slow disk: every fsync takes 50 ms more, so that many kills land while a file is being written.
SLOW_DISK = "import os, time; sync = os.fsync; os.fsync = lambda fd: (time.sleep(0.05), sync(fd))[1]; "


def wait_for_a_partial_file(run_dir: Path, known_checkpoints: set[str], timeout: float = 60.0) -> None:
    """Wait for a checkpoint not in ``known_checkpoints``, then return as soon as the run is writing a
    file (a ``.tmp`` exists: on the slow disk, for 50 ms or more)."""
    deadline = time.monotonic() + timeout
    while not {p.name for p in run_dir.glob("checkpoint-*.pt")} - known_checkpoints:
        assert time.monotonic() < deadline, f"no new checkpoint in {run_dir} within {timeout} s"
        time.sleep(0.002)
    while not list(run_dir.glob("*.tmp")):
        assert time.monotonic() < deadline, f"no write began in {run_dir} within {timeout} s"
        time.sleep(0.002)


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_lose_no_checkpoint(tmp_path):
    """A checkpoint every step on a slow disk: kills land during atomic writes, snapshots and steps alike.

    Each run is ``gali train`` forked from a server that has imported the engine (tests/isolation.py), so the
    twenty starts skip the interpreter's imports; the SIGKILL is the same.
    """
    cache, out = tmp_path / "cache", tmp_path / "runs"
    # lean snapshots (no averages to recalibrate; TINY fits no identity classifier), so that many kills land in writes
    every_step = [
        *TINY,
        "run.snapshot_kimg=0.032",
        "run.tick_kimg=0.032",
        "run.kimg=2.4",
        "run.keep_checkpoints=0",
        "run.ema_kimg=0",
        f"run.out_dir={out}",
    ]
    rng = random.Random(0)
    seen: set[str] = set()
    mid_write = 0
    for kill in range(20):
        run_dirs = list(out.iterdir()) if out.exists() else []
        checkpoints = list(run_dirs[0].glob("checkpoint-*.pt")) if run_dirs else []
        args = ["train", "--resume", str(run_dirs[0])] if checkpoints else ["train", *every_step]
        if not checkpoints and run_dirs:  # killed before its first checkpoint: that run had nothing to keep
            for run_dir in run_dirs:
                shutil.rmtree(run_dir)
        log = tmp_path / f"kill-{kill}.log"
        log.touch()
        run = start_isolated(gali_on_a_slow_disk, args, str(cache), str(tmp_path), str(log))
        wait_for_a_tick(run, log)  # training has begun: the kill lands in a step, a snapshot or a write
        if kill % 2:
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # every other kill waits for one new checkpoint and then a write under way: some surely land mid-write
            wait_for_a_partial_file(next(out.iterdir()), known_checkpoints=seen)
        run.kill()
        run.join()
        run_dir = next(out.iterdir(), None) if out.exists() else None
        if run_dir is None:
            continue
        mid_write += bool(list(run_dir.glob("*.tmp")))
        names = {p.name for p in run_dir.glob("checkpoint-*.pt")}
        assert seen <= names, f"kill {kill}: checkpoints disappeared: {seen - names}"
        for name in names - seen:
            load_checkpoint(run_dir / name)  # every checkpoint that exists is whole
        seen = names
    print(f"20 SIGKILLs: {len(seen)} checkpoints, all readable; {mid_write} kills landed mid-write (a partial .tmp)")
    assert len(seen) >= 10 and mid_write >= 5
    # the killed run resumes from its newest checkpoint and trains on: two more ticks, through the CLI
    run_dir = next(out.iterdir())
    images = final_state(run_dir)["images_seen"] + 64
    final = gali("train", "--resume", str(run_dir), f"run.kimg={images / 1000}", cache=cache, cwd=tmp_path)
    assert finish(final) == 0
    assert final_state(run_dir)["images_seen"] == images


def gali_on_a_slow_disk(args: list[str], cache: str, cwd: str, log: str) -> None:
    """``gali ARGS`` in this (forked) process, one thread, on the slow disk; stdout and stderr to ``log``."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (fd 1 lives as long as the process)
    sys.stderr = sys.stdout
    os.chdir(cwd)
    os.environ["GALI_CACHE"] = cache
    torch.set_num_threads(1)
    exec(SLOW_DISK, {})  # its own namespace: the patched fsync finds the original it wraps
    sys.exit(main(args))


def wait_for_a_tick(process: multiprocessing.Process, log: Path, timeout: float = 120.0) -> None:
    """Wait until the child's ``log`` holds a tick line; fail with the log's tail if the child ends first."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith("kimg") for line in log.read_text().splitlines()):
        assert process.is_alive(), f"the run ended early ({process.exitcode}): {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no tick within {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.01)


def _step() -> GaliStep:
    from gali.engine.method.config import MethodConfig
    from gali.engine.method.tuple_spec import load_spec
    from gali.engine.nets.config import ModelConfig
    from gali.engine.nets.networks import Networks
    from gali.engine.nets.paper import build_models
    from gali.engine.step.config import ComputeConfig, OptimConfig

    torch.manual_seed(0)
    spec = load_spec("gali4")
    G, E, D = build_models(
        ModelConfig(latent_dim=8, width=0.125), slot_kinds=spec.slot_kinds, num_classes=spec.num_classes
    )
    return GaliStep(
        Networks(G=G, E=E, D=D), spec, MethodConfig(), OptimConfig(lr=1e-3), 8, ComputeConfig(kernel_impl="ref")
    )


@pytest.mark.parametrize("side", ["d", "ge"])
def test_a_non_finite_gradient_leaves_that_side_untouched_and_is_counted(side):
    step = _step()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    step.step(x, torch.tensor(0.1))  # creates the Adam state
    bad, other = (step.d_params, step.ge_params) if side == "d" else (step.ge_params, step.d_params)
    optimizer = step.opt_d if side == "d" else step.opt_ge
    before = [p.detach().clone() for p in bad]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in bad]
    other_before = [p.detach().clone() for p in other]
    hook = bad[0].register_hook(lambda grad: torch.full_like(grad, float("nan")))
    out = step.step(x, torch.tensor(0.1))
    hook.remove()
    assert out[f"skipped_{side}"].item() == 1.0 and out[f"skipped_{'ge' if side == 'd' else 'd'}"].item() == 0.0
    assert all(torch.equal(p, b) for p, b in zip(bad, before, strict=True))
    for p, saved in zip(bad, state, strict=True):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    assert any(not torch.equal(p, b) for p, b in zip(other, other_before, strict=True))  # the other side stepped


def test_consecutive_bad_ticks_stop_the_run_and_keep_the_checkpoints_before_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    head, calls = eager.kway_head, []

    def poisoned_after_30_steps(*args, **kwargs):
        calls.append(1)
        loss_d, loss_ge = head(*args, **kwargs)
        return (loss_d * float("nan"), loss_ge) if len(calls) > 30 else (loss_d, loss_ge)

    monkeypatch.setattr(eager, "kway_head", poisoned_after_30_steps)
    cfg = load_config("demo", [*TINY, "run.max_bad_ticks=2", f"run.out_dir={tmp_path}"])
    with pytest.raises(GaliError, match=r"2 ticks in a row had steps with a non-finite loss or gradient"):
        train(cfg, log=lambda line: None)
    run_dir = next(tmp_path.glob("0*"))
    assert [p.name for p in run_dir.glob("checkpoint-*.pt")] == ["checkpoint-0000000640.pt"]
    state = load_checkpoint(run_dir / "checkpoint-0000000640.pt")[1]
    assert all(torch.isfinite(t).all() for t in state["D"].values())


def test_a_full_disk_stops_the_run_naming_the_folder_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    save, saves = torch.save, []

    def full_on_the_second(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_on_the_second)
    cfg = load_config("demo", [*TINY, f"run.out_dir={tmp_path}"])
    with pytest.raises(
        GaliError,
        match=r"no space left on the device of .* while writing checkpoint-0000001280\.pt: "
        r"the partial file was removed and the earlier checkpoints are intact",
    ):
        train(cfg, log=lambda line: None)
    run_dir = next(tmp_path.glob("0*"))
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-0000000640.pt"]
    monkeypatch.undo()
    load_checkpoint(run_dir / "checkpoint-0000000640.pt")


def test_pruning_keeps_the_newest_the_milestones_and_survives_a_failed_delete(tmp_path, monkeypatch):
    for i in range(1, 11):
        (tmp_path / f"checkpoint-{100 * i:010d}.pt").write_bytes(b"")
    stuck = tmp_path / f"checkpoint-{200:010d}.pt"
    unlink, lines = Path.unlink, []
    monkeypatch.setattr(
        Path,
        "unlink",
        lambda self, *a: (_ for _ in ()).throw(PermissionError("busy")) if self == stuck else unlink(self, *a),
    )
    deleted = prune_checkpoints(tmp_path, keep=3, milestone_images=400, log=lines.append)
    kept = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("checkpoint-*.pt"))
    assert kept == [100, 200, 400, 800, 900, 1000]  # newest 3, first of each 400-image interval, the stuck one
    assert len(deleted) == 4 and len(lines) == 1 and "could not delete" in lines[0] and "busy" in lines[0]
    assert prune_checkpoints(tmp_path, keep=0, milestone_images=0, log=lines.append) == []  # 0 keeps all


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=nan", "optim.lr"),
        ("run.kimg=inf", "run.kimg"),
        ("run.kimg=nan", "run.kimg"),
        ("run.snapshot_kimg=0.0001", "run.snapshot_kimg"),
        ("run.tick_kimg=0.0005", "run.tick_kimg"),
        ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
    ],
)
def test_values_that_would_crash_later_are_refused_at_start_up(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert info.value.key == key


@pytest.mark.slow
def test_a_resume_that_changes_the_networks_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    result = train(load_config("demo", [*TINY, "run.kimg=0.64", f"run.out_dir={tmp_path}"]), log=lambda line: None)
    with pytest.raises(GaliError, match=r"holds networks for other values of method\.tuples; a resumed run keeps"):
        resume(result.run_dir, ["method.tuples=ali", "run.kimg=1"])


def test_a_run_that_cannot_start_leaves_no_run_folder(tmp_path, monkeypatch):
    """The held-out split is unreadable: the run stops at set-up, before its folder exists."""
    from PIL import Image

    from gali.engine.errors import DataError

    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    for split, count in (("train", 40), ("test", 8)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count // 2):
                if split == "train":
                    Image.new("RGB", (32, 32), (i * 6, 0, 0)).save(folder / f"{i}.png")
                else:
                    (folder / f"{i}.png").write_bytes(b"not a png")
    cfg = load_config(
        "demo",
        [
            *TINY,
            "data.source=folder",
            f"data.root={tmp_path / 'data'}",
            "run.batch_size=8",
            f"run.out_dir={tmp_path / 'runs'}",
        ],
    )
    with pytest.raises(DataError, match=r"\.png"):
        train(cfg, log=lambda line: None)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_full_disk_at_start_up_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    from gali.engine.loop import run_log as run_log_module

    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_log_module.RunLog, "__init__", no_space)
    with pytest.raises(GaliError, match=r"no space left on the device of .* for the run's logs; free space"):
        train(load_config("demo", [*TINY, f"run.out_dir={tmp_path / 'runs'}"]), log=lambda line: None)


@pytest.mark.parametrize("where", ["out_dir", "run_dir"])
def test_an_unwritable_run_folder_is_refused_by_name_before_training(where, tmp_path, capsys, monkeypatch):
    """An immutable folder (chattr +i: root ignores permission bits) for a new run's out_dir or a resumed run's."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: no immutable flag to test with")
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    args = ["train", *TINY, "run.kimg=0.032", "run.snapshot_kimg=0.032", f"run.out_dir={out}"]
    if where == "run_dir":
        assert main(args) == 0
        locked, args = next(out.iterdir()), ["train", "--resume", str(next(out.iterdir())), "run.kimg=0.064"]
    else:
        locked = out
        out.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip(f"this file system does not take the immutable flag (chattr +i {locked})")
    try:
        code = main(args)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    printed = capsys.readouterr()
    assert code == 2 and str(out if where == "out_dir" else locked) in printed.err and "writable" in printed.err
    assert "Traceback" not in printed.err and "kimg 0.064" not in printed.out


@pytest.mark.slow
def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(tmp_path, capsys, monkeypatch):
    """Two ``gali train --resume RUN_DIR`` (a requeued job racing its predecessor): the second exits 2 at once."""
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    assert main(["train", *TINY, "run.kimg=0.032", "run.snapshot_kimg=0.032", f"run.out_dir={out}"]) == 0
    run_dir = next(out.iterdir())
    first = gali("train", "--resume", str(run_dir), "run.kimg=1.6", cache=tmp_path / "cache", cwd=tmp_path)
    try:
        wait_for_ticks(first, 1)
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "run.kimg=1.6"]) == 2
        err = capsys.readouterr().err
        assert f"PID {first.pid}" in err and "Traceback" not in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        assert finish(first) == EXIT_STOPPED  # the first run goes on untouched and stops as asked
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kimgs = [r["kimg"] for r in records if "kimg" in r and "event" not in r]
    assert kimgs == sorted(kimgs) and len(kimgs) == len(set(kimgs))  # one writer: no record twice


@pytest.mark.slow
def test_ranks_started_by_srun_alone_stop_on_usr1_requeue_once_and_resume_bit_exactly(uninterrupted, tmp_path):
    """srun simulated: two processes with SLURM's variables and no torchrun, a fake scontrol on PATH."""
    calls, scontrol = tmp_path / "scontrol.calls", tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost"}
    command = ["train", *TINY, *WORKERS, f"run.dir={tmp_path / 'job'}"]

    def srun() -> list[subprocess.Popen]:
        env = {
            **os.environ,
            **slurm,
            "PATH": f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "GALI_CACHE": str(tmp_path / "cache"),
        }
        return [
            subprocess.Popen(
                [sys.executable, "-m", "gali", *command],
                cwd=tmp_path,
                env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]

    ranks = srun()
    wait_for_ticks(ranks[0], 3)
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)  # srun --signal=USR1@120 signals every task
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        assert rank.returncode == EXIT_STOPPED and "stopped by SIGUSR1" in stderr, stderr[-3000:]
    run_dir = tmp_path / "job"
    assert len(list(run_dir.glob("checkpoint-*.pt"))) == 1 and calls.read_text() == "requeue 77\n"
    ranks = srun()  # the requeued job: the same command line resumes
    for rank in ranks:
        assert finish(rank) == 0
    assert_same_state(final_state(run_dir), uninterrupted[2])


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_in_the_same_folder_and_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    """``torchrun --max-restarts 1 ... run.dir=...``: rank 1 SIGKILLed mid-run; the restarted group resumes from the
    folder's newest checkpoint (torchrun's store is reused by the restart: engine/loop/distributed.py)."""
    run_dir = tmp_path / "job"
    run = gali(
        "train", *TINY, *WORKERS, f"run.dir={run_dir}", cache=tmp_path / "cache", cwd=tmp_path, ranks=2, restarts=1
    )
    wait_for_ticks(run, 12)  # past the first checkpoint, at 0.64 kimg
    ranks = [int(pid) for pid in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert "resumed from checkpoint-" in stdout and "exitcode: -9" in stderr
    assert_same_state(final_state(run_dir), uninterrupted[2])
