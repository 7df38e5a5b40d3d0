"""Host time of summing one step's statistics for the tick (``TickStats.add``) against the per-statistic sums it
replaced.

Run: ``pytest bench/test_tick_stats.py --benchmark-json=FILE``; ids ``test_tick_stats_add[<phases>-<impl>]``.
phases: ``both`` (n_dis = 1: every step has the 9 statistics of the demo's gali4 step, ``p_true`` a vector of 4)
and ``alternating`` (n_dis = 2: 'd', 'd', 'ge' steps, each with its side's statistics). impl: ``per-statistic`` (one
out-of-place add per statistic per step: the sums before issue 22 item 4, what ``foreach`` is divided by) and
``foreach`` (one foreach add into preallocated sums). Each round adds 30 steps (a tick of the demo) to fresh sums;
``extra_info`` has the speed-up over ``per-statistic`` in this run.
"""

import pytest
import torch

from gali.engine.loop.ticks import TickStats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PHASES = {"both": ["both"], "alternating": ["d", "d", "ge"]}
STEPS = 30
_baseline: dict[str, float] = {}


class PerStatistic:
    """The sums before issue 22 item 4."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1


def _stats(phase: str) -> dict[str, torch.Tensor]:
    scalar = torch.ones((), device=DEVICE)
    stats = {name: scalar.clone() for name in ("loss_d", "loss_ge", "e_sigma", "e_mu_spread")}
    stats["p_true"] = torch.ones(4, device=DEVICE)
    for side in {"both": ("d", "ge"), "d": ("d",), "ge": ("ge",)}[phase]:
        stats[f"grad_norm_{side}"], stats[f"skipped_{side}"] = scalar.clone(), scalar.clone()
    return stats


@pytest.mark.parametrize("impl", ["per-statistic", "foreach"])
@pytest.mark.parametrize("phases", list(PHASES))
def test_tick_stats_add(benchmark, phases: str, impl: str) -> None:
    steps = [_stats(PHASES[phases][i % len(PHASES[phases])]) for i in range(STEPS)]
    make = PerStatistic if impl == "per-statistic" else TickStats

    def one_tick() -> None:
        sums = make()
        for stats in steps:
            sums.add(stats)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one_tick, rounds=100, warmup_rounds=5, iterations=1)
    seconds = benchmark.stats.stats.median
    if impl == "per-statistic":
        _baseline[phases] = seconds
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "us/step": seconds / STEPS * 1e6,
            "speedup_vs_per_statistic": _baseline[phases] / seconds if phases in _baseline else None,
        }
    )
