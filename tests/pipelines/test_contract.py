"""check_batch: what it accepts and how it names each contract violation; the shared epoch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gali.engine.errors import DataError
from gali.pipelines import Batch, check_batch
from gali.pipelines.contract import epoch_order


def good(batch_size: int = 4, resolution: int = 8) -> Batch:
    x = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    return Batch(x=x, labels=torch.arange(batch_size) % 3)


def test_accepts_a_good_batch_with_or_without_labels() -> None:
    check_batch(good(), batch_size=4, resolution=8, device="cpu", num_classes=3)
    check_batch(Batch(x=good().x, labels=None), batch_size=4, resolution=8, device=torch.device("cpu"))
    edges = good()
    edges.x[0, 0, 0, 0], edges.x[0, 0, 0, 1] = -1.0, 1.0
    check_batch(edges, batch_size=4, resolution=8, device="cpu")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (lambda b: Batch(x=b.x[:3], labels=b.labels[:3]), r"shape \(3, 3, 8, 8\), expected \(4, 3, 8, 8\)"),
        (lambda b: Batch(x=b.x[..., :4, :4], labels=b.labels), r"shape"),
        (lambda b: Batch(x=b.x.double(), labels=b.labels), r"dtype torch.float64"),
        (lambda b: Batch(x=b.x.to("meta"), labels=b.labels), r"on meta, expected the training device cpu"),
        (lambda b: Batch(x=b.x.transpose(2, 3), labels=b.labels), r"neither contiguous nor channels-last"),
        (lambda b: Batch(x=b.x * 3, labels=b.labels), r"expected values within \[-1, 1\]"),
        (lambda b: Batch(x=b.x + float("nan"), labels=b.labels), r"NaN"),
        (lambda b: Batch(x=b.x.numpy(), labels=b.labels), r"torch.Tensor"),
        (lambda b: Batch(x=b.x, labels=b.labels.int()), r"labels have dtype torch.int32"),
        (lambda b: Batch(x=b.x, labels=b.labels[:2]), r"labels have shape \(2,\)"),
        (lambda b: Batch(x=b.x, labels=b.labels + 5), r"labels span \[5, 7\], expected within \[0, 3\)"),
        (lambda b: (b.x, b.labels), r"expected a gali.pipelines.Batch"),
    ],
)
def test_names_each_violation(broken, message: str) -> None:
    with pytest.raises(DataError, match=r"batch contract violated: .*" + message):
        check_batch(broken(good()), batch_size=4, resolution=8, device="cpu", num_classes=3)


@pytest.mark.parametrize(
    ("masks", "num_masks", "message"),
    [
        (torch.zeros(4, 2, 8, 8, dtype=torch.uint8), None, r"holds masks, but none were asked for"),
        (None, 2, r"masks must be a torch.Tensor"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), 2, r"masks have shape \(4, 1, 8, 8\), expected \(4, 2, 8, 8\)"),
        (torch.zeros(4, 2, 8, 8), 2, r"masks have dtype torch.float32, expected torch.uint8"),
        (torch.full((4, 2, 8, 8), 255, dtype=torch.uint8), 2, r"values up to 255"),
    ],
)
def test_names_each_mask_violation(masks, num_masks, message: str) -> None:
    batch = Batch(x=good().x, labels=good().labels, masks=masks)
    with pytest.raises(DataError, match=r"batch contract violated: .*" + message):
        check_batch(batch, batch_size=4, resolution=8, device="cpu", num_masks=num_masks)
    check_batch(
        Batch(x=batch.x, labels=None, masks=torch.ones(4, 2, 8, 8, dtype=torch.uint8)),
        batch_size=4,
        resolution=8,
        device="cpu",
        num_masks=2,
    )


def test_device_without_index_matches_any_index() -> None:
    from gali.pipelines.contract import _same_device

    cuda1 = torch.device("cuda", 1)
    assert _same_device(cuda1, torch.device("cuda")) and _same_device(cuda1, cuda1)
    assert not _same_device(cuda1, torch.device("cuda", 0)) and not _same_device(cuda1, torch.device("cpu"))


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(40, 4, 1), (50, 4, 3), (26, 4, 2), (8, 8, 1)])
def test_epoch_order_deals_whole_batches_of_one_seeded_permutation_round_robin(n, batch_size, world_size) -> None:
    order = epoch_order(n, seed=3, epoch=2, batch_size=batch_size, world_size=world_size)
    per_rank = n // (batch_size * world_size) * batch_size
    assert order.shape == (world_size, per_rank) and len(set(order.reshape(-1).tolist())) == order.size
    permutation = np.random.default_rng([3, 2]).permutation(n)
    for rank in range(world_size):
        assert order[rank].tolist() == permutation[: per_rank * world_size][rank::world_size].tolist()
    again = epoch_order(n, seed=3, epoch=2, batch_size=batch_size, world_size=world_size)
    assert np.array_equal(order, again)
    assert not np.array_equal(order, epoch_order(n, seed=3, epoch=3, batch_size=batch_size, world_size=world_size))
