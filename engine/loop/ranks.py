"""How ``torchrun -m gali eval`` and the training snapshots share a pass among the ranks: blocks of whole batches.

A pass over ``n`` images (the evaluation split, or ``--fid-samples`` generated ones) in batches of ``batch_size``
is cut into K = ceil(n / batch_size) batches, the same batches for any number of ranks (the last one partial);
rank r takes batches ``K·r // W`` to ``K·(r + 1) // W``. Every batch is thus computed on the same images by some
rank, and rank 0 reads the ranks' results in rank order, which is batch order: the lists and feature rows it
combines are those of one process, so only the per-batch forward passes run elsewhere.
A rank seeks to its block (``Pipeline.set_epoch(0, start_batch)``: the images before it are not decoded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm import tqdm

from gali.engine.loop.distributed import World
from gali.pipelines import Batch, SplitBatches

T = TypeVar("T")


@dataclass(frozen=True)
class Block:
    """This rank's batches ``first .. stop - 1`` of a pass, images ``start .. end - 1`` of ``images``."""

    first: int
    stop: int
    start: int
    end: int
    images: int

    @property
    def batches(self) -> int:
        return self.stop - self.first


def rank_block(images: int, batch_size: int, world: World) -> Block:
    """The block of whole batches that ``world.rank`` computes in a pass over ``images`` images."""
    count = -(-images // batch_size)
    first, stop = count * world.rank // world.size, count * (world.rank + 1) // world.size
    return Block(first, stop, first * batch_size, min(stop * batch_size, images), images)


def read_block(batches: SplitBatches, block: Block) -> Iterator[tuple[int, int, Batch]]:
    """(batch index, index of its first image, batch) of ``block`` of the split that ``batches`` reads.

    The pipeline reads the split in loader batches that divide it (``SplitBatches``); this seeks to the loader
    batch holding the block's first image, drops the images before it, and cuts the rest into ``batches.batch_size``.
    """
    if not block.batches:
        return
    pipeline, size = batches.pipeline, batches.batch_size
    loader = pipeline.num_images // len(pipeline)
    pipeline.set_epoch(0, block.start // loader)
    held: list[Batch] = []
    skip, index, start = block.start % loader, block.first, block.start
    for loaded in pipeline:
        held.append(loaded)
        joined = _rows(_join(held), slice(skip, None))
        skip = 0
        while joined.x.shape[0] >= size or (joined.x.shape[0] and start + joined.x.shape[0] >= block.end):
            take = min(size, block.end - start)
            yield index, start, _rows(joined, slice(0, take))
            index, start = index + 1, start + take
            if start >= block.end:
                return
            joined = _rows(joined, slice(take, None))
        held = [joined]


def _join(parts: list[Batch]) -> Batch:
    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(b, name) for b in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    return Batch(x=cat("x"), labels=cat("labels"), masks=cat("masks"))


def _rows(batch: Batch, rows: slice) -> Batch:
    def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows]

    return Batch(x=batch.x[rows], labels=cut(batch.labels), masks=cut(batch.masks))


def progress(items: Iterable[T], *, total: int, what: str, world: World) -> Iterator[T]:
    """``items`` with a tqdm bar (count, rate, ETA) on rank 0's terminal; nothing on other ranks or off a terminal.

    Rank 0's block is its share of the pass; the other ranks' blocks differ by at most one batch.
    """
    bar = tqdm(items, total=total, desc=what, unit="batch", leave=False, disable=True if not world.is_main else None)
    yield from bar
