"""The synthetic backend: device-resident random batches of the contract."""

from __future__ import annotations

import pytest
import torch

from gali.pipelines import Pipeline, check_batch
from gali.pipelines.synthetic import SyntheticPipeline


def synthetic(**kwargs: object) -> SyntheticPipeline:
    options: dict = {"num_images": 40, "resolution": 8, "batch_size": 4, "device": "cpu", "seed": 0}
    options.update(kwargs)
    return SyntheticPipeline(**options)


def test_batches_meet_the_contract() -> None:
    p = synthetic(num_images=42, num_classes=5)
    assert isinstance(p, Pipeline)
    assert len(p) == 10 and p.num_images == 42 and p.class_names == ["0", "1", "2", "3", "4"]
    batches = list(p)
    assert len(batches) == 10
    for batch in batches:
        check_batch(batch, batch_size=4, resolution=8, device="cpu", num_classes=5)
    labels = torch.cat([b.labels for b in batches])
    assert labels.unique().numel() == 5
    xs = torch.stack([b.x for b in batches])
    assert xs.min() < -0.99 and xs.max() > 0.99 and abs(float(xs.mean())) < 0.05


def test_stream_depends_on_seed_epoch_and_rank() -> None:
    def first(p: SyntheticPipeline) -> torch.Tensor:
        return next(iter(p)).x

    a = synthetic()
    assert torch.equal(first(a), first(synthetic())) and torch.equal(first(a), first(a))
    a.set_epoch(1)
    assert not torch.equal(first(a), first(synthetic()))
    assert not torch.equal(first(synthetic(seed=1)), first(synthetic()))
    r0, r1 = synthetic(rank=0, world_size=2), synthetic(rank=1, world_size=2)
    assert len(r0) == len(r1) == 5 and not torch.equal(first(r0), first(r1))


def test_rejects_fewer_images_than_one_batch_per_rank() -> None:
    with pytest.raises(ValueError, match="less than one batch"):
        synthetic(num_images=7, world_size=2)


def test_a_pass_started_mid_epoch_is_the_tail_of_the_full_pass() -> None:
    full, resumed = synthetic(), synthetic()
    full.set_epoch(2)
    resumed.set_epoch(2, start_batch=3)
    want, got = list(full), list(resumed)
    assert len(got) == len(want) - 3
    for a, b in zip(got, want[3:], strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="start_batch must be in"):
        resumed.set_epoch(2, start_batch=-1)


def test_channels_last_draws_into_channels_last_memory() -> None:
    batch = next(iter(synthetic(channels_last=True)))
    assert batch.x.is_contiguous(memory_format=torch.channels_last) and not batch.x.is_contiguous()
    check_batch(batch, batch_size=4, resolution=8, device="cpu", num_classes=10)
    assert torch.equal(batch.x, next(iter(synthetic(channels_last=True))).x)
