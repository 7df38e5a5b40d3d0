"""Runs that scale out: torchrun ranks on the CPU (gloo) train one model, resume at another world size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gali.engine.cli import main
from gali.engine.errors import ConfigError
from gali.engine.loop.checkpoint import load_checkpoint
from gali.engine.loop.distributed import World, init_world, local_batch_size
from tests.test_snapshot_metrics import InceptionLike

WORKER = Path(__file__).with_name("distributed_worker.py")
# 1,437 digits training images: 22 global batches of 64 per epoch; snapshots every 4 steps (256 images).
TINY = [
    "run.device=cpu",
    "model.width=0.125",
    "model.latent_dim=8",
    "run.batch_size=64",
    "data.workers=0",
    "run.kimg=0.512",
    "run.tick_kimg=0.128",
    "run.snapshot_kimg=0.256",
    "run.grid_size=2",
    "run.tensorboard=off",
    "run.progress=lines",
    "run.identity_images=0",
]


def torchrun(*args: str, ranks: int = 2, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# The snapshots' held-out figures with the identity classifier, and FID of 250 samples against 250 test images (an
# Inception stand-in): 359 test images make 4 evaluation batches of 100, 250 images 3, shared by the ranks. Contiguous
# networks, as gali eval loads them: in channels-last layout the convolutions differ in the last bits (measured:
# recon_mse 2e-10 apart), which would hide what the test compares.
SNAPSHOT_FIGURES = [
    "run.identity_images=5000",
    "run.snapshot_metrics=fid",
    "run.snapshot_metric_images=250",
    "compute.channels_last=false",
]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank run of the demo, with every rank's state dumped at each checkpoint."""
    out = tmp_path_factory.mktemp("two-ranks")
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(tmp_path_factory.mktemp("cache")))
    inception = out / "inception.pt"
    torch.jit.save(torch.jit.script(InceptionLike()), str(inception))
    figures = [*SNAPSHOT_FIGURES, f"run.snapshot_inception={inception}"]
    done = torchrun(str(WORKER), "train", str(out), *TINY, *figures, f"run.out_dir={out / 'runs'}", cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield out, done
    mp.undo()


@pytest.mark.slow
def test_two_ranks_train_one_model_with_one_reduction_per_side_per_step(two_rank_run):
    out, done = two_rank_run
    dumps = sorted(out.glob("rank0-*.pt"))
    assert [p.name for p in dumps] == ["rank0-0000000256.pt", "rank0-0000000512.pt"]
    for rank0 in dumps:  # bit-identical networks and optimizer states on both ranks
        a, b = (
            torch.load(rank0, weights_only=True),
            torch.load(rank0.with_name(rank0.name.replace("rank0", "rank1")), weights_only=True),
        )
        for name in ("G", "E", "D"):
            assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        for side in ("opt_d", "opt_ge"):
            for index, state in a[side]["state"].items():
                assert all(torch.equal(v, b[side]["state"][index][k]) for k, v in state.items()), f"{side}[{index}]"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["reductions"] for r in records] == [2 * 8, 2 * 8]  # 8 steps of 64 images, D and G/E each
    run_dirs = list((out / "runs").iterdir())
    assert len(run_dirs) == 1 and records[0]["run_dir"] == records[1]["run_dir"] == str(run_dirs[0])
    ticks = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [t["kimg"] for t in ticks if "event" not in t] == [0.128, 0.256, 0.384, 0.512]  # one writer
    assert done.stdout.count("done: 0.512 kimg") == 1  # rank 1 prints nothing
    # no rank ends (and tears down its process group) before rank 0 has written the last checkpoint
    assert records[0]["checkpoints_at_return"] == records[1]["checkpoints_at_return"]
    assert records[1]["checkpoints_at_return"][-1] == "checkpoint-0000000512.pt"


