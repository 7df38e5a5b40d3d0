"""FID and KID at each snapshot (run.snapshot_metrics), with a small TorchScript stand-in for Inception: the figures
land in the snapshot's metrics.jsonl record and printed line, and a bad setting stops the run before any training."""

import json
import math

import pytest
import torch
from torch import Tensor, nn

from gali.engine.cli import main
from gali.engine.errors import ConfigError
from gali.engine.eval.protocol import METRICS
from gali.engine.loop.config import SNAPSHOT_METRICS, load_config
from tests.test_launch import TINY as LAUNCH_TINY

TINY = [*LAUNCH_TINY, "run.kimg=0.064"]  # tests/test_launch.py's tiny run, one snapshot


class InceptionLike(nn.Module):
    """Random conv features, called as model(images in [0, 255], return_features=True) -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=8, stride=8)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        return torch.relu(self.conv(img / 128 - 1)).mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def digits_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))


def test_a_snapshot_records_and_prints_fid_and_kid(tmp_path, capsys):
    inception = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(InceptionLike()), str(inception))
    run_dir = tmp_path / "run"
    metrics = ["run.snapshot_metrics=fid,kid", f"run.snapshot_inception={inception}", "run.snapshot_metric_images=40"]
    assert main(["train", *TINY, *metrics, f"run.dir={run_dir}"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (snapshot,) = [r for r in records if r.get("event") == "snapshot"]
    assert math.isfinite(snapshot["fid"]) and snapshot["fid"] > 0
    assert math.isfinite(snapshot["kid"]) and math.isfinite(snapshot["kid_std"])
    assert snapshot["metric_images"] == {"generated": 40, "real": 40, "split": "test"}
    assert f"FID {snapshot['fid']:.3f}, KID {snapshot['kid']:.5f}" in capsys.readouterr().out


@pytest.mark.parametrize("setting", [[], ["run.snapshot_inception=nowhere/inception.pt"]], ids=["unset", "no file"])
def test_fid_without_an_inception_file_is_refused_before_training(tmp_path, capsys, setting):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "run.snapshot_metrics=fid", *setting, f"run.dir={run_dir}"]) == 2
    assert "config key 'run.snapshot_inception'" in capsys.readouterr().err
    assert not run_dir.exists()  # refused before the run folder, let alone a step


def test_unknown_snapshot_metrics_are_refused_naming_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"run.snapshot_metrics.*'pixel-mse'.*accepted.*fid, kid"):
        load_config("demo", ["run.snapshot_metrics=fid,pixel-mse"])


def test_the_snapshot_metrics_are_metrics_of_gali_eval():
    assert set(SNAPSHOT_METRICS) <= set(METRICS)
