"""The torch backend: an image-folder tree read with Pillow in ``DataLoader`` workers.

Layout: class folders (the immediate, non-hidden subfolders of the split folder, sorted by name)
give the labels and are searched recursively; a folder without subfolders is one class (label 0)
of the images directly inside. Files count as images by extension (jpg, jpeg, png, bmp, webp, in
any case); hidden files and folders (names starting with '.') are skipped.

Splits: if ``root/train`` exists, split 'train' reads ``root/train`` and split 'test' reads
``root/test`` (its class folders must be among those of ``root/train``, and take the same labels);
otherwise all of ``root`` is split 'train' and there is no 'test'.

Each image is decoded to RGB, its centered square crop resized to R×R (Pillow bilinear, which
antialiases when shrinking and takes its filter support from beyond the crop's edges: the same as
resizing the shorter side to R and then center-cropping, with the crop centered exactly), and
handed over as uint8 (3, R, R): 4× less to copy between processes and to the device than float.
The main process moves each uint8 batch to the device (from pinned memory when the device is
CUDA, non-blocking) and converts it there to float32 in [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from gali.engine.errors import DataError

from .contract import Batch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "test")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_classes(folder: Path) -> list[str]:
    """The class folder names of ``folder``: its non-hidden immediate subfolders, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


@dataclass(frozen=True)
class ImageIndex:
    """The images of one folder: paths relative to ``folder`` (bytes, one numpy array, so forked
    workers do not copy a Python list entry by entry), their int64 labels, and the class folder
    names in label order (empty for a folder without class folders)."""

    folder: Path
    paths: np.ndarray
    labels: np.ndarray
    class_folders: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist or is not a folder; set data.root to a folder "
            "of images (class subfolders give labels), or use data.source=digits for the demo"
        )


