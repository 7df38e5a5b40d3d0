"""The run's logs: metrics.jsonl, TensorBoard (optional), the progress bar or lines, PNG grids."""

import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gali.engine.cli import main
from gali.engine.errors import ConfigError
from gali.engine.loop.config import load_config
from gali.engine.loop.grids import inpainting_grid, tile
from gali.engine.loop.run_log import RunLog, format_duration, format_tick, resolve_progress, resolve_tensorboard
from gali.engine.nets.inference import evaluation_box_params

TICK = {
    "kimg": 4.0,
    "epoch": 2,
    "iteration": 125,
    "images_per_s": 100.0,
    "noise_std": 0.05,
    "loss_d": 1.2345,
    "loss_ge": 2.5,
    "p_true": [0.25, 0.5],
}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch.utils.tensorboard`` fail as it does without the tensorboard package."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_a_tick_line_shows_kimg_speed_losses_and_time_left():
    line = format_tick(TICK, total_kimg=10)
    assert line.startswith("kimg 4.0/10 ( 40%)  100.0 img/s  eta 1m00s  epoch 2")
    for part in ("loss_d 1.2345", "loss_ge 2.5000", "p_true 0.25/0.50"):
        assert part in line
    assert "noise_std 0.0500" in line and "iteration" not in line  # the README lists noise_std in the line
    assert "kimg 0.032/0.064" in format_tick({**TICK, "kimg": 0.032}, total_kimg=0.064)
    # issue 29 item 17: ticks 0.128 kimg apart stay apart
    assert "kimg 0.128/1.024" in format_tick({**TICK, "kimg": 0.128}, total_kimg=1.024)
    assert "kimg 0.256/1.024" in format_tick({**TICK, "kimg": 0.256}, total_kimg=1.024)
    assert "eta ?" in format_tick({**TICK, "images_per_s": 0.0}, total_kimg=10)


@pytest.mark.parametrize(("seconds", "text"), [(7.4, "7s"), (65, "1m05s"), (3725, "1h02m"), (float("inf"), "?")])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_progress_auto_draws_a_bar_only_on_a_terminal():
    assert resolve_progress("auto", FakeTerminal()) == "bar"
    assert resolve_progress("auto", io.StringIO()) == "lines"
    assert resolve_progress("bar", io.StringIO()) == "bar"
    assert resolve_progress("lines", FakeTerminal()) == "lines"
    with pytest.raises(ConfigError, match=r"run\.progress.*accepted: auto, bar, lines"):
        resolve_progress("tqdm", io.StringIO())


