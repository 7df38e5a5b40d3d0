"""check_batch: what it accepts and how it names each contract violation."""

from __future__ import annotations

import pytest
import torch

from gali.engine.errors import DataError
from gali.pipelines import Batch, check_batch


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


def test_device_without_index_matches_any_index() -> None:
    from gali.pipelines.contract import _same_device

    cuda1 = torch.device("cuda", 1)
    assert _same_device(cuda1, torch.device("cuda")) and _same_device(cuda1, cuda1)
    assert not _same_device(cuda1, torch.device("cuda", 0)) and not _same_device(cuda1, torch.device("cpu"))