@pytest.mark.slow
def test_two_ranks_share_a_snapshot_and_measure_what_one_process_does(two_rank_run):
    """Issue 23 item 5: each rank measures its block of the snapshot's held-out images and samples; rank 0's
    combined figures are those of ``gali eval`` of the checkpoint in one process, over the same images."""
    out, _ = two_rank_run
    run_dir = next((out / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    snapshot = [r for r in records if r.get("event") == "snapshot"][-1]
    checkpoint = run_dir / "checkpoint-0000000512.pt"
    metrics = ["--metrics", "pixel-mse,recon-identity,fid", "--identity-images", "5000"]
    fid = ["--inception", str(out / "inception.pt"), "--fid-samples", "250", "--fid-reference-images", "250"]
    assert main(["eval", str(checkpoint), *metrics, *fid]) == 0
    results = json.loads(checkpoint.with_suffix(".eval.json").read_text())["metrics"]
    assert snapshot["kimg"] == 0.512 and snapshot["images_test"] == results["pixel-mse"]["images"] == 359
    assert snapshot["recon_mse_test"] == pytest.approx(results["pixel-mse"]["image_mean"], rel=1e-12)
    assert snapshot["identity_test"] == results["recon-identity"]["accuracy"]
    assert snapshot["identity_nearest_test"] == results["recon-identity"]["nearest"]
    assert snapshot["fid"] == results["fid"]["value"]
    assert snapshot["metric_images"] == {"generated": 250, "real": 250, "split": "test"}


@pytest.mark.slow
def test_checkpoints_resume_at_another_world_size(two_rank_run, tmp_path):
    out, _ = two_rank_run
    run_dir = next((out / "runs").iterdir())
    assert main(["train", "--resume", str(run_dir), "run.kimg=0.768"]) == 0  # 2 ranks -> 1
    state = load_checkpoint(sorted(run_dir.glob("checkpoint-*.pt"))[-1])[1]
    assert state["images_seen"] == 768 and state["iteration"] == 12 and state["world_size"] == 1
    done = torchrun("-m", "gali", "train", "--resume", str(run_dir), "run.kimg=1.024", cwd=tmp_path)  # 1 -> 2
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint-0000000768.pt at 0.768 kimg (epoch 1, batch 12)" in done.stdout
    state = load_checkpoint(sorted(run_dir.glob("checkpoint-*.pt"))[-1])[1]
    assert state["images_seen"] == 1024 and state["world_size"] == 2 and len(state["rng_ranks"]) == 2


@pytest.mark.numerics
@pytest.mark.slow
def test_two_rank_gradients_are_the_mean_of_each_rank_alone(tmp_path):
    done = torchrun(str(WORKER), "gradients", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"gradients-rank{r}.pt", weights_only=True) for r in range(2)]
    for i, together in enumerate(ranks[0]["together"]):
        mean = (ranks[0]["alone"][i] + ranks[1]["alone"][i]) / 2
        assert torch.equal(together, ranks[1]["together"][i])  # every rank steps with the same gradient
        # measured: equal to the last bit (gloo sums two ranks exactly, then both divide by 2)
        torch.testing.assert_close(together, mean, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["alone"], ranks[1]["alone"], strict=True))


def test_one_rank_with_an_infinite_loss_makes_every_rank_skip(tmp_path):
    """Issue 22, finding 12: a rank's own non-finite loss (its gradient finite) must not let the others step."""
    done = torchrun(str(WORKER), "infinite-loss", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"infinite-loss-rank{r}.json").read_text()) for r in range(2)]
    assert records == [{"skipped_d": 1.0, "skipped_ge": 1.0, "moved": False}] * 2


@pytest.mark.parametrize("data", ["synthetic", "slow"])
def test_every_tick_reports_data_wait_and_step_times_over_the_ranks(data, tmp_path):
    """Issue 23: data_wait is the tick's fraction of time spent waiting for a batch; step_ms_p50/p95 pool both ranks;
    with run.mfu=on, mfu is the step's model FLOP/s over the ranks' peak (on a CPU, the measured fp32 matmul rate)."""
    args = [*TINY, "data.backend=synthetic", "run.kimg=0.384", "run.snapshot_kimg=100", "run.mfu=on"]
    args.append(f"run.out_dir={tmp_path}")
    if data == "slow":  # the digits from the main process, every batch 2 s late (data_wait above 0.5 even at 2 s steps)
        done = torchrun(
            str(WORKER), "slow-data", str(tmp_path), *TINY, "run.kimg=0.384", f"run.out_dir={tmp_path}", cwd=tmp_path
        )
    else:
        done = torchrun("-m", "gali", "train", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in next(tmp_path.glob("*/metrics.jsonl")).read_text().splitlines()]
    ticks = [r for r in records if "event" not in r]
    assert len(ticks) == 3
    for tick in ticks:
        assert 0 <= tick["data_wait"] <= 1 and 0 < tick["step_ms_p50"] <= tick["step_ms_p95"]
        assert (0 < tick["mfu"] < 1) if data == "synthetic" else "mfu" not in tick  # run.mfu=auto: off on a CPU
        assert tick["data_wait"] > 0.5 if data == "slow" else tick["data_wait"] < 0.1, tick
        if data == "slow":
            assert tick["step_ms_p50"] >= 2000  # a step's wall time includes its wait


def test_a_global_batch_the_ranks_cannot_share_is_refused_with_sizes_that_work():
    with pytest.raises(ConfigError, match=r"run\.batch_size.*got 33, which 2 ranks cannot share.*e\.g\. 32, 34"):
        local_batch_size(33, World(size=2))
    assert local_batch_size(64, World(size=2)) == 32


def test_cuda_ranks_without_a_gpu_are_refused(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"run\.device.*no CUDA device"):
        init_world("cuda")


@pytest.mark.slow
def test_an_indivisible_batch_under_torchrun_stops_before_any_work(tmp_path):
    done = torchrun("-m", "gali", "train", *TINY, "run.batch_size=33", f"run.out_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert done.returncode != 0 and "2 ranks cannot share evenly" in done.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_python_dash_m_gali_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "gali", "presets"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "tuple specs:" in done.stdout
