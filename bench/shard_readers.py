"""Shard readers compared on `gali data prepare`'s shards (issue 24, item 4): gali's verifying indexer against wids.

``python bench/shard_readers.py index SHARDS [--repeat 5]``: seconds to open the train split: gali's indexer
(``sources.open_split``: every tar header read and checked, labels read, the shard's end verified) against wids
(``wids.ShardListDataset`` over the shards, sample counts from the DALI indexes that ``gali data prepare`` writes,
every label read through it, which builds wids's index of each shard).

``python bench/shard_readers.py fetch SHARDS [--items 2000]``: microseconds per image in one process, gali's index
against wids: fetching the encoded bytes of random items, and fetching them with the decode and resize to 128².

``python bench/shard_readers.py damage SHARD``: what each reader makes of damaged copies of one shard (the cuts of
``tests/pipelines/test_shards_verified.py``): gali's ``DataError``, or wids's samples and the last image's size.

``python bench/shard_readers.py read SHARDS --reader torch|wids|dali [--workers 2] [--epochs 2]``: images/s of reading
the train split (``make_imagenet_like.read``: batches of 32, 128², the eval transform). ``wids`` is the torch backend
with wids's dataset standing in for gali's index. wids is not a dependency of gali: ``pip install wids``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from make_imagenet_like import read

from gali.engine.errors import DataError
from gali.pipelines import torch_files
from gali.pipelines.sources import CLASSES_FILE, dali_index_path, open_split, read_class_names, scan_shard


@dataclass
class WidsSplit:
    """A split of prepared shards read through wids (``SplitIndex``'s protocol): item i is wids's sample i."""

    where: Path
    dataset: Any  # wids.ShardListDataset
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"{self.where}:{i}"

    def image_file(self, i: int) -> BinaryIO:
        return self.dataset[i][".jpg"]


def open_wids(root: Path, split: str) -> WidsSplit:
    """The ``split`` of the prepared ``root`` through ``wids.ShardListDataset``: the shards read in place (no copy
    into wids's cache), every label read (so every shard indexed by wids)."""
    import wids

    shards = sorted((root / split).glob("*.tar"))
    counts = [int(dali_index_path(s).read_text().split(maxsplit=2)[1]) for s in shards]  # 'v1.2 <samples>'
    listing = [{"url": str(s), "nsamples": n} for s, n in zip(shards, counts, strict=True)]
    with contextlib.redirect_stderr(io.StringIO()):  # it prints a line for every dataset it opens
        dataset = wids.ShardListDataset(listing, localname=str, transformations=[], lru_size=len(shards))
    labels = np.array([int(dataset[i][".cls"].read()) for i in range(len(dataset))], dtype=np.int64)
    return WidsSplit(root / split, dataset, labels, read_class_names(root / CLASSES_FILE))


def time_index(root: Path, repeat: int) -> None:
    openers = {"gali": lambda: open_split("webdataset", root, "train"), "wids": lambda: open_wids(root, "train")}
    for reader, opener in openers.items():
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            n = len(opener())
            seconds.append(time.perf_counter() - start)
        best, median = min(seconds), statistics.median(seconds)
        print(f"{reader}: {n} samples in {median:.3f} s (median of {repeat}; best {best:.3f} s): {n / median:,.0f}/s")


def time_fetch(root: Path, items: int) -> None:
    splits = {"gali": open_split("webdataset", root, "train"), "wids": open_wids(root, "train")}
    order = np.random.default_rng(0).permutation(len(splits["gali"]))[:items].tolist()
    for _ in range(2):  # the second round with warm caches
        for reader, split in splits.items():
            start = time.perf_counter()
            for i in order:
                split.image_file(i).read()
            fetched = time.perf_counter()
            for i in order:
                torch_files.load_image(split.image_file(i), 128)
            decoded = time.perf_counter()
            per_image = [1e6 * t / len(order) for t in (fetched - start, decoded - fetched)]
            print(f"{reader}: fetch {per_image[0]:.1f} us/image, fetch + decode + resize {per_image[1]:.0f} us/image")


def damaged_copies(shard: Path) -> dict[str, bytes]:
    """Damaged copies of ``shard``: cut inside a header, inside data, at a member boundary, after the last member,
    to half, and with trailing garbage."""
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = members[2]
    last_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    return {
        "cut inside a header": data[: second.offset + 100],
        "cut inside a member's data": data[: second.offset_data + 7],
        "cut at a member boundary": data[: second.offset],
        "cut after the last member": data[:last_end],
        "cut to half": data[: len(data) // 2],
        "trailing garbage": data + b"\x01garbage" * 100,
    }


def damage(shard: Path) -> None:
    from wids.wids import IndexedTarSamples  # not in wids's public names: the per-shard reader of ShardListDataset

    whole = len(scan_shard(shard))
    copy = shard.with_name("damaged-copy.tar.bench")
    try:
        for why, data in damaged_copies(shard).items():
            copy.write_bytes(data)
            try:
                found = f"{len(scan_shard(copy))} samples"
            except DataError as e:
                found = f"DataError: {str(e).split('; it was cut short')[0].replace(str(copy), 'SHARD')}"
            try:
                samples = IndexedTarSamples(path=str(copy))
                last = samples[len(samples) - 1].get(".jpg")
                got = f"{len(samples)} of {whole} samples, last image {len(last.getvalue()) if last else '-'} bytes"
            except Exception as e:  # what wids raises is what it reports
                got = f"{type(e).__module__}.{type(e).__name__}: {e}"
            print(f"{why}:\n  gali: {found}\n  wids: {got}")
    finally:
        copy.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    i = commands.add_parser("index", help="time opening the train split")
    i.add_argument("shards", type=Path)
    i.add_argument("--repeat", type=int, default=5)
    f = commands.add_parser("fetch", help="microseconds per image in one process")
    f.add_argument("shards", type=Path)
    f.add_argument("--items", type=int, default=2000)
    d = commands.add_parser("damage", help="what each reader makes of a damaged shard")
    d.add_argument("shard", type=Path)
    r = commands.add_parser("read", help="images/s reading the train split")
    r.add_argument("shards", type=Path)
    r.add_argument("--reader", choices=("torch", "wids", "dali"), default="torch")
    r.add_argument("--resolution", type=int, default=128)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.command == "index":
        time_index(args.shards, args.repeat)
    elif args.command == "fetch":
        time_fetch(args.shards, args.items)
    elif args.command == "damage":
        damage(args.shard)
    else:
        if args.reader == "wids":
            torch_files.open_split = lambda source, root, split: open_wids(root, split)
        print(f"reader {args.reader}:")
        read(args.shards, args.resolution, args.workers, args.epochs, "dali" if args.reader == "dali" else "torch")


if __name__ == "__main__":
    main()
