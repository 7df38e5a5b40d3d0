"""What a checkpoint holds and where it goes: whole files only, finite tensors only, a full disk as a message."""

import contextlib
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from gali.engine.errors import GaliError
from gali.engine.loop.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.graphed import GraphedStep
from tests.isolation import run_isolated

MiB = 1 << 20


def _networks() -> Networks:
    torch.manual_seed(0)
    spec = load_spec("gali4")
    G, E, D = build_models(
        ModelConfig(latent_dim=8, width=0.125), slot_kinds=spec.slot_kinds, num_classes=spec.num_classes
    )
    return Networks(G=G, E=E, D=D)


def _bundle() -> Checkpoint:
    """A networks-only checkpoint bundle of the demo preset at the tiny width."""
    return Checkpoint(load_config("demo", ["model.width=0.125", "model.latent_dim=8"]), _networks())


def _batch_norm_statistics(nets: Networks) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name in ("G", "E")
        for key, value in getattr(nets, name).state_dict().items()
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def _spoilt(state: dict, how: str) -> object:
    """A checkpoint-shaped dictionary that is not a checkpoint: ``state`` spoilt one way."""
    if how == "format-version-only":
        return {"format_version": 1}
    if how == "config-not-a-dict":
        return {**state, "config": [state["config"]]}
    if how == "network-not-tensors":
        return {**state, "G": {**state["G"], "net.1.num_batches_tracked": 3}}
    return {**state, "iteration": 2, "images_seen": 64, "epoch": 1}  # training counters, no optimizer state


# How each spoilt file is named in the skip line: what is missing or wrong.
PROBLEMS = {
    "format-version-only": "it has no 'config', 'extra_dim', 'G', 'E', 'D'",
    "config-not-a-dict": "its 'config' is not a dictionary (the resolved config): it is a list",
    "network-not-tensors": "its 'G' is not a state dictionary of tensors: it is a dict of Tensor, int",
    "training-state-missing": "it has no 'opt_d', 'opt_ge', 'rng'",
}


@pytest.mark.parametrize("how", PROBLEMS)
def test_a_checkpoint_shaped_file_that_is_not_a_checkpoint_is_skipped_by_name(tmp_path, how):
    older = save_checkpoint(tmp_path / "checkpoint-0000000001.pt", _bundle().state_dict())
    newest = tmp_path / "checkpoint-0000000002.pt"
    torch.save(_spoilt(torch.load(older, weights_only=True), how), newest)
    lines: list[str] = []
    path, _, _ = latest_checkpoint(tmp_path, log=lines.append)
    assert path == older
    assert lines == [
        f"resume: skipping {newest.name}: checkpoint {newest} is not a whole gali checkpoint: {PROBLEMS[how]}"
    ]


@pytest.mark.parametrize("runner", ["eager", "graphed"])
@pytest.mark.parametrize("phase", ["both", "d", "ge"])
def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(runner, phase):
    """A batch with a NaN pixel: E's forward makes its statistics NaN, the update is skipped, and so are they."""
    nets = _networks()
    step = GaliStep(nets, load_spec("gali4"), MethodConfig(), OptimConfig(lr=1e-3), 8, ComputeConfig(kernel_impl="ref"))
    runner_step = step.step if runner == "eager" else GraphedStep(step).step
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    runner_step(x, torch.tensor(0.1), phase)  # a step taken: the statistics move
    before = _batch_norm_statistics(nets)
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    out = runner_step(poisoned, torch.tensor(0.1), phase)
    assert out["skipped_ge" if phase != "d" else "skipped_d"].item() == 1.0
    after = _batch_norm_statistics(nets)
    assert [key for key in before if not torch.equal(after[key], before[key])] == []
    runner_step(x, torch.tensor(0.1), phase)  # the next step that is taken moves them again
    moved = _batch_norm_statistics(nets)
    assert all(moved[key] > before[key] for key in before if key.endswith("num_batches_tracked"))


def test_a_checkpoint_with_a_non_finite_tensor_is_refused_naming_it(tmp_path):
    bundle = _bundle()
    bundle.nets.G.state_dict()["net.1.running_var"][3] = float("nan")
    with pytest.raises(GaliError) as info:
        bundle.save(tmp_path / "checkpoint-0000000064.pt")
    message = str(info.value)
    assert message.startswith("checkpoint refused: G.net.1.running_var holds non-finite values (NaN or inf);")
    assert "Lower the learning rate (optim.lr) and resume from an earlier checkpoint" in message
    assert list(tmp_path.iterdir()) == []


def _save_past_the_file_size_limit(folder: str, limit: int) -> str:
    """In a child process: a checkpoint larger than RLIMIT_FSIZE; returns the GaliError's message."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the child
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        save_checkpoint(Path(folder) / "checkpoint-0000000002.pt", {"w": torch.zeros(2 * limit // 4)})
    except GaliError as exc:
        return str(exc)
    raise AssertionError("a checkpoint past the file size limit was written")


def test_a_write_past_the_file_size_limit_is_the_full_disk_message_and_leaves_no_partial_file(tmp_path):
    earlier = tmp_path / "checkpoint-0000000001.pt"
    earlier.write_bytes(b"an earlier checkpoint")
    message = run_isolated(_save_past_the_file_size_limit, str(tmp_path), MiB, timeout=120)
    assert message.startswith(
        f"no space left on the device of {tmp_path} while writing checkpoint-0000000002.pt: the partial file "
        "was removed and the earlier checkpoints are intact; free space there (or lower run.keep_checkpoints)"
    )
    assert message.endswith("(the system said: File too large)")
    assert list(tmp_path.iterdir()) == [earlier] and earlier.read_bytes() == b"an earlier checkpoint"


@contextlib.contextmanager
def _small_file_system(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (root only: CI runs as root), skipped where mounting is refused."""
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        refused = (mounted.stderr.strip() or f"mount exited {mounted.returncode}") if mounted.returncode else ""
    except FileNotFoundError:
        refused = "no mount command"
    if refused:
        pytest.skip(
            f"cannot mount a {size} tmpfs here ({refused}; it needs root); the file size limit test "
            "(test_a_write_past_the_file_size_limit_...) covers a write that runs out of room"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_is_refused_before_the_write_and_reported_during_it(tmp_path):
    """On a 24 MiB tmpfs: a 10 MiB checkpoint is refused up front (10 MiB + the 16 MiB margin do not fit);
    one whose tensors are small but whose pickled part is 30 MiB passes that check and fills the disk."""
    with _small_file_system(tmp_path / "disk", "24m") as disk:
        earlier = save_checkpoint(disk / "checkpoint-0000000001.pt", {"w": torch.zeros(4)})
        with pytest.raises(GaliError) as up_front:
            save_checkpoint(disk / "checkpoint-0000000002.pt", {"w": torch.zeros(10 * MiB // 4)})
        assert str(up_front.value).startswith(
            f"no space left on the device of {disk} for checkpoint-0000000002.pt: nothing was written and the "
            "earlier checkpoints are intact"
        )
        with pytest.raises(GaliError) as during:
            save_checkpoint(disk / "checkpoint-0000000003.pt", {"w": torch.zeros(4), "notes": "x" * (30 * MiB)})
        assert str(during.value).startswith(
            f"no space left on the device of {disk} while writing checkpoint-0000000003.pt: the partial file was "
            "removed and the earlier checkpoints are intact"
        )
        assert str(during.value).endswith("(the system said: No space left on device)")
        assert list(disk.iterdir()) == [earlier]
        assert torch.load(earlier, weights_only=True)["w"].shape == (4,)
