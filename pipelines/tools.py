"""Data tools behind ``gali data check|prepare|stats``, for any source layout on disk.

The layout of ROOT is detected (``sources.detect_source``): an image-folder tree, a filelist (a folder
with train.txt/test.txt, or one .txt) or WebDataset shards. Work is spread over a thread pool: Pillow
releases the GIL while it decodes, resizes and encodes, so threads scale without pickling the index.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from gali.engine.errors import DataError
from gali.engine.files import atomic_write, write_text_atomic

from .sources import CLASSES_FILE, SplitIndex, all_image_files, detect_source, open_split, split_names
from .torch_files import decode_problem, load_image

T = TypeVar("T")
FORMATS = {"jpeg": "jpg", "png": "png"}
CHUNK = 64  # items per task: amortizes the pool's per-task cost without holding much in flight


def default_workers() -> int:
    """Threads used by default: one per CPU core."""
    return os.cpu_count() or 1


def _parallel_map(fn: Callable[[int], T], items: Sequence[int], workers: int) -> Iterator[T]:
    """``fn(i)`` for i in ``items``, in order, computed by ``workers`` threads a chunk at a time."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunks = [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for results in pool.map(lambda chunk: [fn(i) for i in chunk], chunks):
            yield from results


def _indexes(root: Path) -> tuple[str, list[tuple[str, SplitIndex]]]:
    """The source layout of ``root`` and the index of each of its splits."""
    source = detect_source(root)
    return source, [(split, open_split(source, root, split)) for split in split_names(source, root)]


@dataclass
class CheckReport:
    """What ``check_images`` found: how many images it decoded, and (name, reason) of each bad one."""

    checked: int
    bad: list[tuple[str, str]] = field(default_factory=list)


def _decode_problem(index: SplitIndex, i: int) -> str | None:
    """None if item i decodes fully to RGB (as the torch backend decodes it), else the reason it does not."""
    return decode_problem(index.image_file(i))


def check_images(root: str | Path, workers: int | None = None) -> CheckReport:
    """Decode every image of ``root`` fully to RGB and collect the bad ones.

    Decoding is the torch backend's (``torch_files.to_rgb``): any mode Pillow opens (8- and 16-bit gray and
    color, palette, CMYK, with or without alpha) is readable; a truncated, corrupt or unidentifiable file is bad.

    An image-folder tree: every image file under ``root`` (by extension, hidden entries skipped,
    whatever the class layout); a filelist or shards: every listed image of every split. Raises
    ``DataError`` for a layout that cannot be indexed (a malformed list, a sample without its label).
    """
    root = Path(root).expanduser()
    source = detect_source(root)
    indexes = [all_image_files(root)] if source == "folder" else [index for _, index in _indexes(root)[1]]
    report = CheckReport(checked=0)
    for index in indexes:
        problems = _parallel_map(partial(_decode_problem, index), range(len(index)), workers or default_workers())
        for i, problem in enumerate(problems):
            if problem is not None:
                report.bad.append((index.name(i), problem))
        report.checked += len(index)
    return report


@dataclass
class SplitStats:
    """Images per class and a histogram of image sizes (power-of-two width × height buckets)."""

    class_counts: dict[str, int]
    sizes: Counter[tuple[int, int]]
    unreadable: int


def size_bucket(side: int) -> int:
    """The power of two at or below ``side`` (the bucket [b, 2b) that holds it)."""
    return 1 << (max(side, 1).bit_length() - 1)


def _size_of(index: SplitIndex, i: int) -> tuple[int, int] | None:
    try:
        with Image.open(index.image_file(i)) as image:
            return image.size  # from the header only
    except Exception:  # counted as unreadable; `gali data check` says why
        return None


