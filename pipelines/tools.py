"""Data tools behind ``gali data check|prepare|stats``, for any source layout on disk.

The layout of ROOT is detected (``sources.detect_source``): an image-folder tree, a filelist (a folder
with train.txt/test.txt, or one .txt) or WebDataset shards. Work is spread over a thread pool: Pillow
releases the GIL while it decodes, resizes and encodes, so threads scale without pickling the index.
``check`` and ``stats`` read every image with one reader (``_read``: a full decode to RGB), so they agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from gali.engine.errors import DataError
from gali.engine.files import atomic_write, write_text_atomic

from .sources import (
    CLASSES_FILE,
    ShardSample,
    SplitIndex,
    all_image_files,
    dali_index,
    dali_index_path,
    detect_source,
    list_classes,
    open_split,
    scan_image_folder,
    scan_shard,
    split_names,
)
from .torch_files import load_image, to_rgb

T = TypeVar("T")
FORMATS = {"jpeg": "jpg", "png": "png"}
CHUNK = 64  # items per task: amortizes the pool's per-task cost without holding much in flight
IN_FLIGHT = 4  # chunks per worker submitted ahead of the one being consumed: bounds the results held in memory
MANIFEST = "prepare.json"  # what `gali data prepare` is writing into its destination, so that a rerun resumes


def default_workers() -> int:
    """Threads used by default: one per CPU core."""
    return os.cpu_count() or 1


def _parallel_map(fn: Callable[[int], T], items: Sequence[int], workers: int) -> Iterator[T]:
    """``fn(i)`` for i in ``items``, in order, computed by ``workers`` threads a chunk at a time.

    At most ``IN_FLIGHT`` chunks per worker are submitted ahead of the one consumed, so that a slow consumer or one
    slow chunk never lets finished results pile up (a million encoded images would not fit in memory).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunks = (items[start : start + CHUNK] for start in range(0, len(items), CHUNK))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[list[T]]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(lambda c: [fn(i) for i in c], chunk))
                if len(pending) >= IN_FLIGHT * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _indexes(root: Path) -> tuple[str, list[tuple[str, SplitIndex]]]:
    """The source layout of ``root`` and the index of each of its splits."""
    source = detect_source(root)
    return source, [(split, open_split(source, root, split)) for split in split_names(source, root)]


@dataclass
class CheckReport:
    """What ``check_images`` found: how many images it decoded, and (name, reason) of each bad one."""

    checked: int
    bad: list[tuple[str, str]] = field(default_factory=list)


