"""The torch backend (``TorchFilePipeline``): any source on disk read with Pillow in ``DataLoader`` workers.

A source (``sources.open_split``) indexes the split; the rest is one path for all sources: the (seed, epoch) order of
``contract.epoch_order`` dealt to ranks, static batches, ``cfg.workers`` workers with ``cfg.prefetch`` batches each in
flight, pinned memory on CUDA. Images decode to 8-bit RGB with DALI's pixel values (``to_rgb``). Eval (and train without
augment): the centered square crop resized to R×R (Pillow bilinear, antialiased, as resizing the shorter side to R and
center-cropping). Train with augment: torchvision's random-resized crop (``CROP_SCALE``, ``CROP_RATIO``) resized to R×R
and a horizontal flip with probability 1/2, drawn from numpy's PCG64 seeded by (seed, epoch, item index), so the same
with any number of workers. Batches travel as uint8; ``contract.pixels_to_x`` makes x on the device. An unreadable image
stops the pass with a one-line ``DataError`` naming it, also from a worker.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.util  # registers its exit handler now: the one below, registered later, runs first
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from gali.engine.errors import DataError

from .contract import Batch, batches_per_rank, check_rank, check_split_size, check_start_batch, epoch_order, pixels_to_x
from .masks import MaskArgs, draw_masks
from .sources import SPLITS, SplitIndex, open_split

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) crop of a width×height image, as torchvision's RandomResizedCrop draws it.

    Up to 10 tries of an area fraction in ``CROP_SCALE`` and a log-uniform aspect ratio in ``CROP_RATIO``
    that fit the image, else the largest central crop with its ratio clamped into ``CROP_RATIO``.
    """
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (an opened file, any mode) decoded fully to 8-bit RGB, with the values DALI's decoder gives.

    Measured against DALI's CPU decoder (``fn.decoders.image``, output RGB; DALI 2.4):

    - 16-bit grayscale (Pillow's 'I;16', 'I;16B', 'I;16L', 'I', the last clipped to 0..65535): value v becomes
      round(v / 257), DALI's scaling, exactly (Pillow's own conversion clips at 255: such images turn white);
    - 16-bit RGB, RGBA and gray+alpha, which Pillow hands over as 8-bit 'RGB' / 'RGBA' (the high byte, v >> 8):
      as Pillow gives them, within one level of DALI's round(v / 257);
    - CMYK (JPEG): each of R, G, B is (255 - C or M or Y) · (255 - K) / 255 rounded down, DALI's arithmetic
      exactly (Pillow's conversion rounds to nearest, one level above DALI's for half the colors);
    - palette ('P', 'PA', with or without transparency): the palette's colors;
    - alpha ('LA', 'RGBA', 'PA', palette or color-key transparency) is dropped, not composited: the color
      channels as stored, as DALI's RGB output does;
    - the rest ('L', '1', 'RGB', ...): Pillow's conversion, which is DALI's (gray copied to the three channels).

    Raises what Pillow raises for a file it cannot decode (truncated, corrupt).
    """
    image.load()  # decodes the whole file: truncation fails here
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)  # uint16 in the file's byte order, or int32 for 'I'
        if mode == "I":
            values = np.clip(values, 0, 65535)
        gray = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, no ties
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "CMYK":
        ink = 255 - np.asarray(image).astype(np.uint16)  # (255 - C, 255 - M, 255 - Y, 255 - K)
        return Image.fromarray((ink[:, :, :3] * ink[:, :, 3:] // 255).astype(np.uint8))
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette with byte transparency warns when converted to RGB directly
    return image.convert("RGB")


def decode_problem(file: str | Path | BinaryIO) -> str | None:
    """None if ``file`` decodes fully to RGB (``to_rgb``) with Pillow, else the reason it does not."""
    try:
        with Image.open(file) as image:
            to_rgb(image)
    except Exception as e:  # every failure is a finding to report, not a crash
        return f"{type(e).__name__}: {e}"
    return None


def load_image(
    file: str | Path | BinaryIO,
    resolution: int,
    *,
    name: str | None = None,
    data_root: str | Path | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decode ``file`` (a path or a file object) to uint8 RGB (3, R, R).

    The image is decoded by ``to_rgb`` (every mode to 8-bit RGB, as DALI decodes it). Without ``rng``:
    centered square crop, Pillow bilinear resize to R×R. With ``rng``: random-resized
    crop and horizontal flip drawn from it (see the module doc). Raises ``DataError`` naming the image
    (``name``, default ``file``) for anything unreadable (truncated, corrupt, not an image).
    """
    try:
        with Image.open(file) as opened:
            image = to_rgb(opened)  # decodes the whole file: truncation fails here
        w, h = image.size
        if rng is not None:
            box = random_resized_crop_box(w, h, rng)
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif (w, h) != (resolution, resolution):
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
        pixels = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # any failure to decode an input file is a data problem: name the file
        check = f"`gali data check {data_root}`" if data_root is not None else "`gali data check ROOT`"
        raise DataError(
            f"cannot read image {name or file}: {type(e).__name__}: {e}. Remove or replace the file; "
            f"{check} lists every unreadable image"
        ) from e
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class _Unreadable:
    """An item (and then its batch) that a DataLoader worker could not read: its ``DataError`` message, as data.

    An exception raised in a worker comes back through torch's ``ExceptionWrapper``, whose ``reraise`` builds
    the same type from "Caught DataError in DataLoader worker process N" and the worker's whole formatted
    traceback; the original message could only be parsed back out of that text. Handed back as data, it
    arrives as it was written and the pipeline raises it as a one-line ``DataError``.
    """

    message: str


