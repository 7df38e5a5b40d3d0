"""Benchmark the step's stall per snapshot checkpoint: the main thread's time in ``Checkpoint.save``, written there
(``sync``, as before) or handed to the background writer (``background``: a host copy, then the write on its thread).

Run: ``pytest bench/test_checkpoint_stall.py --benchmark-json=FILE``; ids ``test_checkpoint_stall[sync]`` and
``[background]``. The imagenet128-gali4 networks at width 0.0625 (the tiny ImageNet networks) with their Adam
state after one step, fp32, one rank. Each round saves into a fresh file of a temporary folder; the background
round's write is waited for outside the timing. ``extra_info``: the checkpoint's MiB, the stall in ms and, for
``background``, the ratio of the ``sync`` stall measured in this run to its own.
"""

import pytest
import torch

from gali.engine.loop.checkpoint import BackgroundWriter, Checkpoint
from gali.engine.loop.config import load_config
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import build_networks
from gali.engine.step.build import build_step

_stall_ms: dict[str, float] = {}


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    cfg = load_config("imagenet128-gali4", ["model.width=0.0625", "run.device=cpu", "data.backend=synthetic"])
    spec, cpu = load_spec(cfg.method.tuples), torch.device("cpu")
    nets = build_networks(cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=cpu)
    step = build_step(nets, spec, cfg.method, cfg.optim, cfg.model.latent_dim, cfg.compute)
    step.step(torch.rand(2, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1, torch.tensor(0.1))  # Adam state
    return Checkpoint(cfg, nets, step)


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_checkpoint_stall(benchmark, checkpoint, mode: str, tmp_path) -> None:
    writer = BackgroundWriter() if mode == "background" else None
    paths = (tmp_path / f"checkpoint-{i:010d}.pt" for i in range(1000))

    def save() -> None:
        checkpoint.save(next(paths), writer)

    def wait_outside_the_timing() -> None:
        if writer is not None:
            writer.wait()

    benchmark.pedantic(save, setup=wait_outside_the_timing, rounds=5, warmup_rounds=1, iterations=1)
    wait_outside_the_timing()
    _stall_ms[mode] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(
        {
            "checkpoint_mib": max(p.stat().st_size for p in tmp_path.iterdir()) / 2**20,
            "stall_ms": _stall_ms[mode],
            "sync_stall_over_this": _stall_ms["sync"] / _stall_ms[mode] if "sync" in _stall_ms else None,
        }
    )