def test_lines_mode_logs_one_line_per_tick_and_appends_jsonl(tmp_path):
    lines: list[str] = []
    run_log = RunLog(tmp_path, total_kimg=10, progress="lines", log=lines.append, stream=FakeTerminal())
    run_log.tick(TICK)
    run_log.record({"event": "snapshot", "kimg": 4.0, "recon_mse_test": 0.01})
    run_log.close()
    run_log.close()  # twice is harmless
    assert len(lines) == 1 and "img/s" in lines[0] and "loss_d 1.2345" in lines[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [TICK, {"event": "snapshot", "kimg": 4.0, "recon_mse_test": 0.01}]
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_the_bar_redraws_one_line_and_messages_print_above_it(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "gali.engine.loop.run_log.shutil.get_terminal_size", lambda fallback: os.terminal_size((80, 24))
    )
    terminal = FakeTerminal()
    lines: list[str] = []
    run_log = RunLog(tmp_path, total_kimg=10, progress="auto", log=lines.append, stream=terminal)
    assert run_log.progress == "bar"
    run_log.tick(TICK)
    run_log.message("snapshot at 4.0 kimg")
    run_log.tick({**TICK, "kimg": 10.0})
    run_log.close()
    assert lines == ["snapshot at 4.0 kimg"]  # ticks go to the bar only
    text = terminal.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended when the run closes
    drawn = [segment.rstrip() for segment in text.split("\r") if segment.strip()]
    assert drawn[0].startswith("[########------------] kimg 4.0/10 ( 40%)  100.0 img/s  eta 1m00s")
    assert drawn[-1].startswith("[####################] kimg 10.0/10 (100%)")
    assert drawn.count(drawn[0]) == 2  # blanked for the message, then redrawn as it was
    assert len(format_tick(TICK, total_kimg=10)) > 80  # so the bar must be cut to the terminal's width
    assert all(len(segment) == 79 for segment in drawn)


def test_full_width_bar_carries_every_field(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "gali.engine.loop.run_log.shutil.get_terminal_size", lambda fallback: os.terminal_size((400, 24))
    )
    terminal = FakeTerminal()
    run_log = RunLog(tmp_path, total_kimg=10, progress="bar", log=lambda line: None, stream=terminal)
    run_log.tick(TICK)
    run_log.close()
    for part in ("kimg 4.0/10", "loss_d 1.2345", "loss_ge 2.5000", "p_true 0.25/0.50", "100.0 img/s", "eta 1m00s"):
        assert part in terminal.getvalue()


def test_grids_are_written_at_a_stable_name_and_per_snapshot(tmp_path):
    run_log = RunLog(tmp_path, total_kimg=10, progress="lines", log=lambda line: None)
    first = np.zeros((8, 12, 3), dtype=np.uint8)
    second = np.full((8, 12, 3), 200, dtype=np.uint8)
    run_log.images({"samples": first}, 40000)
    written = run_log.images({"samples": second}, 80000)
    run_log.close()
    assert written == {"samples": tmp_path / "samples.png"}
    assert sorted(p.name for p in tmp_path.glob("samples*.png")) == [
        "samples-0000040000.png",
        "samples-0000080000.png",
        "samples.png",
    ]
    with Image.open(tmp_path / "samples.png") as latest, Image.open(tmp_path / "samples-0000040000.png") as old:
        assert latest.size == (12, 8)
        np.testing.assert_array_equal(np.asarray(latest), second)
        np.testing.assert_array_equal(np.asarray(old), first)


def test_tensorboard_gets_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert resolve_tensorboard("auto") and resolve_tensorboard("on")
    run_log = RunLog(tmp_path, total_kimg=10, progress="lines", tensorboard=True, log=lambda line: None)
    assert run_log.tensorboard
    run_log.tick(TICK)
    run_log.images({"samples": np.zeros((8, 12, 3), dtype=np.uint8)}, 4000)
    run_log.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()
    assert {"loss_d", "loss_ge", "images_per_s", "p_true/0", "p_true/1"} <= set(tags["scalars"])
    assert "kimg" not in tags["scalars"]
    (loss_d,) = events.Scalars("loss_d")
    assert loss_d.step == 4000 and loss_d.value == pytest.approx(1.2345)
    assert tags["images"] == ["samples"]


def test_tensorboard_on_without_the_package_names_the_key_and_the_extra(monkeypatch):
    _no_tensorboard(monkeypatch)
    with pytest.raises(ConfigError) as info:
        resolve_tensorboard("on")
    assert info.value.key == "run.tensorboard" and "pip install 'gali[tensorboard]'" in str(info.value)
    assert resolve_tensorboard("auto") is False
    assert resolve_tensorboard("off") is False


@pytest.mark.parametrize(
    ("override", "key"), [("run.tensorboard=yes", "run.tensorboard"), ("run.progress=tqdm", "run.progress")]
)
def test_bad_logging_keys_name_themselves_and_the_accepted_values(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert info.value.key == key and "accepted: auto" in str(info.value)


def test_dry_run_config_with_logging_keys_loads_back(tmp_path, capsys):
    assert main(["train", "--dry-run", "run.tensorboard=off", "run.progress=lines"]) == 0
    path = tmp_path / "config.toml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(str(path))
    assert cfg.run.tensorboard == "off" and cfg.run.progress == "lines"


@pytest.mark.parametrize(("resolution", "low", "high"), [(64, 8, 54), (32, 4, 27)])
def test_evaluation_boxes_are_fixed_scaled_and_inside_the_image(resolution, low, high):
    boxes = evaluation_box_params(256, resolution, seed=3)
    assert torch.equal(boxes, evaluation_box_params(256, resolution, seed=3))
    assert not torch.equal(boxes, evaluation_box_params(256, resolution, seed=4))
    top, left, h, w = boxes.unbind(1)
    assert h.min() >= low and w.min() >= low and h.max() <= high and w.max() <= high
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= resolution).all() and (left + w <= resolution).all()


class _MeanEncoder(nn.Module):
    def forward(self, x):
        mu = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return mu, torch.zeros_like(mu)


class _FlatGenerator(nn.Module):
    def forward(self, z, labels=None):
        return torch.full((z.shape[0], 3, 8, 8), 0.5)


def test_inpainting_grid_rows_are_x_masked_inpainted_and_composite():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    boxes = torch.tensor([[1, 2, 3, 4], [0, 0, 8, 2]], dtype=torch.int32)
    grid = inpainting_grid(_FlatGenerator(), _MeanEncoder(), x, boxes)
    assert grid.shape == (4 * 8, 2 * 8, 3)
    np.testing.assert_array_equal(grid[:8], tile(x, columns=2))
    inside = np.zeros((8, 8), dtype=bool)
    inside[1:4, 2:6] = True
    masked, inpainted, composite = grid[8:16, :8], grid[16:24, :8], grid[24:32, :8]
    assert (masked[inside] == 0).all()  # the fill value is below -1: black
    assert (inpainted == 191).all()  # G's 0.5 in [0, 255]
    assert (composite[inside] == 191).all()
    np.testing.assert_array_equal(composite[~inside], grid[:8, :8][~inside])
