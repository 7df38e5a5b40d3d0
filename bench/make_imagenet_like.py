"""An ImageNet-like tree of real-looking JPEGs for timing ``gali data prepare``, and a timer of reading its shards.

Make: ``python bench/make_imagenet_like.py make OUT [--classes 100] [--train 90] [--val 10] [--processes 2]`` writes
``OUT/train/<synset>/<synset>_<i>.JPEG`` and ``OUT/val/<synset>/...`` (10,000 images by default). Each image is
photo-like for a JPEG encoder: a few smooth colour gradients and blobs with sensor-like noise, saved at quality 90
(4:2:0), of mixed sizes drawn like ImageNet's: the longer side 250..500 pixels, aspect ratios 3:4..16:9 both ways,
a tenth square; one in fifty grayscale. The images depend on the seed only.

Time reading: ``python bench/make_imagenet_like.py read SHARDS [--resolution 128] [--workers 2] [--epochs 2]``
reads the train split of ``gali data prepare``'s shards through the torch backend or ``--backend dali``
(``make_pipeline``, batches of 32, the loop of ``bench/test_pipeline.py``) and prints images/s per epoch; the first
epoch includes set-up.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def synsets(n: int) -> list[str]:
    return [f"n{1440764 + 7919 * i:08d}" for i in range(n)]


def photo(rng: np.random.Generator) -> Image.Image:
    """One photo-like image of a random ImageNet-like size."""
    long = int(rng.integers(250, 501))
    ratio = 1.0 if rng.random() < 0.1 else float(rng.uniform(4 / 3, 16 / 9))
    short = max(64, round(long / ratio))
    w, h = (long, short) if rng.random() < 0.7 else (short, long)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    image = np.zeros((h, w, 3), np.float32)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-80, 80, (2, 3))
    image += base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(int(rng.integers(2, 6))):  # blobs: objects, out of focus
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
        color = rng.uniform(-90, 90, 3)
        image += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * color
    freq = rng.uniform(5, 40)
    image += 12 * np.sin(2 * np.pi * freq * (xx + 0.3 * yy))[..., None]  # texture
    image += rng.normal(0, 6, (h, w, 1)) + rng.normal(0, 3, (h, w, 3))  # luminance and colour noise
    pil = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    return pil.convert("L") if rng.random() < 0.02 else pil


def _write_class(args: tuple[Path, str, int, int, int]) -> int:
    out, synset, label, train, val = args
    rng = np.random.default_rng([label, 2026])
    for split, n in (("train", train), ("val", val)):
        folder = out / split / synset
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo(rng).save(folder / f"{synset}_{i}.JPEG", "JPEG", quality=90)
    return train + val


def make(out: Path, classes: int, train: int, val: int, processes: int) -> None:
    jobs = [(out, synset, label, train, val) for label, synset in enumerate(synsets(classes))]
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        total = sum(pool.map(_write_class, jobs))
    size = sum(p.stat().st_size for p in out.rglob("*.JPEG"))
    print(f"wrote {total} JPEGs ({size / 2**20:.0f} MiB) under {out} in {time.perf_counter() - start:.0f} s")


def read(shards: Path, resolution: int, workers: int, epochs: int, backend: str) -> None:
    import torch

    from gali.pipelines import make_pipeline
    from gali.pipelines.config import DataConfig

    cfg = DataConfig(source="webdataset", root=str(shards), resolution=resolution, backend=backend, workers=workers)
    pipeline = make_pipeline(cfg, split="train", batch_size=32, device=torch.device("cpu"), seed=0)
    for epoch in range(epochs):
        start = time.perf_counter()
        pipeline.set_epoch(epoch)
        seen = sum(batch.x.shape[0] for batch in pipeline)
        seconds = time.perf_counter() - start
        print(
            f"{backend} epoch {epoch}: {seen} images in {seconds:.1f} s: "
            f"{seen / seconds:.0f} images/s ({workers} workers)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make", help="write the tree")
    m.add_argument("out", type=Path)
    m.add_argument("--classes", type=int, default=100)
    m.add_argument("--train", type=int, default=90, help="train images per class")
    m.add_argument("--val", type=int, default=10, help="val images per class")
    m.add_argument("--processes", type=int, default=2)
    r = commands.add_parser("read", help="time the torch backend over prepared shards")
    r.add_argument("shards", type=Path)
    r.add_argument("--resolution", type=int, default=128)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--backend", choices=("torch", "dali"), default="torch")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.classes, args.train, args.val, args.processes)
    else:
        read(args.shards, args.resolution, args.workers, args.epochs, args.backend)


if __name__ == "__main__":
    main()
