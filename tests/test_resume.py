"""An interrupted run resumes from its last complete checkpoint and computes what the uninterrupted run did."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import gali.engine.loop.checkpoint as checkpoint_module
from gali.engine.cli import main
from gali.engine.config import section_names
from gali.engine.errors import GaliError
from gali.engine.loop.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.train import ResumePoint, _check_resume_point, resume, train

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
    # the interruption came from the 0.64 checkpoint's background write, after its snapshot record was logged
    assert [r["kimg"] for r in records if r.get("event") == "snapshot"] == [0.64, 1.28, 1.92, 2.016]
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


# -- what a resume may change (issue 29, items 5 and 8) ---------------------------------------------------------------
# A resume keeps every key of the [model] and [method] sections and, mid-epoch, run.seed; every other key may change.
# The keys are walked from the sections' dataclasses, so a key added there is covered with no change here.


def _other_value(value):
    """A value of the same kind that differs from ``value`` (validity does not matter: the check compares)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return "other" if value is None else f"{value}-other"


def _resume_point(saved: dict, iteration: int) -> ResumePoint:
    """A checkpoint ``iteration`` steps of 32 images into a run of 44 batches per epoch, with config ``saved``."""
    state = {"config": saved, "iteration": iteration, "images_seen": 32 * iteration, "epoch": -(-iteration // 44)}
    return ResumePoint(Path("runs/00000-demo") / checkpoint_name(32 * iteration), state)


def _section_keys(cfg, sections) -> list[tuple[str, str]]:
    return [(s, f.name) for s in sections for f in dataclasses.fields(getattr(cfg, s))]


def test_a_resume_refuses_a_change_of_every_model_and_method_key_by_name():
    cfg = load_config("demo", ["run.batch_size=32"])
    keys = _section_keys(cfg, ("model", "method"))
    assert {"label_classes", "unary_heads", "encoder_block", "latent_dim"} <= {k for s, k in keys if s == "model"}
    assert {"tuples", "objective", "loss_weights", "feature_model"} <= {k for s, k in keys if s == "method"}
    for section, key in keys:
        saved = cfg.to_dict()
        saved[section][key] = _other_value(saved[section][key])
        with pytest.raises(
            GaliError, match=rf"holds networks for other values of {section}\.{key}; a resumed run keeps"
        ):
            _check_resume_point(_resume_point(saved, 44), cfg, 44)  # at an epoch boundary too
    saved = cfg.to_dict()
    del saved["model"]["encoder_block"], saved["method"]["feature_model"]  # a checkpoint from before these keys
    _check_resume_point(_resume_point(saved, 20), cfg, 44)  # ... had their defaults
    cfg.model.encoder_block = "revnet"
    with pytest.raises(GaliError, match=r"model\.encoder_block: 'bottleneck' in the checkpoint, 'revnet' asked"):
        _check_resume_point(_resume_point(saved, 20), cfg, 44)


def test_a_resume_may_change_every_key_outside_model_and_method_but_the_seed_mid_epoch():
    cfg = load_config("demo", ["run.batch_size=32"])
    for section, key in _section_keys(cfg, [s for s in section_names(cfg) if s not in ("model", "method")]):
        saved = cfg.to_dict()
        saved[section][key] = _other_value(saved[section][key])
        if (section, key) != ("run", "seed"):
            _check_resume_point(_resume_point(saved, 20), cfg, 44)  # run.kimg, optim.lr, compute.*, data.workers ...
            continue
        with pytest.raises(GaliError, match=r"mid-epoch \(batch 20 of 44 of epoch 1\) by a run with run.seed=1; run"):
            _check_resume_point(_resume_point(saved, 20), cfg, 44)
        _check_resume_point(_resume_point(saved, 44), cfg, 44)  # at an epoch boundary no epoch is split
        _check_resume_point(_resume_point(saved, 88), cfg, 44)


SHORT = [item for item in TINY if not item.startswith(("run.kimg", "run.tick_kimg", "run.snapshot_kimg"))]
REFUSED = ["model.latent_dim=16", "method.objective=minimax", "method.instance_noise=0.3", "method.mask_fill=-1"]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, cache) -> Path:
    """A run folder whose one checkpoint is 1 step (of 44) into the first epoch (read only: tests take copies)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(cache))
    run_dir = tmp_path_factory.mktemp("one-step") / "run"
    assert main(["train", *SHORT, "run.kimg=0.032", "run.snapshot_kimg=0.032", f"run.dir={run_dir}"]) == 0
    mp.undo()
    return run_dir


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("override", [*REFUSED, "run.seed=5"])
def test_a_refused_resume_exits_2_naming_the_key_and_writes_nothing(
    one_step, tmp_path, monkeypatch, capsys, cache, override
):
    """Through the CLI, from a checkpoint written mid-epoch: exit 2, the key named, the folder as it was. Before
    issue 29 only model.latent_dim of these was refused; the others trained on."""
    monkeypatch.setenv("GALI_CACHE", str(cache))
    run_dir = shutil.copytree(one_step, tmp_path / "run")
    before = _contents(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "run.kimg=0.064", override]) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "Traceback" not in err
    assert _contents(run_dir) == before


def test_a_resume_may_change_the_learning_rate_and_the_workers(one_step, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("GALI_CACHE", str(cache))
    run_dir = shutil.copytree(one_step, tmp_path / "run")
    assert main(["train", "--resume", str(run_dir), "run.kimg=0.064", "optim.lr=0.0001", "data.workers=1"]) == 0
    assert load_checkpoint(run_dir / checkpoint_name(64))[1]["config"]["optim"]["lr"] == 0.0001


def test_a_resume_from_an_older_checkpoint_moves_the_abandoned_records_aside(tmp_path, monkeypatch):
    """Issue 29 item 4: metrics.jsonl is cut at the resume point, its tail kept in metrics.abandoned-<kimg>.jsonl, so
    the rerun's records follow once (no kimg logged twice)."""
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "job"
    tiny = [*TINY, "run.tick_kimg=0.032", "run.snapshot_kimg=0.064", "run.keep_checkpoints=0"]
    assert main(["train", *tiny, "run.kimg=0.128", f"run.dir={run_dir}"]) == 0
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert main(["train", "--resume", str(run_dir / "checkpoint-0000000064.pt")]) == 0
    abandoned = (run_dir / "metrics.abandoned-0.064.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(line)["kimg"] for line in abandoned] == [0.096, 0.128, 0.128, 0.128]  # 2 ticks, snapshot, end
    assert before == [*(run_dir / "metrics.jsonl").read_text().splitlines()[: len(before) - len(abandoned)], *abandoned]
    ticks = [r["kimg"] for r in records if "loss_d" in r]
    assert ticks == [0.032, 0.064, 0.096, 0.128]
