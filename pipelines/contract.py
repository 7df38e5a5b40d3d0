"""The batch contract every pipeline backend (torch, DALI, synthetic) keeps.

A pipeline yields, per epoch, ``len(pipeline)`` batches of exactly ``batch_size`` images (the last incomplete one
dropped: static shapes a captured step can replay), all on the training device:
- ``x``: float32 (B, 3, R, R) in [-1, 1], contiguous, or channels-last with ``make_pipeline(channels_last=True)``;
- ``labels``: int64 (B,) in ``[0, len(class_names))``, or ``None`` where the data has no labels;
- ``masks``: uint8 (B, M, R, R), 1 = masked (``gali.pipelines.masks``); ``None`` unless ``make_pipeline`` got ``masks``.
``set_epoch(epoch, start_batch)`` fixes the next epoch's order from (seed, epoch) alone and starts at batch
``start_batch``, so a resumed run sees an uninterrupted one's batches. Shared rules: ``batches_per_rank``,
``check_split_size``, ``epoch_order`` (torch's and DALI's), ``pixels_to_x``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from gali.engine.errors import DataError


@dataclass
class Batch:
    """One batch of the contract: images in [-1, 1] on the device, and labels where known."""

    x: Tensor  # float32 (B, 3, R, R) in [-1, 1] on the training device
    labels: Tensor | None  # int64 (B,) on the same device, or None
    masks: Tensor | None = None  # uint8 (B, M, R, R), 1 = masked, on the same device, or None


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


def check_rank(rank: int, world_size: int) -> None:
    """``rank`` must be one of the ``world_size`` ranks (``ValueError``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def batches_per_rank(num_images: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank yields per epoch: the split cut to whole batches on every rank."""
    return num_images // (batch_size * world_size)


def check_split_size(where: str, num_images: int, batch_size: int, world_size: int) -> None:
    """``DataError`` unless the split ``where`` (named in the message) gives every rank one batch."""
    if num_images < batch_size:
        raise DataError(
            f"{where} holds {num_images} images, fewer than one batch of {batch_size}; "
            "lower the batch size or add images"
        )
    if num_images // world_size < batch_size:
        raise DataError(
            f"{where} holds {num_images} images: {num_images // world_size} per rank over {world_size} ranks, "
            f"fewer than one batch of {batch_size}; lower the batch size, use fewer ranks, or add images"
        )


def epoch_order(num_items: int, *, seed: int, epoch: int, batch_size: int, world_size: int) -> np.ndarray:
    """The item indices of epoch ``epoch`` for every rank: int64 (world_size, per_rank), row r is rank r's order.

    A permutation of ``range(num_items)`` drawn from numpy's PCG64 seeded by (seed, epoch), the same
    on every rank, cut to ``per_rank * world_size`` entries (``per_rank`` = ``batches_per_rank`` whole
    batches) and dealt round-robin: rank r takes entries r, r + world_size, ... The remainder (fewer
    than ``batch_size * world_size`` items) is skipped this epoch and falls elsewhere in the next.
    """
    per_rank = batches_per_rank(num_items, batch_size, world_size) * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    return order[: per_rank * world_size].reshape(per_rank, world_size).T


def pixels_to_x(pixels: Tensor, device: torch.device, *, channels_last: bool) -> Tensor:
    """uint8 (B, 3, R, R) pixels to the contract's ``x``: float32 in [-1, 1] on ``device``.

    The copy to the device is non-blocking (asynchronous from pinned memory); the arithmetic runs
    there. A multiply, not a divide: CUDA divides by a scalar through its reciprocal, so this keeps CPU
    and CUDA batches bit-identical; 0 and 255 still map exactly to -1 and 1. ``channels_last`` gives
    ``x`` channels-last strides (no extra copy where ``pixels`` already have them).
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = pixels.to(device, non_blocking=True)
    return x.to(torch.float32, memory_format=layout).mul_(1 / 127.5).sub_(1.0)


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
    num_masks: int | None = None,
) -> None:
    """Raise ``DataError`` naming the first way ``batch`` breaks the batch contract.

    Checks type, shape, dtype, device, contiguity and the value range of ``x`` (no NaN/inf, within
    [-1, 1]), of ``labels`` (within ``[0, num_classes)`` when ``num_classes`` is given) and of ``masks``
    (present with M masks of 0s and 1s when ``num_masks`` is given, absent when it is None). The
    value checks read the tensors back to the host, so call this on a first batch, not every step.
    """
    where = "batch contract violated"
    if not isinstance(batch, Batch):
        raise DataError(f"{where}: expected a gali.pipelines.Batch, got {type(batch).__name__}")
    device = torch.device(device)
    x = batch.x
    _check_tensor(where, "x", x, (batch_size, 3, resolution, resolution), "(B, 3, R, R)", torch.float32, device)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise DataError(f"{where}: x is neither contiguous nor channels-last (strides {x.stride()})")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{where}: x holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 or hi > 1.0:
        raise DataError(f"{where}: x spans [{lo:.4g}, {hi:.4g}], expected values within [-1, 1]")

    _check_masks(batch.masks, where, (batch_size, num_masks, resolution, resolution), device)
    labels = batch.labels
    if labels is None:
        return
    _check_tensor(where, "labels", labels, (batch_size,), "(B,)", torch.int64, device)
    if num_classes is not None:
        lo_l, hi_l = int(labels.min()), int(labels.max())
        if lo_l < 0 or hi_l >= num_classes:
            raise DataError(f"{where}: labels span [{lo_l}, {hi_l}], expected within [0, {num_classes})")


def _check_tensor(
    where: str,
    name: str,
    t: object,
    shape: tuple[int | None, ...],
    layout: str,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """``DataError`` unless the batch's ``name`` is a tensor of ``shape`` (``layout`` names its axes), ``dtype``,
    on ``device``."""
    has, are = ("have", "are") if name.endswith("s") else ("has", "is")
    if not isinstance(t, Tensor):
        raise DataError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise DataError(f"{where}: {name} {has} shape {tuple(t.shape)}, expected {shape} {layout}")
    if t.dtype != dtype:
        raise DataError(f"{where}: {name} {has} dtype {t.dtype}, expected {dtype}")
    if not _same_device(t.device, device):
        raise DataError(f"{where}: {name} {are} on {t.device}, expected the training device {device}")


def _check_masks(
    masks: Tensor | None, where: str, expected: tuple[int, int | None, int, int], device: torch.device
) -> None:
    if expected[1] is None:
        if masks is not None:
            raise DataError(f"{where}: the batch holds masks, but none were asked for")
        return
    _check_tensor(where, "masks", masks, expected, "(B, M, R, R)", torch.uint8, device)
    if int(masks.max()) > 1:
        raise DataError(f"{where}: masks hold values up to {int(masks.max())}, expected 0 (kept) and 1 (masked)")
