"""The batch contract every pipeline backend (torch, DALI, synthetic) keeps.

A pipeline yields, for one epoch, ``len(pipeline)`` batches of exactly ``batch_size`` images (the
incomplete last batch is dropped, so shapes are static and a captured step can replay them):

- ``x``: float32, shape (B, 3, R, R), contiguous or channels-last (``data.channels_last``), values in [-1, 1],
  already on the training device;
- ``labels``: int64, shape (B,), on the same device, in ``[0, len(class_names))``; ``None`` where
  the data has no labels.

``set_epoch(epoch, start_batch)`` fixes the order of the next epoch from (seed, epoch) alone and
starts the next pass at batch ``start_batch`` of it, so a run resumed mid-epoch sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gali.engine.errors import DataError


@dataclass
class Batch:
    """One batch of the contract: images in [-1, 1] on the device, and labels where known."""

    x: Tensor  # float32 (B, 3, R, R) in [-1, 1] on the training device
    labels: Tensor | None  # int64 (B,) on the same device, or None


@runtime_checkable
class Pipeline(Protocol):
    """What the engine needs from a data backend.

    Iterating yields the ``Batch``es of one epoch for this rank; ``len()`` is the number of batches
    per epoch (the same on every rank); ``set_epoch`` reshuffles deterministically from
    (seed, epoch) and makes the next pass start at batch ``start_batch`` (0 to ``len``) of that
    epoch. ``num_images`` counts the images of the whole split (all ranks).
    """

    num_images: int
    resolution: int
    batch_size: int
    class_names: list[str]

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


def check_start_batch(start_batch: int, batches: int) -> None:
    """``start_batch`` must name a batch of the epoch, or its end."""
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch must be in [0, {batches}] (the batches of one epoch), got {start_batch}")


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    """True if ``actual`` is ``expected``; an expected device without index matches any index."""
    if actual.type != expected.type:
        return False
    if expected.index is None:
        return True
    return actual.index == expected.index or (actual.index is None and expected.index == 0)


def check_batch(
    batch: Batch,
    *,
    batch_size: int,
    resolution: int,
    device: torch.device | str,
    num_classes: int | None = None,
) -> None:
    """Raise ``DataError`` naming the first way ``batch`` breaks the batch contract.

    Checks type, shape, dtype, device, contiguity and the value range of ``x`` (no NaN/inf, within
    [-1, 1]) and of ``labels`` (within ``[0, num_classes)`` when ``num_classes`` is given). The
    value checks read the tensors back to the host, so call this on a first batch, not every step.
    """
    where = "batch contract violated"
    if not isinstance(batch, Batch):
        raise DataError(f"{where}: expected a gali.pipelines.Batch, got {type(batch).__name__}")
    device = torch.device(device)
    x = batch.x
    if not isinstance(x, Tensor):
        raise DataError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    expected_shape = (batch_size, 3, resolution, resolution)
    if tuple(x.shape) != expected_shape:
        raise DataError(f"{where}: x has shape {tuple(x.shape)}, expected {expected_shape} (B, 3, R, R)")
    if x.dtype != torch.float32:
        raise DataError(f"{where}: x has dtype {x.dtype}, expected torch.float32")
    if not _same_device(x.device, device):
        raise DataError(f"{where}: x is on {x.device}, expected the training device {device}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise DataError(f"{where}: x is neither contiguous nor channels-last (strides {x.stride()})")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{where}: x holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 or hi > 1.0:
        raise DataError(f"{where}: x spans [{lo:.4g}, {hi:.4g}], expected values within [-1, 1]")

    labels = batch.labels
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise DataError(f"{where}: labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if tuple(labels.shape) != (batch_size,):
        raise DataError(f"{where}: labels have shape {tuple(labels.shape)}, expected ({batch_size},)")
    if labels.dtype != torch.int64:
        raise DataError(f"{where}: labels have dtype {labels.dtype}, expected torch.int64")
    if not _same_device(labels.device, device):
        raise DataError(f"{where}: labels are on {labels.device}, expected the training device {device}")
    if num_classes is not None:
        lo_l, hi_l = int(labels.min()), int(labels.max())
        if lo_l < 0 or hi_l >= num_classes:
            raise DataError(f"{where}: labels span [{lo_l}, {hi_l}], expected within [0, {num_classes})")
