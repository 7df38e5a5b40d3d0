"""The cluster user's launch path: one command line for every launch (run.dir), a time limit, SLURM requeue, and a
run folder that says how the run ended."""

import json
import os
import time

import pytest

from gali.engine.cli import main
from gali.engine.loop.signals import EXIT_STOPPED, SLURM_END_MARGIN_S, run_deadline

TINY = [
    "run.device=cpu",
    "model.width=0.125",
    "model.latent_dim=8",
    "run.batch_size=32",
    "data.workers=0",
    "run.tick_kimg=0.032",
    "run.snapshot_kimg=0.064",
    "run.grid_size=2",
    "run.tensorboard=off",
    "run.progress=lines",
    "run.identity_images=0",
    "run.ema_kimg=0",
]


@pytest.fixture(autouse=True)
def digits_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))


def _status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_one_command_line_starts_the_run_and_resumes_it(tmp_path, capsys):
    run_dir = tmp_path / "job"
    command = ["train", *TINY, "run.kimg=0.064", f"run.dir={run_dir}"]
    assert main(command) == 0
    assert _status(run_dir) | {"time": None} == {
        "event": "end",
        "reason": "done",
        "resumable": False,
        "kimg": 0.064,
        "checkpoint": "checkpoint-0000000064.pt",
        "time": None,
    }
    capsys.readouterr()
    assert main([*command, "run.kimg=0.128"]) == 0  # a restart: the same command line, a longer run
    assert "resumed from checkpoint-0000000064.pt" in capsys.readouterr().out
    assert _status(run_dir)["kimg"] == 0.128 and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "job"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["reason"] for r in records if r.get("event") == "end"]
    assert ends == ["done", "done"]


def test_max_time_stops_with_a_checkpoint_and_requeues_the_slurm_job(tmp_path, capsys, monkeypatch):
    """run.max_time of a few seconds: exit 75 after a checkpoint; under SLURM, one ``scontrol requeue <job>``."""
    calls = tmp_path / "scontrol.calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "job"
    started = time.monotonic()
    assert main(["train", *TINY, "run.kimg=100", "run.max_time=4s", f"run.dir={run_dir}"]) == EXIT_STOPPED
    assert time.monotonic() - started < 60
    printed = capsys.readouterr()
    assert "stopped by the time limit run.max_time" in printed.err and "requeued SLURM job 4242" in printed.out
    assert calls.read_text() == "requeue 4242\n"
    status = _status(run_dir)
    assert status["reason"] == "stopped" and status["resumable"] and (run_dir / status["checkpoint"]).is_file()


def test_requeue_off_leaves_the_job_to_the_batch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol at all: 'off' must not look for it
    command = ["train", *TINY, "run.kimg=100", "run.max_time=2s", "run.requeue=off", f"run.dir={tmp_path / 'job'}"]
    assert main(command) == EXIT_STOPPED


def test_max_time_auto_takes_the_slurm_jobs_end(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert run_deadline("auto", start=100.0) is None and run_deadline("", start=100.0) is None
    assert run_deadline("1h30m", start=100.0) == 100.0 + 5400.0
    monkeypatch.setenv("SLURM_JOB_END_TIME", "5000")
    assert run_deadline("auto", start=100.0) == 5000.0 - SLURM_END_MARGIN_S


def test_a_malformed_max_time_is_refused_by_key(tmp_path, capsys):
    assert main(["train", *TINY, "run.max_time=10 min", f"run.dir={tmp_path / 'job'}"]) == 2
    assert "run.max_time" in capsys.readouterr().err and not (tmp_path / "job").exists()


def test_version_names_the_release_and_the_commit(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("gali 0.1.0 (commit ")


def test_the_run_folder_keeps_every_line_shown_in_log_txt(tmp_path, capsys):
    run_dir = tmp_path / "job"
    assert main(["train", *TINY, "run.kimg=0.064", f"run.dir={run_dir}"]) == 0
    shown = capsys.readouterr().out.splitlines()
    kept = (run_dir / "log.txt").read_text().splitlines()
    assert kept == shown and any(line.startswith("kimg 0.064") for line in kept) and kept[0].startswith("run folder")
