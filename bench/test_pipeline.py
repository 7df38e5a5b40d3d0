"""Benchmark the data pipelines: images per second through one epoch, per backend and resolution.

Run: ``pytest bench/test_pipeline.py`` (add ``--benchmark-json=FILE`` to keep the numbers).

The benchmark writes its own data set once: 256 JPEG photos-like images of 500×375 (quality 90, smooth color
fields with noise, about the size and shape of an ImageNet image) in one class folder of a temporary folder. Each
round is one full epoch of batches of 32 on the training device (CUDA when present, with DALI decoding there in
'mixed' mode; else the CPU with DALI's CPU operators), synchronised before the clock stops; the first pass
(pipeline set-up, worker start) is a warm-up round. Backends: ``torch`` (Pillow in DataLoader workers),
``dali`` (skipped where nvidia-dali is not installed) and ``synthetic`` (random batches drawn on the device:
the ceiling, no data read). ``extra_info["images/s"]`` is the epoch's images over the median round time.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.pipelines import make_pipeline
from gali.pipelines.config import DataConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_IMAGES, SIZE, BATCH = 256, (500, 375), 32
WORKERS = min(8, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``NUM_IMAGES`` JPEGs of ``SIZE`` in one class folder."""
    root = tmp_path_factory.mktemp("bench-photos")
    (root / "all").mkdir()
    rng = np.random.default_rng(0)
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w] / w
    for i in range(NUM_IMAGES):
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = np.stack([128 + 100 * np.sin(2 * np.pi * (xx * (1 + c) + yy) + phase[c]) for c in range(3)], -1)
        field += rng.normal(0, 8, field.shape)
        Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(root / "all" / f"{i:04d}.jpg", quality=90)
    return root


@pytest.mark.parametrize("resolution", [64, 128, 256])
@pytest.mark.parametrize("backend", ["torch", "dali", "synthetic"])
def test_pipeline_epoch(benchmark, photos, backend, resolution):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali backend needs nvidia-dali (pip install gali[dali])")
    cfg = DataConfig(source="folder", root=str(photos), resolution=resolution, backend=backend, workers=WORKERS)
    pipeline = make_pipeline(cfg, split="train", batch_size=BATCH, device=DEVICE, seed=0)
    epoch = iter(range(1_000_000))

    def one_epoch() -> int:
        pipeline.set_epoch(next(epoch))
        seen = 0
        for batch in pipeline:
            seen += batch.x.shape[0]
            if backend == "synthetic" and seen >= NUM_IMAGES:  # its epoch is CIFAR-10 sized: time as many images
                break
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return seen

    images = benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        {
            "images": images,
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "workers": WORKERS,
            "torch": torch.__version__,
        }
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images/s"] = images / benchmark.stats.stats.median