def dataset_stats(root: str | Path, workers: int | None = None) -> tuple[str, dict[str, SplitStats]]:
    """The source layout of ``root`` and the ``SplitStats`` of each split (image headers only are read)."""
    source, indexes = _indexes(Path(root).expanduser())
    stats = {}
    for split, index in indexes:
        counts = np.bincount(index.labels, minlength=len(index.class_names))
        sizes: Counter[tuple[int, int]] = Counter()
        unreadable = 0
        for size in _parallel_map(partial(_size_of, index), range(len(index)), workers or default_workers()):
            if size is None:
                unreadable += 1
            else:
                sizes[(size_bucket(size[0]), size_bucket(size[1]))] += 1
        stats[split] = SplitStats(
            class_counts={name: int(c) for name, c in zip(index.class_names, counts, strict=True)},
            sizes=sizes,
            unreadable=unreadable,
        )
    return source, stats


def _encode(index: SplitIndex, resolution: int, image_format: str, data_root: Path, i: int) -> bytes:
    """Item i with the eval transform (shorter side to R, center crop R×R), encoded as ``image_format``."""
    pixels = load_image(index.image_file(i), resolution, name=index.name(i), data_root=data_root)
    buffer = io.BytesIO()
    image = Image.fromarray(pixels.transpose(1, 2, 0))
    if image_format == "jpeg":
        image.save(buffer, "JPEG", quality=95, subsampling=0)  # 4:4:4: small images keep their color detail
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: Iterable[tuple[str, bytes, int]], ext: str) -> None:
    def write(tmp: Path) -> None:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, label in samples:
                _add_member(tar, f"{key}.{ext}", image)
                _add_member(tar, f"{key}.cls", str(label).encode())

    atomic_write(path, write)


@dataclass
class PreparedSplit:
    """What ``prepare_shards`` wrote for one split."""

    images: int
    shards: list[Path]


def prepare_shards(
    src: str | Path,
    dst: str | Path,
    *,
    resolution: int,
    shards: int,
    workers: int | None = None,
    image_format: str = "jpeg",
    seed: int = 0,
) -> dict[str, PreparedSplit]:
    """Write the splits of ``src`` (any source layout) as WebDataset shards under ``dst``.

    Each image is resized once with the eval transform (shorter side to ``resolution``, center crop)
    and encoded as JPEG (quality 95, 4:4:4) or PNG; split s goes to ``dst/s/shard-00000.tar`` ... (``shards``
    per split, fewer if the split has fewer images), the images in a seeded permutation of the
    source's order (so that a shard mixes classes, for readers that stream shards) cut into
    consecutive runs; key = the image's position in the source order. ``dst/classes.txt`` names the
    classes. Every file is written through ``gali.engine.files.atomic_write`` (a temporary sibling, flushed
    to the disk and renamed into place); the output depends on the inputs and ``seed`` only. ``dst`` must
    not exist or be empty, so nothing is overwritten.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {tuple(FORMATS)}, got {image_format!r}")
    if resolution < 1 or shards < 1:
        raise ValueError(f"need resolution >= 1 and shards >= 1, got {resolution}, {shards}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"{dst} exists and is not an empty folder; choose a new folder for the shards")
    _, indexes = _indexes(src)
    class_names = indexes[0][1].class_names
    workers = workers or default_workers()
    ext = FORMATS[image_format]
    dst.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst / CLASSES_FILE, "".join(f"{n}\n" for n in class_names))
    written = {}
    for split, index in indexes:
        folder = dst / split
        folder.mkdir()
        n = len(index)
        order = np.random.default_rng(seed).permutation(n)
        width = max(6, len(str(n - 1)))
        paths = []
        for j, part in enumerate(np.array_split(order, min(shards, n))):
            items = part.tolist()
            images = _parallel_map(partial(_encode, index, resolution, image_format, src), items, workers)
            samples = ((f"{i:0{width}d}", image, int(index.labels[i])) for i, image in zip(items, images, strict=True))
            paths.append(folder / f"shard-{j:05d}.tar")
            _write_shard(paths[-1], samples, ext)
        written[split] = PreparedSplit(images=n, shards=paths)
    return written