def _read(index: SplitIndex, i: int) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) if item i decodes fully to RGB (as the torch backend decodes it), else (None, the
    reason it does not): the one reader of ``gali data check`` and ``gali data stats``, so that they agree."""
    try:
        with Image.open(index.image_file(i)) as image:
            size = image.size
            to_rgb(image)  # decodes the whole file: truncation fails here
    except Exception as e:  # every failure is a finding to report, not a crash
        return None, f"{type(e).__name__}: {e}"
    return size, None


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
        results = _parallel_map(partial(_read, index), range(len(index)), workers or default_workers())
        for i, (_, problem) in enumerate(results):
            if problem is not None:
                report.bad.append((index.name(i), problem))
        report.checked += len(index)
    return report


@dataclass
class SplitStats:
    """Images per class, a histogram of the sizes of the readable images (power-of-two width × height buckets) and
    the number of unreadable ones (those that ``check_images`` lists: both decode every image fully)."""

    class_counts: dict[str, int]
    sizes: Counter[tuple[int, int]]
    unreadable: int


def size_bucket(side: int) -> int:
    """The power of two at or below ``side`` (the bucket [b, 2b) that holds it)."""
    return 1 << (max(side, 1).bit_length() - 1)


def dataset_stats(root: str | Path, workers: int | None = None) -> tuple[str, dict[str, SplitStats]]:
    """The source layout of ``root`` and the ``SplitStats`` of each split (every image decoded, as ``check_images``)."""
    source, indexes = _indexes(Path(root).expanduser())
    stats = {}
    for split, index in indexes:
        counts = np.bincount(index.labels, minlength=len(index.class_names))
        sizes: Counter[tuple[int, int]] = Counter()
        unreadable = 0
        for size, _ in _parallel_map(partial(_read, index), range(len(index)), workers or default_workers()):
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


def _encode(index: SplitIndex, resolution: int, image_format: str, data_root: Path, i: int) -> bytes | str:
    """Item i with the eval transform (centre square crop of the shorter side, resized to R×R with Pillow's
    antialiased bilinear filter), encoded as ``image_format``; or, for an image that cannot be read, the reason."""
    try:
        pixels = load_image(index.image_file(i), resolution, name=index.name(i), data_root=data_root)
    except DataError as e:
        cause = e.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
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
    """What ``prepare_shards`` wrote for one split: images written (``source_images`` less the unreadable ones),
    the shards, the source's split it came from, images per class, shards found written and verified (skipped),
    the (name, reason) of each unreadable image left out, and a line per damaged shard written again."""

    images: int
    shards: list[Path]
    source_split: str = "train"
    source_images: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    reused: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)


def _prepare_indexes(src: Path) -> list[tuple[str, str, SplitIndex]]:
    """(split written, split of ``src`` read, index) for each split to prepare.

    An ImageNet-style tree (``train/<synset>/*.JPEG`` and ``val/<synset>/*.JPEG``, no ``test/``) gives split 'test'
    from ``val/``, labelled by the sorted class folders of ``train/`` as the 'train' split is.
    """
    source, indexes = _indexes(src)
    splits = [(split, split, index) for split, index in indexes]
    if source == "folder" and (src / "val").is_dir() and (src / "train").is_dir() and not (src / "test").exists():
        val = scan_image_folder(src / "val", list_classes(src / "train"), one_class=src.name)
        splits.append(("test", "val", val))
    return splits


def _listing_digest(src: Path, index: SplitIndex) -> str:
    """A digest of the split's items (names relative to ``src``, labels) in order: a resume must read the same."""
    digest = hashlib.sha256()
    for i in range(len(index)):
        digest.update(f"{os.path.relpath(index.name(i), src)}\t{int(index.labels[i])}\n".encode())
    return digest.hexdigest()


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def _resumable(dst: Path, manifest: dict) -> bool:
    """True if ``dst`` is missing or empty (False), or holds this same preparation (True, to resume); else raises."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return False
    if not dst.is_dir():
        raise DataError(f"{dst} exists and is not an empty folder; choose a new folder for the shards")
    try:
        before = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(
            f"{dst} exists and is not an empty folder (and holds no {MANIFEST} of `gali data prepare` to resume); "
            "choose a new folder for the shards"
        ) from None
    settings = {k: v for k, v in manifest.items() if k != "done"}
    if {k: v for k, v in before.items() if k != "done"} != settings:
        differ = sorted(k for k in settings.keys() | before.keys() if k != "done" and before.get(k) != settings.get(k))
        raise DataError(
            f"{dst} is not an empty folder: it holds a `gali data prepare` output of other settings or another "
            f"source ({', '.join(differ)} differ); choose a new folder, or delete {dst} to prepare it again"
        )
    return True


def _verified(
    path: Path, expected: list[tuple[str, int]], missing_ok: Callable[[int], bool]
) -> tuple[list[ShardSample] | None, str | None]:
    """(its samples, None) if the shard ``path`` reads back whole (``sources.scan_shard``) with the samples
    ``expected`` (key, label) in order, but for positions ``missing_ok`` accepts as left out (unreadable); else
    (None, why)."""
    if not path.exists():
        return None, None
    try:
        samples = scan_shard(path)
    except DataError as e:
        return None, str(e)
    found = [(s.key, s.label) for s in samples]
    j = 0
    for pos, sample in enumerate(expected):
        if j < len(found) and found[j] == sample:
            j += 1
        elif not missing_ok(pos):
            return None, f"shard {path} lacks sample '{sample[0]}' (label {sample[1]})"
    if j != len(found):
        return None, f"shard {path} holds sample '{found[j][0]}', which it should not"
    return samples, None


def _write_dali_index(shard: Path, samples: list[ShardSample]) -> None:
    """Write DALI's index of the verified ``shard`` (its ``samples``) beside it, unless it is there already."""
    text = dali_index([sorted((s.image, s.label_member), key=lambda member: member[1]) for s in samples])
    path = dali_index_path(shard)
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return
    write_text_atomic(path, text)


def _prepare_split(
    index: SplitIndex,
    folder: Path,
    done: PreparedSplit,
    *,
    src: Path,
    resolution: int,
    shards: int,
    workers: int,
    image_format: str,
    seed: int,
    progress: bool,
    split: str,
) -> None:
    """Write (or, resuming, verify and keep) the shards of one split into ``folder``; fill ``done``."""
    n = len(index)
    order = np.random.default_rng(seed).permutation(n)
    width = max(6, len(str(n - 1)))
    parts = [part.tolist() for part in np.array_split(order, min(shards, n))]
    keys = [[(f"{i:0{width}d}", int(index.labels[i])) for i in items] for items in parts]
    done.shards = [folder / f"shard-{j:05d}.tar" for j in range(len(parts))]
    for tmp in folder.glob("shard-*.tmp"):  # left by a run that was killed while it wrote that shard or index
        tmp.unlink()
    unreadable: dict[int, str] = {}

    def left_out(items: list[int]) -> Callable[[int], bool]:
        def check(pos: int) -> bool:  # a sample missing from a shard written before: still unreadable?
            _, problem = _read(index, items[pos])
            if problem is not None:
                unreadable[items[pos]] = problem
            return problem is not None

        return check

    todo = []
    for j, path in enumerate(done.shards):
        found, why = _verified(path, keys[j], left_out(parts[j]))
        if found is not None:
            done.reused += 1
            _write_dali_index(path, found)
        else:
            todo.append(j)
            if why is not None:
                done.rewritten.append(f"{why}: written again")
    items = [i for j in todo for i in parts[j]]
    encode = partial(_encode, index, resolution, image_format, src)
    encoded = _parallel_map(encode, items, workers)
    skipped = n - len(items)
    with tqdm(total=n, initial=skipped, unit="img", desc=f"{split}", disable=not progress, smoothing=0.05) as bar:
        for j in todo:
            samples, written = [], []
            for i, (key, label), data in zip(parts[j], keys[j], encoded, strict=False):
                if isinstance(data, str):
                    unreadable[i] = data
                else:
                    samples.append((key, data, label))
                    written.append((key, label))
                bar.update(1)
            _write_shard(done.shards[j], samples, FORMATS[image_format])
            found, why = _verified(done.shards[j], written, lambda pos: False)
            if found is None:
                raise DataError(f"`gali data prepare` wrote {done.shards[j]}, but it does not read back: {why}")
            _write_dali_index(done.shards[j], found)
    done.unreadable = [(index.name(i), unreadable[i]) for i in sorted(unreadable)]
    done.images = n - len(unreadable)
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    for i in unreadable:
        counts[index.labels[i]] -= 1
    done.class_counts = {name: int(c) for name, c in zip(index.class_names, counts, strict=True)}


def prepare_shards(
    src: str | Path,
    dst: str | Path,
    *,
    resolution: int,
    shards: int,
    workers: int | None = None,
    image_format: str = "jpeg",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, PreparedSplit]:
    """Write the splits of ``src`` (any source layout) as WebDataset shards under ``dst``.

    Each image is decoded as the torch backend decodes it, centre-cropped to a square of its shorter side and
    resized once to ``resolution`` with Pillow's bilinear filter, which is antialiased (its support widens with
    the downscale factor): the eval transform of the torch backend, and BigGAN's preparation (centre crop, then
    an antialiased resize). It is encoded as JPEG (quality 95, 4:4:4) or PNG; split s goes to
    ``dst/s/shard-00000.tar`` ... (``shards`` per split, fewer if the split has fewer images), the images in a
    seeded permutation of the source's order (so that a shard mixes classes, for readers that stream shards) cut
    into consecutive runs; key = the image's position in the source order. An ImageNet-style tree
    (``train/<synset>/`` and ``val/<synset>/``) gives splits 'train' and 'test' (from val); labels are the
    positions of the sorted synsets, and ``dst/classes.txt`` names the classes (line i: class i).

    An image that cannot be read is left out and named in its split's ``PreparedSplit.unreadable``. Each shard is
    read back and verified once written (``sources.scan_shard``), and DALI's index of it written beside it
    (``shard-00000.idx``: ``sources.dali_index``, what DALI's ``wds2idx`` writes). Every file is written through
    ``gali.engine.files.atomic_write``; the output depends on the inputs and the settings only, not on
    ``workers`` or on interruptions. ``dst`` must not exist, be empty, or hold an unfinished (or finished)
    preparation of the same source and settings (``dst/prepare.json``): that one is resumed, every shard already
    written and verified kept, the others (missing, or damaged) written, so the result is the same bytes as an
    uninterrupted run's. ``workers`` threads (default: one per core) decode, resize and encode; ``progress``
    shows a tqdm bar per split.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {tuple(FORMATS)}, got {image_format!r}")
    if resolution < 1 or shards < 1:
        raise ValueError(f"need resolution >= 1 and shards >= 1, got {resolution}, {shards}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst} exists and is not an empty folder; choose a new folder for the shards")
    splits = _prepare_indexes(src)
    class_names = splits[0][2].class_names
    manifest = {
        "settings": {"resolution": resolution, "shards": shards, "format": image_format, "seed": seed},
        "classes": class_names,
        "splits": {
            split: {"from": source_split, "images": len(index), "listing": _listing_digest(src, index)}
            for split, source_split, index in splits
        },
        "done": False,
    }
    if not _resumable(dst, manifest):
        dst.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, CLASSES_FILE):
        with contextlib.suppress(FileNotFoundError):
            (dst / f"{name}.tmp").unlink()
    write_text_atomic(dst / MANIFEST, _manifest_text(manifest))
    write_text_atomic(dst / CLASSES_FILE, "".join(f"{n}\n" for n in class_names))
    written = {}
    for split, source_split, index in splits:
        folder = dst / split
        folder.mkdir(exist_ok=True)
        done = PreparedSplit(images=0, shards=[], source_split=source_split, source_images=len(index))
        _prepare_split(
            index,
            folder,
            done,
            src=src,
            resolution=resolution,
            shards=shards,
            workers=workers or default_workers(),
            image_format=image_format,
            seed=seed,
            progress=progress,
            split=split,
        )
        written[split] = done
    manifest["done"] = {
        split: {"images": done.images, "unreadable": [os.path.relpath(name, src) for name, _ in done.unreadable]}
        for split, done in written.items()
    }
    write_text_atomic(dst / MANIFEST, _manifest_text(manifest))
    return written
