"""Benchmark the full training step per preset and mode against the paper-structured baseline, in one run.

Run: ``pytest bench/test_step.py --benchmark-json=FILE`` (``-k svhn32`` for one); ids ``test_step[<preset>-<mode>]``.
preset: ``svhn32-gali4``, ``celeba64-gali4``, ``celeba64-gali-mix`` (docs/method.md §3.2/§3.3 networks, width 1,
d_z = 256, batch 100). mode: ``baseline`` (:class:`gali.engine.step.paper.PaperStep`, what every mode is divided by);
``fp32`` (the eager step's defaults), ``fp32-nchw`` (NCHW layout), ``fp32-conv`` (full-kernel layers as ``nn.Conv``),
``bf16`` (autocast), ``compiled`` (torch.compile of G, E and D's trunk), ``graph``/``bf16-graph`` (CUDA graph replay).
Each round is one step, CUDA synchronised, after untimed warm-up steps. ``extra_info``: images/s, speed-up over the
preset's baseline in this run, model FLOPs per step (``gali info``'s ``measure_step_cost``), TFLOP/s and ``mfu``: model
FLOP/s over the GPU's dense bf16 peak from the run plan's table (``gali.engine.loop.plan.GPUS``), in every mode, as
torchtitan does (None on a CPU or a GPU not in the table: no peak is defined there), and peak memory (CUDA
``max_memory_allocated``; CPU peak RSS).
"""

import resource
from dataclasses import dataclass

import pytest
import torch

from gali.engine.loop.plan import peak_flops
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.layers import set_layer_impl
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step.build import build_step
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.cost import measure_step_cost
from gali.engine.step.paper import PaperStep

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, LATENT = 100, 256


@dataclass(frozen=True)
class Preset:
    arch: str
    resolution: int
    tuples: str
    latent_dim: int = LATENT
    width: float = 1.0
    unary_heads: bool = False
    batch: int = BATCH
    modes: tuple[str, ...] | None = None  # None: every mode

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, latent_dim=self.latent_dim, width=self.width, unary_heads=self.unary_heads)


PRESETS = {
    "svhn32-gali4": Preset("svhn32", 32, "gali4"),
    "celeba64-gali4": Preset("celeba64", 64, "gali4"),
    "celeba64-gali-mix": Preset("celeba64", 64, "gali-mix"),
    # the imagenet128-gali4 preset's networks (BigGAN ch96 G, ResNet-50 E, BigBiGAN-class D with unary heads)
    # at full width on a GPU; at 1/16 width and batch 16 on the CPU, where the full networks take minutes a step
    "imagenet128-gali4": Preset(
        "biggan128",
        128,
        "gali4",
        latent_dim=120,
        unary_heads=True,
        width=1.0 if DEVICE.type == "cuda" else 1 / 16,
        batch=BATCH if DEVICE.type == "cuda" else 16,
        modes=("baseline", "fp32", "bf16", "bf16-graph"),
    ),
}
MODES = {  # mode -> (compute settings, warm-up steps)
    "baseline": (None, 1),
    "fp32": (ComputeConfig(precision="fp32"), 1),
    "fp32-nchw": (ComputeConfig(precision="fp32", channels_last=False), 1),
    "fp32-conv": (ComputeConfig(precision="fp32"), 1),
    "bf16": (ComputeConfig(precision="bf16"), 1),
    "compiled": (ComputeConfig(precision="fp32", compile=True), 2),
    "graph": (ComputeConfig(precision="fp32", cuda_graph=True), 5),
    "bf16-graph": (ComputeConfig(precision="bf16", cuda_graph=True), 5),
}
CASES = [
    pytest.param(preset, mode, id=f"{preset}-{mode}")
    for preset, spec in PRESETS.items()
    for mode in MODES
    if spec.modes is None or mode in spec.modes
]
_baseline_seconds: dict[str, float] = {}
_model_flops: dict[str, int] = {}


def _networks(preset: Preset) -> tuple[Networks, object]:
    torch.manual_seed(0)
    spec = load_spec(preset.tuples)
    G, E, D = build_models(preset.model, slot_kinds=spec.slot_kinds, num_classes=spec.num_classes)
    return Networks(G=G.to(DEVICE), E=E.to(DEVICE), D=D.to(DEVICE)), spec


def _runner(preset: Preset, mode: str, compute: ComputeConfig | None):
    nets, spec = _networks(preset)
    if mode == "fp32-conv":
        for net in (nets.G, nets.E, nets.D):
            set_layer_impl(net, "ref")
    method, optim = MethodConfig(tuples=preset.tuples), OptimConfig()
    if compute is None:
        runner = PaperStep(nets, spec, method, optim, preset.latent_dim)
        return lambda x, noise: runner.step(x, noise)
    runner = build_step(nets, spec, method, optim, preset.latent_dim, compute)
    return lambda x, noise: runner.step(x, noise)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _count_model_flops(preset: Preset) -> int:
    """Forward plus one full backward of the step's losses, per step of BATCH: the work any implementation must do.

    The count ``gali info`` prints (:func:`gali.engine.step.cost.measure_step_cost`), scaled to the batch.
    """
    nets, spec = _networks(preset)
    cost = measure_step_cost(
        nets, spec, MethodConfig(tuples=preset.tuples), preset.latent_dim, preset.resolution, device=DEVICE
    )
    return round(cost.flops_per_image * preset.batch)


@pytest.mark.parametrize(("preset_name", "mode"), CASES)
def test_step(benchmark, preset_name: str, mode: str) -> None:
    compute, warmup = MODES[mode]
    if compute is not None and compute.cuda_graph and DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if compute is not None and compute.compile and DEVICE.type == "cpu" and preset_name != "svhn32-gali4":
        pytest.skip("Inductor's CPU compile of the 64² networks takes many minutes on 2 cores; GPU only")
    preset = PRESETS[preset_name]
    if preset_name not in _model_flops:
        _model_flops[preset_name] = _count_model_flops(preset)
    step = _runner(preset, mode, compute)
    x = (
        torch.rand(
            preset.batch,
            3,
            preset.resolution,
            preset.resolution,
            device=DEVICE,
            generator=torch.Generator(DEVICE).manual_seed(1),
        )
        * 2
        - 1
    )
    noise = torch.tensor(0.1, device=DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step() -> None:
        step(x, noise)
        _sync()

    rounds = 20 if DEVICE.type == "cuda" else 5
    benchmark.pedantic(one_step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    seconds = benchmark.stats.stats.median
    if mode == "baseline":
        _baseline_seconds[preset_name] = seconds
    flops = _model_flops[preset_name]
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    peak_per_s = peak_flops(DEVICE) if DEVICE.type == "cuda" else None  # no MFU on a CPU in the benchmark
    peak = peak_per_s / 1e12 if peak_per_s else None
    achieved = flops / seconds / 1e12
    benchmark.extra_info.update(
        {
            "device": device_name,
            "images/s": preset.batch / seconds,
            "ms/step": seconds * 1e3,
            "speedup_vs_baseline": (_baseline_seconds[preset_name] / seconds)
            if preset_name in _baseline_seconds
            else None,
            "model_flops/step": flops,
            "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None,
            "peak_memory_mb": (
                torch.cuda.max_memory_allocated()
                if DEVICE.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            / 2**20,
        }
    )
