"""gali.pipelines: the batch contract and its backends (torch, DALI, synthetic), the demo data set.

``make_pipeline(cfg.data, ..., channels_last=cfg.compute.channels_last)`` is the entry point of the engine.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gali.engine.errors import ConfigError

from .config import DataConfig
from .contract import Batch, Pipeline, check_batch
from .digits import cache_root, default_digits_root, prepare_digits
from .masks import MaskArgs
from .synthetic import SPLIT_IMAGES, SyntheticPipeline
from .torch_files import TorchFilePipeline

__all__ = [
    "Batch",
    "Pipeline",
    "SplitBatches",
    "cache_root",
    "check_batch",
    "default_digits_root",
    "make_pipeline",
    "prepare_digits",
    "resolve_backend",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``data.backend`` as run: 'auto' is 'dali' where NVIDIA DALI imports and ``device`` is CUDA, else 'torch'."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    try:
        return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return "torch"


def make_pipeline(
    cfg: DataConfig,
    *,
    split: str,
    batch_size: int,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    masks: MaskArgs | None = None,
) -> Pipeline:
    """Build the pipeline that ``cfg`` names for ``split`` ('train' or 'test') on this rank.

    source 'digits' writes the demo data set once (``prepare_digits`` into ``cfg.root`` or
    ``default_digits_root(cfg.resolution)``) and reads it like a folder; sources 'folder', 'filelist'
    and 'webdataset' read ``cfg.root`` (layouts in ``gali.pipelines.sources``). Backend 'torch'
    (``TorchFilePipeline``) decodes the files in ``cfg.workers`` DataLoader workers (augment as ``cfg``
    says), backend 'dali' (``DaliPipeline``) with NVIDIA DALI; backend 'synthetic' reads nothing and draws
    random batches on the device (10 classes, an epoch as long as CIFAR-10's split). ``channels_last``
    (the engine passes ``compute.channels_last``) delivers every backend's ``x`` in the channels-last
    memory format. ``masks`` (``MaskSpec.args``) adds each sample's inpainting masks to its batch: the DALI
    backend draws them with the native operator (built on first use), the torch backend with its Python
    reference, bit for bit alike; indexed sources only (not 'webdataset', not 'synthetic'). Raises
    ``ConfigError`` for an invalid ``cfg`` and ``DataError`` for unusable data, before any batch is produced.
    """
    cfg.validate()
    backend = resolve_backend(cfg.backend, device)
    # What every backend takes alike.
    common = {
        "batch_size": batch_size,
        "device": device,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "channels_last": channels_last,
    }
    if backend == "synthetic":
        if split not in SPLIT_IMAGES:
            raise ValueError(f"split must be one of {tuple(SPLIT_IMAGES)}, got {split!r}")
        if masks is not None:
            raise ConfigError("data.backend", "'synthetic' draws no masks; use image files or method.mask_source=step")
        return SyntheticPipeline(num_images=SPLIT_IMAGES[split], resolution=cfg.resolution, **common)
    if masks is not None and cfg.source == "webdataset":
        raise ConfigError(
            "data.source",
            "'webdataset' shards have no per-sample index to seed pipeline masks from; "
            "use image folders or a file list, or method.mask_source=step",
        )

    if cfg.source == "digits":
        root = prepare_digits(
            Path(cfg.root).expanduser() if cfg.root else default_digits_root(cfg.resolution), cfg.resolution
        )
    else:
        root = Path(cfg.root).expanduser()
    if backend == "dali":
        from .dali import DaliPipeline  # nvidia-dali is an optional dependency

        return DaliPipeline(cfg, root, split=split, masks=masks, **common)
    return TorchFilePipeline(
        root,
        split=split,
        resolution=cfg.resolution,
        workers=cfg.workers,
        prefetch=cfg.prefetch,
        source="folder" if cfg.source == "digits" else cfg.source,
        augment=cfg.augment,
        masks=masks,
        **common,
    )


LOADER_BATCH_MAX = 256


class SplitBatches:
    """Every image of a split once (the first ``limit`` if given), in batches of ``batch_size``.

    Pipelines deliver static batches and drop the last incomplete one, so the split is read with
    the largest loader batch (at most :data:`LOADER_BATCH_MAX`) that divides its size, which drops
    nothing, and re-cut here into ``batch_size`` with a partial last batch. The order is the
    pipeline's seeded shuffle of epoch 0, the same for any loader batch. ``num_images`` is the
    number of images an iteration yields. ``masks`` asks the pipeline for each image's masks.
    """

    def __init__(
        self,
        data: DataConfig,
        split: str,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        limit: int | None = None,
        masks: MaskArgs | None = None,
    ) -> None:
        pipeline = make_pipeline(data, split=split, batch_size=1, device=device, seed=seed, masks=masks)
        n = pipeline.num_images
        loader_batch = max(d for d in range(1, min(n, LOADER_BATCH_MAX) + 1) if n % d == 0)
        if loader_batch > 1:
            pipeline = make_pipeline(data, split=split, batch_size=loader_batch, device=device, seed=seed, masks=masks)
        pipeline.set_epoch(0)
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.num_images = n if limit is None else min(n, limit)

    def __iter__(self) -> Iterator[Batch]:
        held: list[Batch] = []
        count = seen = 0
        for batch in self.pipeline:
            held.append(batch)
            count += batch.x.shape[0]
            while count >= self.batch_size or (count and seen + count >= self.num_images):
                joined = _join(held)
                take = min(self.batch_size, count, self.num_images - seen)
                yield _cut(joined, slice(0, take))
                seen += take
                if seen >= self.num_images:
                    return
                held, count = [_cut(joined, slice(take, None))], count - take


def _join(batches: list[Batch]) -> Batch:
    """The batches end to end (labels and masks where the batches have them)."""

    def cat(name: str) -> Tensor | None:
        parts = [getattr(b, name) for b in batches]
        return None if parts[0] is None else torch.cat(parts)

    return Batch(x=cat("x"), labels=cat("labels"), masks=cat("masks"))


def _cut(batch: Batch, rows: slice) -> Batch:
    return Batch(
        x=batch.x[rows],
        labels=None if batch.labels is None else batch.labels[rows],
        masks=None if batch.masks is None else batch.masks[rows],
    )
