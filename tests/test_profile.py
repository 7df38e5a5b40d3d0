"""`gali profile`: a short run with NVTX/record_function ranges on, written as a torch.profiler trace."""

import json

import pytest

from gali.engine.cli import main
from gali.engine.loop.config import load_config
from gali.engine.loop.profile import nsys_command
from gali.engine.loop.ticks import TickStats
from gali.engine.ranges import ranges_enabled

TINY = [
    "model.width=0.125",
    "model.latent_dim=16",
    "run.batch_size=16",
    "data.workers=0",
    "run.grid_size=2",
    "run.kimg=0.032",
    "run.tick_kimg=0.016",
    "run.snapshot_kimg=0.032",
    "run.progress=lines",
    "run.tensorboard=off",
]
STEP_RANGES = {"gali/step", "gali/chains", "gali/D", "gali/head", "gali/backward_D", "gali/backward_GE", "gali/optim"}


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    return load_config("demo", [*TINY, f"run.out_dir={tmp_path / 'runs'}"])


def test_gali_profile_writes_a_trace_with_every_step_range(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    assert not ranges_enabled()
    assert main(["profile", "--steps", "2", *TINY, f"run.out_dir={tmp_path / 'runs'}"]) == 0
    printed = capsys.readouterr().out
    trace = next((tmp_path / "runs").glob("*/trace.json"))
    assert str(trace) in printed
    assert "nsys profile" in printed and "run.kimg=0.032 compute.nvtx=true" in printed  # 2 steps of 16 images
    events = json.loads(trace.read_text())["traceEvents"]
    traced = {event.get("name") for event in events}
    ranges = [e for e in events if str(e.get("name")).startswith("gali/") and e.get("ph") == "X"]
    names = [e["name"] for e in sorted(ranges, key=lambda e: (e["ts"], -e["dur"]))]  # in the order entered
    assert STEP_RANGES | {"gali/data"} <= traced
    # the loop: fetch a batch, then one step with its phases in order
    assert names[:9] == [
        "gali/data",
        "gali/step",
        "gali/chains",
        "gali/D",
        "gali/head",
        "gali/backward_D",
        "gali/backward_GE",
        "gali/optim",
        "gali/data",
    ]
    assert names.count("gali/step") == 2
    assert not ranges_enabled()


def test_train_leaves_ranges_as_it_found_them(tiny_cfg):
    from gali.engine.loop.train import train

    tiny_cfg.compute.nvtx = True
    train(tiny_cfg, log=lambda line: None)
    assert not ranges_enabled()


def test_nsys_command_records_the_same_run_with_ranges():
    command = nsys_command("demo", ["run.kimg=1", "data.root=/my data"], "/tmp/gali")
    assert command.startswith("nsys profile --trace=cuda,nvtx")
    assert "gali train --preset demo run.kimg=1 'data.root=/my data' compute.nvtx=true" in command


def test_tick_stats_read_means_per_statistic_in_one_copy():
    import torch

    stats = TickStats()
    stats.add({"loss_d": torch.tensor(1.0), "p_true": torch.tensor([0.2, 0.4])})
    stats.add({"loss_d": torch.tensor(3.0), "p_true": torch.tensor([0.4, 0.6]), "grad_norm_ge": torch.tensor(5.0)})
    means = stats.read_means()
    assert means["loss_d"] == 2.0 and means["grad_norm_ge"] == 5.0  # each statistic over its own count
    assert means["p_true"] == pytest.approx([0.3, 0.5])
    assert stats.read_means() == {}
