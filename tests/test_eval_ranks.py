"""torchrun -m gali eval: 2 gloo ranks on the CPU give the figures of one process (issue 24, item 1).

Each rank measures a block of whole evaluation batches (of the split and of the samples); rank 0 gathers the
per-batch figures and the feature rows in batch order and combines them as one process does. So:

- counts and accuracies (images, batches, recon-identity's accuracy, ceiling and nearest fraction) are equal;
- pixel-MSE's mean ± std is the float64 mean and std of the same per-batch values in the same order. Had the order
  differed, the bound would be that of summing K positive float64 values: a relative error below K·2⁻⁵² of the
  mean (K = 4 batches here), the tolerance asserted; no reordering happens, so the figures come out equal;
- FID is computed on rank 0 from the gathered, not averaged, Inception rows: the reference rows are compared bit
  for bit (the cache file each run writes), and FID within 1e-9 relative, which covers float64 moments of
  n ≤ 359 rows summed in another order (n·2⁻⁵² ≈ 8e-14) amplified by the matrix square root of 16×16 covariances;
- probe-logistic's training features are each rank's shards of the cache, rows equal bit for bit to the one
  process's shard (compared), and the test features are gathered in batch order: rank 0 fits the same rows in the
  same order with the same seeded minibatches on one thread, so top-1, top-5 and the L2 weight chosen are equal.

The checkpoint is trained for 0.032 kimg with test_launch's tiny overrides; a random conv net in TorchScript stands
in for Inception. Both sides run their forward passes on one thread (the ranks under OMP_NUM_THREADS=1, the one
process in the test's own with torch.set_num_threads(1)), so they compute the same batches alike.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.engine.cli import main
from gali.engine.loop.config import load_config
from gali.engine.loop.distributed import World
from gali.engine.loop.ranks import rank_block, read_block
from gali.pipelines import SplitBatches
from tests.test_launch import TINY
from tests.test_snapshot_metrics import InceptionLike

EPS64 = 2.0**-52


def _arguments(checkpoint: Path, root: Path) -> list[str]:
    return [
        *("eval", str(checkpoint), "--metrics", "pixel-mse,recon-identity,fid,probe-logistic"),
        *("--probe-logistic-images", "600", "--probe-logistic-epochs", "10"),
        *("--inception", str(root / "inception.pt"), "--inception-input-size", "64", "--fid-samples", "250"),
        *("--identity-images", "300", "--fid-cache", str(checkpoint.parent / "fid")),
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(1-process JSON, 2-rank JSON, their folders, the 2-rank run's stdout)."""
    root = tmp_path_factory.mktemp("eval-ranks")
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(root / "cache"))
    assert main(["train", *TINY, "run.kimg=0.032", f"run.dir={root / 'run'}"]) == 0
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(InceptionLike()), str(root / "inception.pt"))
    checkpoints = []
    for ranks in (1, 2):
        (root / f"ranks-{ranks}").mkdir()
        checkpoints.append(root / f"ranks-{ranks}" / "checkpoint-0000000032.pt")
        checkpoints[-1].write_bytes((root / "run" / "checkpoint-0000000032.pt").read_bytes())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same forward passes
    try:
        assert main(_arguments(checkpoints[0], root)) == 0
    finally:
        torch.set_num_threads(threads)
    mp.undo()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "gali"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GALI_CACHE": str(root / "cache")}
    done = subprocess.run(
        [*command, *_arguments(checkpoints[1], root)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    documents = [json.loads(c.with_name("checkpoint-0000000032.eval.json").read_text())["metrics"] for c in checkpoints]
    return documents[0], documents[1], [c.parent for c in checkpoints], done.stdout


def test_two_ranks_count_and_classify_exactly_as_one_process(evaluated):
    one, two, _, stdout = evaluated
    for name in ("pixel-mse", "recon-identity"):
        assert two[name]["images"] == one[name]["images"] == 359  # the digits' test split: 4 batches, one partial
    assert two["pixel-mse"]["n"] == one["pixel-mse"]["n"] == 4
    for key in ("accuracy", "ceiling", "nearest", "chance", "classes"):
        assert two["recon-identity"][key] == one["recon-identity"][key], key
    assert stdout.count("recon-identity") == 1 and stdout.count("wrote ") == 1  # rank 0 alone prints


def test_two_ranks_give_the_pixel_mse_of_one_process_up_to_summation_order(evaluated):
    one, two, _, _ = evaluated
    batches = one["pixel-mse"]["n"]
    for key in ("mean", "std"):
        assert abs(two["pixel-mse"][key] - one["pixel-mse"][key]) <= batches * EPS64 * one["pixel-mse"]["mean"], key


def test_two_ranks_gather_fids_inception_features(evaluated):
    one, two, folders, _ = evaluated
    assert two["fid"]["generated"] == one["fid"]["generated"] == 250  # 3 sample batches: 1 on rank 0, 2 on rank 1
    assert two["fid"]["reference"]["images"] == one["fid"]["reference"]["images"] == 359
    assert not one["fid"]["reference"]["cache_reused"] and not two["fid"]["reference"]["cache_reused"]
    caches = [torch.load(next((f / "fid").glob("reference-*.pt")), weights_only=True) for f in folders]
    assert torch.equal(caches[0]["features"], caches[1]["features"])  # the same rows, in the same order
    assert two["fid"]["value"] == pytest.approx(one["fid"]["value"], rel=1e-9, abs=0)


def test_two_ranks_extract_and_fit_the_logistic_probe_as_one_process(evaluated):
    one, two, folders, _ = evaluated
    for key in ("top1", "top5", "chosen_l2", "validation_top1", "train_images", "validation", "test", "classes"):
        assert two["probe-logistic"][key] == one["probe-logistic"][key], key
    assert two["probe-logistic"]["train_images"] == 600 and two["probe-logistic"]["test"] == 359
    shards = [sorted((f / "fid").glob("probe-logistic-*/features-*.npy")) for f in folders]
    assert [len(s) for s in shards] == [1, 2]  # one process's block, then each rank's: 3 batches of 100 each
    rows = [np.concatenate([np.load(path) for path in paths]) for paths in shards]
    assert rows[0].shape == (600, 8) and np.array_equal(rows[0], rows[1])


@pytest.fixture
def twelve_images(tmp_path) -> Path:
    """A folder data set whose test split of 12 images is read in one loader batch of 12."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / split / label / f"{i}.png"
                )
    return tmp_path


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_rank_blocks_read_the_batches_of_one_pass(twelve_images, ranks):
    """Blocks of whole batches of 5 (5, 5, 2), each read from inside the one loader batch of 12: together, in rank
    order, the batches of one process, the first image of each at its place; a rank past the batches reads none."""
    cfg = load_config("demo", ["data.source=folder", f"data.root={twelve_images}", "data.workers=0"])
    batches = SplitBatches(cfg.data, "test", batch_size=5, device=torch.device("cpu"), seed=0)
    assert batches.num_images == 12 and len(batches.pipeline) == 1
    whole = list(batches)
    read = []
    for rank in range(ranks):
        block = rank_block(12, 5, World(rank=rank, size=ranks))
        read += list(read_block(batches, block))
    assert [(index, start) for index, start, _ in read] == [(0, 0), (1, 5), (2, 10)]
    for (_, _, batch), expected in zip(read, whole, strict=True):
        assert torch.equal(batch.x, expected.x) and torch.equal(batch.labels, expected.labels)
