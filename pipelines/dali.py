"""The DALI backend: the batch contract decoded by NVIDIA DALI (nvJPEG on the GPU, DALI's CPU operators without one).

Splits are indexed by ``sources.open_split`` as in the torch backend: the same images, labels, class names and refusals.
Each rank reads the images of its row of ``contract.epoch_order``, the torch backend's for (seed, epoch, rank): image
files in that order exactly (DALI's file reader), webdataset shards grouped by shard (``_by_shard``: each shard is read
in one run, through a DALI index written for the pass that lists those samples only, so DALI indexes nothing and reads
nothing else). Order and augmentation depend on (seed, epoch, rank) alone; each rank yields
``contract.batches_per_rank`` full batches, the rest is dropped; labels come from the index, in the list's order. A
pass resumed at batch k reads its list from batch k on: the images before it are neither read nor decoded. Eval (and
training without ``augment``): the centered square resized to R×R as in the torch backend (EXIF ignored); ``augment``:
a random crop (area 8–100 %, aspect 3/4–4/3) resized to R×R, then a horizontal flip. uint8 reaches the training device,
where ``contract.pixels_to_x`` makes x bit-identical to the torch backend's. An unreadable image stops the pass with a
``DataError`` naming it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gali.engine.errors import ConfigError, DataError

from .config import DataConfig
from .contract import Batch, batches_per_rank, check_rank, check_split_size, check_start_batch, epoch_order, pixels_to_x
from .masks import MaskArgs
from .sources import IMAGE_EXTENSIONS, FileIndex, ShardIndex, dali_index, open_split
from .torch_files import decode_problem

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as e:  # nvidia-dali is an optional dependency
    raise ConfigError(
        "data.backend",
        "'dali' needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 (or, for CUDA 12, "
        "nvidia-dali-cuda120); or use data.backend=torch",
    ) from e

READER = "Reader"
WDS_IMAGE_EXT = ";".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _by_shard(items: np.ndarray, shard_ids: np.ndarray) -> np.ndarray:
    """``items`` grouped by shard (``shard_ids``: each item's), stably: the shards in the order of their first item."""
    _, first, inverse = np.unique(shard_ids[items], return_index=True, return_inverse=True)
    return items[np.argsort(first[inverse], kind="stable")]


def _pass_index(index: ShardIndex, items: np.ndarray, folder: Path) -> tuple[list[str], list[str]]:
    """The shards and the DALI indexes (written into ``folder``) that make DALI's webdataset reader read ``items``,
    and only those, in order: one index per run of items from one shard (``sources.dali_index``)."""
    shard_ids = index.shard_ids[items]
    starts = np.flatnonzero(np.diff(shard_ids, prepend=-1)).tolist()
    paths, index_paths = [], []
    for run, (start, stop) in enumerate(zip(starts, [*starts[1:], len(items)], strict=True)):
        run_items = items[start:stop].tolist()
        samples = [[(os.fsdecode(index.members[i]), int(index.offsets[i]), int(index.sizes[i]))] for i in run_items]
        path = folder / f"run-{run:06d}.idx"
        path.write_text(dali_index(samples), encoding="utf-8")
        paths.append(index.shards[shard_ids[start]])
        index_paths.append(str(path))
    return paths, index_paths


@pipeline_def
def _build_dali_pipeline(
    index: FileIndex | ShardIndex,
    *,
    files: list[str],
    sample_ids: list[int],
    masks: MaskArgs | None,
    shard_id: int,
    num_shards: int,
    resolution: int,
    augment: bool,
    decode_device: str,
    layout: str,
    masks_device: str,
    index_paths: list[str] | None = None,
):
    """The DALI pipeline's operators: read DALI's part ``shard_id`` of ``num_shards`` of ``files`` in order (image
    files, each labelled by its index in the split, ``sample_ids``; or shards, each read through its index in
    ``index_paths``), decode, crop/resize to R×R, (flip), uint8 in ``layout``; plus the masks of image files (drawn
    by the plugin from their ids on ``masks_device``: 'gpu' only where it was built with CUDA, else on the CPU and
    copied over)."""
    if isinstance(index, FileIndex):
        encoded, ids = fn.readers.file(
            file_root=str(index.base),
            files=files,
            labels=sample_ids,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            name=READER,
        )
    else:
        encoded = fn.readers.webdataset(
            paths=files,
            index_paths=index_paths,
            ext=[WDS_IMAGE_EXT],
            case_sensitive_extensions=False,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            name=READER,
        )
    size = [resolution, resolution]
    if augment:
        images = fn.decoders.image_random_crop(
            encoded,
            device=decode_device,
            output_type=types.RGB,
            adjust_orientation=False,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
        )
        images = fn.resize(images, size=size, antialias=True, interp_type=types.INTERP_LINEAR)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
        h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
        side = dmath.min(h, w)
        top, left = (h - side) * 0.5, (w - side) * 0.5
        images = fn.resize(
            images,
            size=size,
            roi_start=fn.stack(top, left),
            roi_end=fn.stack(top + side, left + side),
            antialias=True,
            interp_type=types.INTERP_LINEAR,
        )
        mirror = 0
    images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, mirror=mirror)
    if masks is None:
        return images
    ids = fn.cast(ids, dtype=types.INT64)
    if decode_device == "mixed" and masks_device == "gpu":
        return images, fn.gali_masks(ids.gpu(), **masks.as_kwargs())
    pixels = fn.gali_masks(ids, **masks.as_kwargs())  # the plugin's CPU operator
    return images, pixels.gpu() if decode_device == "mixed" else pixels


