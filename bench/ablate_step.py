"""What each of the step's CPU speed-ups is worth: the engine's step with one of them taken out again.

Run: ``python bench/ablate_step.py [--cycles 7]`` (GALI-4, the SVHN-32 paper networks, batch 100, fp32, the engine's
defaults otherwise). Variants:
- ``defaults``: the engine's step as ``gali train`` builds it;
- ``conv-layers``: the full-kernel layers as ``nn.Conv`` calls (``set_layer_impl(net, 'ref')``);
- ``no-grouping``: D gets each slot stacked into one tensor, so its rows are not grouped by gradient;
- ``randn_like-noise``: instance noise from ``torch.randn_like`` instead of a flat draw viewed in the layout.
The variants' steps are interleaved, one of each per cycle (the first untimed), so a shared machine's drift falls on all
alike; prints each variant's median and its ratio to ``defaults``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.layers import set_layer_impl
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step import eager as step_module
from gali.engine.step.build import build_step
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.graphed import GraphedStep

BATCH, LATENT = 100, 256
VARIANTS = ("defaults", "conv-layers", "no-grouping", "randn_like-noise")


def _step(variant: str) -> GaliStep | GraphedStep:
    torch.manual_seed(0)
    spec = load_spec("gali4")
    G, E, D = build_models(
        ModelConfig(arch="svhn32", latent_dim=LATENT), slot_kinds=spec.slot_kinds, num_classes=spec.num_classes
    )
    if variant == "conv-layers":
        for net in (G, E, D):
            set_layer_impl(net, "ref")
    if variant == "no-grouping":
        grouped = D.features
        D.features = lambda slots: grouped([torch.cat(blocks) for blocks in slots])
    return build_step(
        Networks(G=G, E=E, D=D),
        spec,
        MethodConfig(tuples="gali4"),
        OptimConfig(),
        LATENT,
        ComputeConfig(precision="fp32"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=7, help="steps per variant, the first one untimed")
    cycles = parser.parse_args().cycles
    steps = {variant: _step(variant) for variant in VARIANTS}
    x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.tensor(0.1)
    layout_noise: Callable[[torch.Tensor], torch.Tensor] = step_module._randn_in_layout
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for cycle in range(cycles):
        for variant, step in steps.items():
            step_module._randn_in_layout = torch.randn_like if variant == "randn_like-noise" else layout_noise
            start = time.perf_counter()
            step.step(x, noise)
            if cycle > 0:
                seconds[variant].append(time.perf_counter() - start)
    step_module._randn_in_layout = layout_noise
    base = statistics.median(seconds["defaults"])
    for variant, times in seconds.items():
        median = statistics.median(times)
        print(
            f"{variant:18s} {median * 1e3:7.0f} ms  {median / base:.3f}x defaults  "
            f"(each: {', '.join(f'{t * 1e3:.0f}' for t in times)} ms)"
        )


if __name__ == "__main__":
    main()