def _collate(items: Sequence[tuple[torch.Tensor, ...] | _Unreadable]) -> list[torch.Tensor] | _Unreadable:
    """``default_collate`` of the items (images, labels[, masks]), or the first unreadable one among them."""
    for item in items:
        if isinstance(item, _Unreadable):
            return item
    return default_collate(items)


class SourceDataset(Dataset):
    """Map-style dataset over a ``SplitIndex``; item (epoch, i) is (uint8 (3, R, R) tensor, int label), and
    with ``masks`` also item i's uint8 (M, R, R) masks (``masks.draw_masks``, the native operator's reference).

    ``augment_seed`` None gives the eval transform; an int draws the augmentation of item i in
    ``epoch`` from (augment_seed, epoch, i). An item that cannot be read raises its ``DataError`` in the
    main process (no workers), and is returned as ``_Unreadable`` in a DataLoader worker.
    """

    def __init__(
        self,
        index: SplitIndex,
        resolution: int,
        data_root: Path,
        augment_seed: int | None,
        masks: MaskArgs | None = None,
    ) -> None:
        self.index = index
        self.resolution = resolution
        self.data_root = str(data_root)
        self.augment_seed = augment_seed
        self.masks = masks

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...] | _Unreadable:
        epoch, i = key
        rng = None if self.augment_seed is None else np.random.default_rng([self.augment_seed, epoch, i])
        try:
            pixels = load_image(
                self.index.image_file(i), self.resolution, name=self.index.name(i), data_root=self.data_root, rng=rng
            )
        except DataError as e:
            if get_worker_info() is None:
                raise  # in the main process: the error (and its cause) as it is
            return _Unreadable(str(e))
        item = (torch.from_numpy(pixels), int(self.index.labels[i]))
        if self.masks is None:
            return item
        return *item, torch.from_numpy(draw_masks([i], self.masks)[0])


