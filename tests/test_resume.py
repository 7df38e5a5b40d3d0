"""An interrupted run resumes from its last complete checkpoint and computes what the uninterrupted run did."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import gali.engine.loop.checkpoint as checkpoint_module
from gali.engine.cli import main
from gali.engine.errors import GaliError
from gali.engine.loop.checkpoint import load_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.train import resume, train

pytestmark = pytest.mark.numerics  # parity of twins: run again under a second CPU kernel path

# The digits hold 1,437 training images: 44 batches of 32 per epoch. Snapshots every 640 images
# (20 batches) put checkpoints mid-epoch (batch 20 of epoch 1) and after the epoch boundary
# (1,920 images: batch 16 of epoch 2); the run ends at 2,016 images.
# On the CPU: bit-exact replay is the claim (some CUDA kernels are not run-to-run deterministic). The
# run keeps moving averages of G and E and recalibrates copies at each snapshot: both must resume exactly.
TINY = [
    "run.device=cpu",
    "model.width=0.125",
    "model.latent_dim=8",
    "run.batch_size=32",
    "data.workers=0",
    "run.kimg=2",
    "run.tick_kimg=0.32",
    "run.snapshot_kimg=0.64",
    "run.grid_size=2",
    "run.tensorboard=off",
    "run.progress=lines",
    "run.ema_kimg=0.5",
    "run.snapshot_bn_recalibrate=2",
    "run.identity_images=0",
]  # the identity metric is tested in test_train; resume does not read it


class Interrupted(Exception):
    """Stands for a crash or a pre-emption right after a checkpoint was written."""


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(sorted(run_dir.glob("checkpoint-*.pt"))[-1])[1]


def _assert_same_training_state(got: dict, want: dict) -> None:
    assert got["images_seen"] == want["images_seen"] and got["iteration"] == want["iteration"]
    for name in ("G", "E", "D", "G_ema", "E_ema"):
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value), f"{name}.{key}"
    for side in ("opt_d", "opt_ge"):
        for index, state in want[side]["state"].items():
            for key, value in state.items():
                assert torch.equal(got[side]["state"][index][key], value), f"{side}[{index}].{key}"
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """The reference: the whole run in one go; its checkpoints, read once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(cache))
    out = tmp_path_factory.mktemp("runs")
    result = train(load_config("demo", [*TINY, f"run.out_dir={out}"]), log=lambda line: None)
    states = {p.name: load_checkpoint(p)[1] for p in sorted(result.run_dir.glob("checkpoint-*.pt"))}
    yield result.run_dir, states
    mp.undo()


def _interrupted_run(tmp_path: Path, monkeypatch, after: int) -> Path:
    """A run that stops right after writing its ``after``-th checkpoint; returns its run folder."""
    written = []

    def save_then_stop(path, state):
        save_checkpoint(path, state)
        written.append(path)
        if len(written) == after:
            raise Interrupted(path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(load_config("demo", [*TINY, f"run.out_dir={tmp_path}"]), log=lambda line: None)
    monkeypatch.undo()
    return written[-1].parent


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_where_the_uninterrupted_run_ends(uninterrupted, tmp_path, monkeypatch, cache):
    reference_dir, reference = uninterrupted
    monkeypatch.setenv("GALI_CACHE", str(cache))
    run_dir = _interrupted_run(tmp_path, monkeypatch, after=1)
    monkeypatch.setenv("GALI_CACHE", str(cache))
    assert [p.name for p in run_dir.glob("checkpoint-*.pt")] == ["checkpoint-0000000640.pt"]
    lines: list[str] = []
    result = resume(run_dir, log=lines.append)
    assert result.run_dir == run_dir  # the same folder goes on
    assert any("resumed from checkpoint-0000000640.pt at 0.64 kimg (epoch 1, batch 20)" in line for line in lines)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == sorted(reference)
    _assert_same_training_state(_final_state(run_dir), reference["checkpoint-0000002016.pt"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records if r.get("event") == "resume"] == ["checkpoint-0000000640.pt"]
    # the interruption came between writing the 0.64 checkpoint and logging its snapshot record
    assert [r["kimg"] for r in records if r.get("event") == "snapshot"] == [1.28, 1.92, 2.016]
    assert reference_dir != run_dir


@pytest.mark.slow
def test_resume_after_an_epoch_boundary_from_a_checkpoint_file_through_the_cli(
    uninterrupted, tmp_path, monkeypatch, cache
):
    """``gali train --resume FILE run.kimg=...``: the checkpoint after the first epoch, trained past the old end."""
    reference_dir, reference = uninterrupted
    monkeypatch.setenv("GALI_CACHE", str(cache))
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_dir, run_dir)
    (run_dir / "checkpoint-0000002016.pt").unlink()
    assert main(["train", "--resume", str(run_dir / "checkpoint-0000001920.pt")]) == 0
    _assert_same_training_state(_final_state(run_dir), reference["checkpoint-0000002016.pt"])
    assert main(["train", "--resume", str(run_dir), "run.kimg=2.1"]) == 0  # train longer: the overrides apply on top
    state = _final_state(run_dir)
    assert state["images_seen"] == 2112 and state["config"]["run"]["kimg"] == 2.1


@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_is_skipped(uninterrupted, tmp_path, monkeypatch, cache):
    reference_dir, reference = uninterrupted
    monkeypatch.setenv("GALI_CACHE", str(cache))
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_dir, run_dir)
    (run_dir / "checkpoint-0000002016.pt").write_bytes(b"cut short")
    lines: list[str] = []
    resume(run_dir, log=lines.append)
    assert any(line.startswith("resume: skipping checkpoint-0000002016.pt") for line in lines)
    assert any("resumed from checkpoint-0000001920.pt" in line for line in lines)
    _assert_same_training_state(_final_state(run_dir), reference["checkpoint-0000002016.pt"])


@pytest.mark.slow
def test_resume_errors_name_the_path_and_what_to_do(uninterrupted, tmp_path, capsys):
    reference_dir, _ = uninterrupted
    with pytest.raises(GaliError, match=rf"{tmp_path / 'nowhere'} does not exist; pass a run folder"):
        resume(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GaliError, match=r"empty holds no checkpoint-\*\.pt"):
        resume(tmp_path / "empty")
    finished = reference_dir / "checkpoint-0000002016.pt"
    with pytest.raises(GaliError, match=r"at 2.016 kimg and run.kimg is 2: nothing left to train; pass run.kimg="):
        resume(finished)
    old = tmp_path / "old" / "checkpoint-0000000640.pt"
    old.parent.mkdir()
    state = load_checkpoint(reference_dir / "checkpoint-0000000640.pt")[1]
    save_checkpoint(old, {k: v for k, v in state.items() if k not in ("iteration", "rng", "format_version")})
    with pytest.raises(GaliError, match=r"has no iteration, rng \(written before gali could resume\)"):
        resume(old)
    with pytest.raises(GaliError, match=r"do not give; resume with the data and batch size"):
        resume(reference_dir / "checkpoint-0000000640.pt", ["run.batch_size=16"])
    assert main(["train", "--resume", str(reference_dir), "--preset", "demo"]) == 2
    assert "drop --preset/--dry-run" in capsys.readouterr().err
