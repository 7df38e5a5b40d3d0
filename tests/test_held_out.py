"""The snapshots' held-out figures: every image of a bounded set (run.snapshot_images), partial batches included,
from the held-out split however small it is, and the same number of images however large the split grows."""

import json

import numpy as np
import pytest
from PIL import Image

from gali.engine.cli import main
from gali.pipelines import synthetic
from tests.test_launch import TINY


@pytest.fixture(autouse=True)
def digits_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))


def snapshot_record(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "snapshot")


def write_split(root, split: str, per_class: int) -> None:
    rng = np.random.default_rng(len(split) + per_class)
    for label in ("a", "b"):
        folder = root / split / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_a_test_split_smaller_than_a_batch_is_measured_whole(tmp_path):
    """Issue 29 item 3: 30 test images, batch 32: the figures are the test split's, over all 30 images."""
    root = tmp_path / "data"
    write_split(root, "train", 32)
    write_split(root, "test", 15)
    run_dir = tmp_path / "run"
    data = ["data.source=folder", f"data.root={root}", "run.identity_images=0"]
    assert main(["train", *TINY, *data, "run.kimg=0.064", f"run.dir={run_dir}"]) == 0
    record = snapshot_record(run_dir)
    assert record["images_test"] == 30 and "recon_mse_test" in record and not any(k.endswith("_train") for k in record)


@pytest.mark.parametrize("split_images", [10_000, 20_000])
def test_a_snapshot_measures_snapshot_images_however_large_the_split(split_images, tmp_path, monkeypatch):
    """Issue 23 item 5: with a 10,000- or 20,000-image held-out split, a snapshot reads run.snapshot_images of them
    (the host memory it keeps follows that count, not the split's size)."""
    monkeypatch.setitem(synthetic.SPLIT_IMAGES, "test", split_images)
    run_dir = tmp_path / "run"
    overrides = ["data.backend=synthetic", "run.snapshot_images=250", "run.kimg=0.032", "run.identity_images=0"]
    assert main(["train", *TINY, *overrides, f"run.dir={run_dir}"]) == 0
    assert snapshot_record(run_dir)["images_test"] == 250


def test_a_snapshot_and_gali_eval_of_its_checkpoint_give_the_same_figures(tmp_path):
    """Issue 29: over the same images (the digits' 359 test images, the identity classifier on the same training
    images), a snapshot's held-out figures are gali eval's of the checkpoint it wrote."""
    run_dir = tmp_path / "run"
    identity = ["run.identity_images=5000"]  # all 1,438 training digits, as gali eval's default reads them
    assert main(["train", *TINY, *identity, "run.kimg=0.064", f"run.dir={run_dir}"]) == 0
    snapshot = snapshot_record(run_dir)
    checkpoint = run_dir / "checkpoint-0000000064.pt"
    metrics = ["--metrics", "pixel-mse,recon-sharpness,recon-identity", "--identity-images", "5000"]
    assert main(["eval", str(checkpoint), *metrics]) == 0
    results = json.loads(checkpoint.with_suffix(".eval.json").read_text())["metrics"]
    assert snapshot["images_test"] == results["pixel-mse"]["images"] == 359
    assert snapshot["recon_mse_test"] == pytest.approx(results["pixel-mse"]["image_mean"], rel=1e-12)
    assert snapshot["recon_sharpness_test"] == pytest.approx(results["recon-sharpness"]["image_mean"], rel=1e-12)
    assert snapshot["identity_test"] == results["recon-identity"]["accuracy"]
    assert snapshot["identity_ceiling_test"] == results["recon-identity"]["ceiling"]