class ShardedEpochSampler(Sampler[int]):
    """Seeded shuffle per epoch, cut to whole batches and dealt to ranks without overlap.

    Epoch e's order for this rank is row ``rank`` of ``contract.epoch_order`` (a PCG64 permutation
    seeded by (seed, e), dealt round-robin), read from batch ``start_batch`` on.
    """

    def __init__(self, num_items: int, *, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank(num_items, batch_size, world_size)
        self.per_rank = self.batches_per_rank * batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the order of the next iteration and the batch it starts at."""
        check_start_batch(start_batch, self.batches_per_rank)
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(
            self.num_items, seed=self.seed, epoch=self.epoch, batch_size=self.batch_size, world_size=self.world_size
        )
        return iter(order[self.rank, self.start_batch * self.batch_size :].tolist())


class _EpochKeys(Sampler[tuple[int, int]]):
    """The indices of ``sampler`` paired with its epoch, so that persistent workers (which hold a copy
    of the dataset made when they started) still know the epoch an item is drawn for."""

    def __init__(self, sampler: ShardedEpochSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)


class TorchFilePipeline:
    """The torch backend of the batch contract over any on-disk source (see the module doc).

    ``source`` is 'folder', 'filelist' or 'webdataset' (the layouts of ``gali.pipelines.sources``);
    ``augment`` applies to split 'train' only; ``prefetch`` is the DataLoader's prefetch_factor (used
    with workers); ``channels_last`` delivers ``x`` in ``torch.channels_last`` memory format; ``masks``
    adds each sample's masks to its batch, drawn in the workers.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str,
        resolution: int,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        prefetch: int = 2,
        source: str = "folder",
        augment: bool = False,
        channels_last: bool = False,
        masks: MaskArgs | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if resolution < 1 or batch_size < 1 or workers < 0 or seed < 0 or prefetch < 1:
            raise ValueError(
                "need resolution >= 1, batch_size >= 1, workers >= 0, seed >= 0, prefetch >= 1; got "
                f"{resolution}, {batch_size}, {workers}, {seed}, {prefetch}"
            )
        check_rank(rank, world_size)
        root = Path(root).expanduser()
        index = open_split(source, root, split)
        n = len(index)
        check_split_size(f"{index.where} (split '{split}')", n, batch_size, world_size)

        self.device = torch.device(device)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_images = n
        self.class_names = index.class_names
        self.channels_last = channels_last
        self._sampler = ShardedEpochSampler(n, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        augment_seed = seed if augment and split == "train" else None
        self._loader = DataLoader(
            SourceDataset(index, resolution, root, augment_seed, masks),
            batch_size=batch_size,
            sampler=_EpochKeys(self._sampler),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            collate_fn=_collate,
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # keeps the global torch RNG untouched
            worker_init_fn=_leave_stop_signals_to_the_main_process,
        )

    def __len__(self) -> int:
        return self._sampler.batches_per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle: the next iteration's order (and augmentation) depends on (seed, epoch) only.

        The next iteration yields that epoch's batches from ``start_batch`` on (a resumed run):
        the skipped images are neither read nor decoded, and each image's augmentation is drawn
        from (seed, epoch, index), so the batches are those of an uninterrupted pass.
        """
        self._sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for batch in self._loader:
                if isinstance(batch, _Unreadable):  # a worker's error, handed back as data (see ``_Unreadable``)
                    raise DataError(batch.message)
                images, labels, *masks = batch
                x = pixels_to_x(images, self.device, channels_last=self.channels_last)
                yield Batch(
                    x=x,
                    labels=labels.to(self.device, non_blocking=True),
                    masks=masks[0].to(self.device, non_blocking=True) if masks else None,
                )
        except DataError as e:
            # An error raised below the loader comes with a traceback through the DataLoader's frames that
            # forms a reference cycle with the exception and pins the loader's iterator until a later
            # garbage collection, which then tears the worker queues down out of order (noisy
            # "Bad file descriptor" thread errors). The message (and the cause) already name the file. The
            # traceback still holds this frame: drop ``self`` from it, so that a pipeline nobody else holds is
            # freed (and its workers shut down in order) now rather than by a later garbage collection.
            error = e.with_traceback(None)
            del self
            raise error from error.__cause__


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT and SIGUSR1, and SIGTERM until the main process exits: a scheduler
    signals the job's whole process group, and a worker killed by it would crash the run before the main
    process writes its stop checkpoint; at exit, multiprocessing ends its daemonic children with SIGTERM."""
    for name in ("SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_if_the_main_process_is_exiting)


def _exit_if_the_main_process_is_exiting(signum: int, frame: object) -> None:
    if _MAIN_EXITING.value:
        os._exit(128 + signum)


_MAIN_EXITING = multiprocessing.RawValue("b", 0)  # shared with the forked workers


@atexit.register  # registered after multiprocessing's exit handler (imported above), so it runs before it
def _main_is_exiting() -> None:
    _MAIN_EXITING.value = 1
