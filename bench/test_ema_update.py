"""Host time of one moving-average update (``WeightAverage.update``) against the per-buffer update it replaced.

Run: ``pytest bench/test_ema_update.py --benchmark-json=FILE``; ids ``test_ema_update[<networks>-<impl>]``.
networks: ``demo`` (the demo preset's G and E), ``imagenet128-w0.0625`` (the imagenet128-gali4 preset's BigGAN G
and ResNet-50 E at 1/16 width). impl: ``per-buffer`` (one foreach lerp per network and one ``copy_`` per buffer:
the update before issue 22 item 4, what ``foreach`` is divided by) and ``foreach`` (one foreach lerp over both
networks' parameters and one foreach copy of their buffers). On a CPU the networks are small enough that the time
is mostly the host's dispatch, the part a CUDA step pays next to its graph replay; ``extra_info`` has the
speed-up over ``per-buffer`` in this run and the tensor counts.
"""

import pytest
import torch

from gali.engine.loop.config import load_config
from gali.engine.loop.ema import WeightAverage
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import build_networks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the imagenet preset needs a data.root to load; no data is read here
NETWORKS = {
    "demo": ("demo", []),
    "imagenet128-w0.0625": ("imagenet128-gali4", ["model.width=0.0625", "data.root=/unused"]),
}
_baseline: dict[str, float] = {}


def _average(networks: str) -> WeightAverage:
    preset, overrides = NETWORKS[networks]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    nets = build_networks(
        cfg.model, cfg.method, load_spec(cfg.method.tuples), resolution=cfg.data.resolution, device=DEVICE
    )
    return WeightAverage(nets, ema_kimg=cfg.run.ema_kimg or 10.0, rampup=0.0, start_kimg=0.0)


@torch.no_grad()
def _per_buffer_update(ema: WeightAverage, images_seen: int, batch_size: int) -> None:
    """The update before issue 22 item 4: one foreach lerp per network, one ``copy_`` per buffer."""
    weight = 1.0 - ema.beta(images_seen, batch_size)
    for name, live in ema.live.items():
        averaged = ema.averaged[name]
        torch._foreach_lerp_(list(averaged.parameters()), list(live.parameters()), weight)
        for mine, theirs in zip(averaged.buffers(), live.buffers(), strict=True):
            mine.copy_(theirs)


@pytest.mark.parametrize("impl", ["per-buffer", "foreach"])
@pytest.mark.parametrize("networks", list(NETWORKS))
def test_ema_update(benchmark, networks: str, impl: str) -> None:
    ema = _average(networks)
    update = (
        (lambda: _per_buffer_update(ema, 100_000, 64)) if impl == "per-buffer" else (lambda: ema.update(100_000, 64))
    )

    def one_update() -> None:
        update()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one_update, rounds=200, warmup_rounds=10, iterations=1)
    seconds = benchmark.stats.stats.median
    if impl == "per-buffer":
        _baseline[networks] = seconds
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "us/update": seconds * 1e6,
            "speedup_vs_per_buffer": _baseline[networks] / seconds if networks in _baseline else None,
            "parameters": sum(len(list(net.parameters())) for net in ema.live.values()),
            "buffers": sum(len(list(net.buffers())) for net in ema.live.values()),
        }
    )