def _walk_images(top: Path) -> list[str]:
    """Image files under ``top`` (recursive, following links, hidden entries skipped), relative to
    ``top``'s parent, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, top.parent)
        found.extend(os.path.join(rel, f) for f in filenames if _is_image(f))
    return sorted(found)


def _describe(classes: list[str]) -> str:
    if not classes:
        return "no class folders (images directly inside)"
    return "class folders " + ", ".join(classes[:5]) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "")


def scan_image_folder(folder: Path, class_folders: list[str] | None = None) -> ImageIndex:
    """Index the images under ``folder``; raise ``DataError`` if there are none or the layout is unclear.

    ``class_folders`` fixes the label order (label i = ``class_folders[i]``) so that a test folder
    labels its images like its train folder; ``None`` takes ``folder``'s own class folders, and
    ``[]`` expects a folder without subfolders (one class).
    """
    folder = Path(folder)
    _require_folder(folder)
    classes = list_classes(folder)
    loose = sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
    if classes and loose:
        raise DataError(
            f"{folder} holds both {_describe(classes)} and {len(loose)} images directly inside "
            f"(e.g. {loose[0]}); move those images into a class folder, or into one folder of their own, "
            "so that every image has a label"
        )
    if class_folders is None:
        class_folders = classes
    elif bool(classes) != bool(class_folders) or not set(classes) <= set(class_folders):
        raise DataError(
            f"{folder} has {_describe(classes)}, which do not match the train split's "
            f"{_describe(class_folders)}; give the test split the class folders of the train split"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_folders):
        if name in classes:
            found = _walk_images(folder / name)
            paths.extend(found)
            labels.extend([label] * len(found))
    if not class_folders:
        paths, labels = loose, [0] * len(loose)
    if not paths:
        raise DataError(
            f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; searched recursively); "
            "point data.root at a folder of images (class subfolders give labels)"
        )
    return ImageIndex(
        folder=folder,
        paths=np.array([os.fsencode(p) for p in paths], dtype=np.bytes_),
        labels=np.array(labels, dtype=np.int64),
        class_folders=list(class_folders),
    )


def load_image(path: str | Path, resolution: int, *, data_root: str | Path | None = None) -> np.ndarray:
    """Decode ``path`` to uint8 RGB (3, R, R): centered square crop, Pillow bilinear resize to R×R.

    Raises ``DataError`` naming the file for anything unreadable (truncated, corrupt, not an image).
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # decodes the whole file: truncation fails here
        w, h = image.size
        if (w, h) != (resolution, resolution):
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
        pixels = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # any failure to decode an input file is a data problem: name the file
        check = f"`gali data check {data_root}`" if data_root is not None else "`gali data check ROOT`"
        raise DataError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file; "
            f"{check} lists every unreadable image"
        ) from e
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class ImageFolderDataset(Dataset):
    """Map-style dataset over an ``ImageIndex``: item i is (uint8 (3, R, R) tensor, int label)."""

    def __init__(self, index: ImageIndex, resolution: int, data_root: Path) -> None:
        self.folder = str(index.folder)
        self.paths = index.paths
        self.labels = index.labels
        self.resolution = resolution
        self.data_root = str(data_root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = os.path.join(self.folder, os.fsdecode(self.paths[i]))
        pixels = load_image(path, self.resolution, data_root=self.data_root)
        return torch.from_numpy(pixels), int(self.labels[i])


class ShardedEpochSampler(Sampler[int]):
    """Seeded shuffle per epoch, cut to whole batches and dealt to ranks without overlap.

    Epoch e's order is a permutation drawn from numpy's PCG64 seeded by (seed, e), the same on
    every rank; its first ``len(self) * world_size`` entries are dealt round-robin, rank r taking
    entries r, r + world_size, ...; the remainder (fewer than ``batch_size * world_size``) is
    skipped this epoch and falls elsewhere in the next.
    """

    def __init__(self, num_items: int, *, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_rank = num_items // (batch_size * world_size)
        self.per_rank = self.batches_per_rank * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return iter(mine.tolist())


class FolderPipeline:
    """The torch backend of the batch contract over an image-folder tree (see the module doc)."""

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
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if resolution < 1 or batch_size < 1 or workers < 0 or seed < 0:
            raise ValueError(
                "need resolution >= 1, batch_size >= 1, workers >= 0, seed >= 0; got "
                f"{resolution}, {batch_size}, {workers}, {seed}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        root = Path(root).expanduser()
        _require_folder(root)
        if (root / "train").is_dir():
            folder = root / split
            class_folders = list_classes(root / "train")
            if not folder.is_dir():
                raise DataError(
                    f"split '{split}' needs the folder {folder}, which does not exist; add it "
                    f"(same class folders as {root / 'train'}) or use split 'train'"
                )
        elif split == "test":
            raise DataError(
                f"{root} has no train/ subfolder, so all of it is split 'train' and there is no "
                f"split 'test'; for a held-out split arrange it as {root}/train/<class>/... and "
                f"{root}/test/<class>/..."
            )
        else:
            folder, class_folders = root, None
        index = scan_image_folder(folder, class_folders)
        n = len(index)
        if n < batch_size:
            raise DataError(
                f"{folder} (split '{split}') holds {n} images, fewer than one batch of {batch_size}; "
                "lower the batch size or add images"
            )
        if n // world_size < batch_size:
            raise DataError(
                f"{folder} (split '{split}') holds {n} images: {n // world_size} per rank over "
                f"{world_size} ranks, fewer than one batch of {batch_size}; lower the batch size, "
                "use fewer ranks, or add images"
            )

        self.device = torch.device(device)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_images = n
        self.class_names = index.class_folders or [root.name]
        self._sampler = ShardedEpochSampler(n, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._loader = DataLoader(
            ImageFolderDataset(index, resolution, root),
            batch_size=batch_size,
            sampler=self._sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),  # keeps the global torch RNG untouched
        )

    def __len__(self) -> int:
        return self._sampler.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: the next iteration's order depends on (seed, epoch) only."""
        self._sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for images, labels in self._loader:
                # A multiply, not a divide: CUDA divides by a scalar through its reciprocal, so this keeps CPU
                # and CUDA batches bit-identical; 0 and 255 still map exactly to -1 and 1.
                x = images.to(self.device, non_blocking=True).to(torch.float32).mul_(1 / 127.5).sub_(1.0)
                yield Batch(x=x, labels=labels.to(self.device, non_blocking=True))
        except DataError as e:
            # A worker's error comes back with a traceback through the DataLoader's frames that forms
            # a reference cycle with the exception and pins the loader's iterator until a later
            # garbage collection, which then tears the worker queues down out of order (noisy
            # "Bad file descriptor" thread errors). The message (and the cause) already name the file.
            raise e.with_traceback(None) from e.__cause__
