"""Benchmark gradient accumulation: one update of N = 1 and of N = 4 micro-batches of the same size, in one run.

Run: ``pytest bench/test_accumulate.py --benchmark-json=FILE``; ids ``test_accumulate[n1]``, ``test_accumulate[n4]``.
The svhn32-gali4 networks of bench/test_step.py (width 1, d_z = 256, fp32 eager step) with a micro-batch of 100 images
on CUDA, 25 on the CPU. Each round is one update (N forward and backward passes, one reduction and one optimizer
step per side), CUDA synchronised, after an untimed warm-up update. ``extra_info``: real images/s, ms per update, and
the images/s relative to N = 1 in this run (below 1 by what the N - 1 extra passes cost beyond their images: the
optimizer step and the reduction are paid once per update, so the ratio stays near 1 where the passes dominate).
"""

import pytest
import torch

from bench.test_step import DEVICE, PRESETS, _networks, _sync
from gali.engine.method.config import MethodConfig
from gali.engine.step.build import build_step
from gali.engine.step.config import ComputeConfig, OptimConfig

PRESET = PRESETS["svhn32-gali4"]
MICRO_BATCH = 100 if DEVICE.type == "cuda" else 25
_images_per_second: dict[int, float] = {}


@pytest.mark.parametrize("accumulate", [1, 4], ids=["n1", "n4"])
def test_accumulate(benchmark, accumulate: int) -> None:
    nets, spec = _networks(PRESET)
    step = build_step(
        nets,
        spec,
        MethodConfig(tuples=PRESET.tuples),
        OptimConfig(),
        PRESET.latent_dim,
        ComputeConfig(precision="fp32"),
        accumulate=accumulate,
    )
    batch = MICRO_BATCH * accumulate
    generator = torch.Generator(DEVICE).manual_seed(1)
    x = torch.rand(batch, 3, PRESET.resolution, PRESET.resolution, device=DEVICE, generator=generator) * 2 - 1
    noise = torch.tensor(0.1, device=DEVICE)

    def one_update() -> None:
        step.step(x, noise)
        _sync()

    benchmark.pedantic(one_update, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    _images_per_second[accumulate] = batch / seconds
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "accumulate": accumulate,
            "micro_batch": MICRO_BATCH,
            "images/s": batch / seconds,
            "ms/update": seconds * 1e3,
            "images_per_second_vs_n1": _images_per_second[accumulate] / _images_per_second[1]
            if 1 in _images_per_second
            else None,
        }
    )