def _dali_reason(message: str) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:'), else its last line."""
    lines = [line.strip() for line in message.split("encountered:")[-1].splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Current pipeline", "C++ context"))]
    return lines[0] if lines else message.strip().splitlines()[-1]


class DaliPipeline:
    """The DALI backend of the batch contract (see the module doc).

    ``cfg`` gives the source, resolution, augment, workers (DALI CPU threads) and prefetch (queue depth);
    ``channels_last`` delivers ``x`` in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        cfg: DataConfig,
        root: str | Path,
        *,
        split: str,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        masks: MaskArgs | None = None,
    ) -> None:
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0; got {batch_size}, {seed}")
        check_rank(rank, world_size)
        self.root = Path(root).expanduser()
        self.index = open_split("folder" if cfg.source == "digits" else cfg.source, self.root, split)
        n = len(self.index)
        check_split_size(f"{self.index.where} (split '{split}')", n, batch_size, world_size)
        self.device = torch.device(device)
        self.resolution = cfg.resolution
        self.batch_size = batch_size
        self.num_images = n
        self.class_names = self.index.class_names
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.augment = cfg.augment and split == "train"
        self.channels_last = channels_last
        self.num_threads = max(1, cfg.workers)
        self.prefetch = cfg.prefetch
        self.batches_per_rank = batches_per_rank(n, batch_size, world_size)
        self.masks, self.masks_device = masks, "cpu"
        if masks is not None:
            if not isinstance(self.index, FileIndex):
                raise ConfigError(
                    "data.source",
                    "webdataset shards have no per-sample index to seed pipeline masks "
                    "from; use image folders or a file list, or method.mask_source=step",
                )
            from .native import has_cuda_backend, load  # the plugin, built on first use

            self.masks_device = "gpu" if has_cuda_backend(load()) else "cpu"
        self.epoch = 0
        self.start_batch = 0
        self._iterator: DALIGenericIterator | None = None

    def __len__(self) -> int:
        return self.batches_per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the next pass's order (and augmentation): a function of (seed, epoch, rank) only.

        The next pass starts at batch ``start_batch`` of that epoch (a resumed run): the reader's list starts
        there, so the batches hold the same images as an uninterrupted pass (random augmentations are drawn
        afresh), and the images before it are not read.
        """
        check_start_batch(start_batch, self.batches_per_rank)
        self.epoch, self.start_batch = epoch, start_batch

    def _epoch_order(self) -> np.ndarray:
        """Item indices of this epoch, (world_size, per_rank): row r is rank r's (``contract.epoch_order``)."""
        return epoch_order(
            self.num_images, seed=self.seed, epoch=self.epoch, batch_size=self.batch_size, world_size=self.world_size
        )

    def _pass_items(self) -> np.ndarray:
        """The split's items this rank reads in the next pass, in order: its row of ``_epoch_order`` (shards:
        ``_by_shard``), from batch ``start_batch`` on."""
        order = self._epoch_order()[self.rank]
        if isinstance(self.index, ShardIndex):
            order = _by_shard(order, self.index.shard_ids)
        return order[self.start_batch * self.batch_size :]

    def _build(self, items: np.ndarray) -> DALIGenericIterator:
        """The iterator of a pass that reads ``items`` (``_pass_items``)."""
        cuda = self.device.type == "cuda"
        device_id = None
        if cuda:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with tempfile.TemporaryDirectory(prefix="gali-dali-") as folder:  # DALI reads the indexes as it builds
            index_paths = None
            if isinstance(self.index, FileIndex):
                # Every rank's rest of the epoch, rank after rank: DALI's contiguous shard ``rank`` is this rank's.
                order = self._epoch_order()[:, self.start_batch * self.batch_size :].reshape(-1)
                files = [os.fsdecode(p) for p in self.index.paths[order]]
                sample_ids, shard_id, num_shards = order.tolist(), self.rank, self.world_size
            else:
                files, index_paths = _pass_index(self.index, items, Path(folder))
                sample_ids, shard_id, num_shards = [], 0, 1
            pipe = _build_dali_pipeline(
                self.index,
                files=files,
                sample_ids=sample_ids,
                shard_id=shard_id,
                num_shards=num_shards,
                index_paths=index_paths,
                masks=self.masks,
                resolution=self.resolution,
                augment=self.augment,
                decode_device="mixed" if cuda else "cpu",
                layout="HWC" if self.channels_last else "CHW",
                masks_device=self.masks_device,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=device_id,
                seed=int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0] >> 1),
                prefetch_queue_depth=self.prefetch,
            )
            outputs = ["x"] + (["masks"] if self.masks is not None else [])
            return DALIGenericIterator(
                [pipe], outputs, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False
            )

    def __iter__(self) -> Iterator[Batch]:
        self._iterator = None  # free the previous pass's pipeline before building the next
        items = self._pass_items()
        if len(items) == 0:  # resumed at the end of the epoch
            return
        done = 0  # batches of this pass read so far
        try:
            self._iterator = self._build(items)
            for (out,) in self._iterator:
                batch = items[done * self.batch_size : (done + 1) * self.batch_size]
                done += 1
                pixels = out["x"].permute(0, 3, 1, 2) if self.channels_last else out["x"]
                x = pixels_to_x(pixels, self.device, channels_last=self.channels_last)
                masks = out["masks"].to(self.device, non_blocking=True) if self.masks is not None else None
                labels = torch.from_numpy(self.index.labels[batch]).to(self.device, non_blocking=True)
                yield Batch(x=x, labels=labels, masks=masks)
        except RuntimeError as e:
            self._iterator = None  # DALI invalidates a pipeline that failed
            raise self._data_error(str(e), items[done * self.batch_size :]) from e

    def _data_error(self, message: str, ahead: np.ndarray) -> DataError:
        """A ``DataError`` naming the image DALI failed on where it can be found among the items ``ahead``."""
        in_flight = ahead[: (self.prefetch + 2) * self.batch_size]  # the batches DALI may have been decoding
        names = [self.index.name(i) for i in in_flight]
        culprit = next((name for name in names if name in message), None) or next(
            (
                name
                for i, name in zip(in_flight, names, strict=True)
                if decode_problem(self.index.image_file(i)) is not None
            ),
            None,
        )
        what = f"cannot read image {culprit}" if culprit else f"cannot read an image under {self.root}"
        return DataError(
            f"{what} (DALI: {_dali_reason(message)}). Remove or replace the file; `gali data check {self.root}` "
            "lists every unreadable image"
        )
