"""Every convolution shape the networks build, run forward and backward in a child process each.

The shapes are recorded from G, E and D built on the meta device (no memory, no compute) at the widths the
tests and the presets use. Each shape runs in both layouts (channels-last and NCHW) in two forms: the
engine's own layer (what training runs) and, where that layer has a fast form, ``nn.Conv``'s plain forward
(the reference twin). A crash is a finding, not a dead sweep (tests/isolation.py).

``python -m tests.conv_sweep`` prints the findings as a Markdown table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from gali.engine.loop.config import load_config, preset_names
from gali.engine.method.tuple_spec import EXTRA, IMAGE, LATENT, load_spec
from gali.engine.nets import biggan, layers, paper
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.paper import build_models
from tests.isolation import Crashed, run_isolated

BATCH = 2
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
TEST_MODELS = (  # the model sections the tests build
    *(ModelConfig(arch=a, latent_dim=8, width=w) for a in ("svhn32", "celeba64") for w in (0.125, 0.25)),
    *(
        ModelConfig(arch=a, latent_dim=z, width=1 / 48, encoder_resolution=e, encoder_block=b, unary_heads=True)
        for a, z, e in (("biggan128", 12, 0), ("biggan128", 12, 256), ("biggan256", 14, 0))
        for b in ("bottleneck", "revnet")
    ),
)


@dataclass(frozen=True, order=True)
class ConvShape:
    """One convolution as a network builds it: its class (by name in nn or the engine's layers) and its input."""

    layer: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    bias: bool
    input_shape: tuple[int, ...]

    def build(self) -> nn.Module:
        cls = getattr(layers, self.layer, None) or getattr(nn, self.layer)
        if cls is layers.SubsampledPointConv2d:
            return cls(self.in_channels, self.out_channels, self.stride, bias=self.bias)
        return cls(self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, bias=self.bias)

    def __str__(self) -> str:
        size = "×".join(map(str, self.input_shape))
        channels = f"{self.in_channels}→{self.out_channels}"
        return f"{self.layer} {channels} k{self.kernel} s{self.stride} p{self.padding} on {size}"


def _model_sections() -> list[tuple[ModelConfig, str]]:
    """(model section, tuple spec) pairs: the tests' and every preset's."""
    sections = [(m, "gali4") for m in TEST_MODELS]
    for name in preset_names():
        cfg = load_config(name, ["data.backend=synthetic"])
        sections.append((cfg.model, cfg.method.tuples))
    return sections


@contextlib.contextmanager
def _no_spectral_norm() -> Iterator[None]:
    """Spectral norm changes no shape, and its power iteration at build time is slow on the meta device."""
    with (
        mock.patch.object(paper, "spectral_norm", lambda m, **_: m),
        mock.patch.object(biggan, "spectral_norm", lambda m, **_: m),
    ):
        yield


def network_conv_shapes() -> list[ConvShape]:
    """The distinct convolution shapes of G, E and D over the tests' and presets' model sections, at batch 2."""
    shapes: set[ConvShape] = set()

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        cls = type_before_parametrizations(module)
        shapes.add(
            ConvShape(
                cls.__name__,
                module.in_channels,
                module.out_channels,
                module.kernel_size[0],
                module.stride[0],
                module.padding[0],
                module.bias is not None,
                tuple(inputs[0].shape),
            )
        )

    for model, tuples in _model_sections():
        spec = load_spec(tuples)
        with torch.device("meta"), _no_spectral_norm():
            nets = build_models(model, slot_kinds=spec.slot_kinds, num_classes=spec.num_classes, extra_dim=16)
            for net in nets:
                for m in net.modules():
                    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                        m.register_forward_pre_hook(record)
            g, e, d = nets
            labels = torch.zeros(BATCH, dtype=torch.long) if model.label_classes else None
            z = torch.empty(BATCH, model.latent_dim)
            g(z, labels)
            e(torch.empty(BATCH, 3, model.data_resolution, model.data_resolution))
            sizes = {IMAGE: (3, model.resolution, model.resolution), LATENT: (model.latent_dim,), EXTRA: (16,)}
            slots = [torch.empty(BATCH, *sizes[kind]) for kind in spec.slot_kinds]
            d(slots, labels) if labels is not None else d(slots)
    return sorted(shapes)


def run_case(shape: ConvShape, form: str, layout: str) -> None:
    """Forward and backward of one shape in one form ('engine' or 'torch') and layout, on the CPU."""
    torch.manual_seed(0)
    layer = shape.build().to(memory_format=LAYOUTS[layout])
    if form == "torch":
        layers.set_layer_impl(layer, "ref")
    x = torch.randn(shape.input_shape).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    out = layer(x)
    torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])


def cases(shapes: list[ConvShape]) -> list[tuple[ConvShape, str, str]]:
    """Every (shape, form, layout): the engine's form always, the plain torch form where the two differ."""
    fast = {cls.__name__ for cls in layers.FAST_LAYERS}
    forms = lambda s: ("engine", "torch") if s.layer in fast else ("engine",)  # noqa: E731
    return [(s, form, layout) for s in shapes for form in forms(s) for layout in LAYOUTS]


def sweep(shapes: list[ConvShape]) -> dict[tuple[ConvShape, str, str], str]:
    """Each case's outcome: 'ok', or the signal that killed its child ('SIGSEGV', 'SIGABRT', 'timeout ...')."""
    outcomes = {}
    for case in cases(shapes):
        try:
            run_isolated(run_case, *case, timeout=120)
            outcomes[case] = "ok"
        except Crashed as crash:
            outcomes[case] = crash.signal_name
    return outcomes


if __name__ == "__main__":
    import os

    shapes = network_conv_shapes()
    outcomes = sweep(shapes)
    path = torch.backends.cpu.get_cpu_capability()
    print(
        f"{len(shapes)} shapes, {len(outcomes)} cases, torch {torch.__version__}, CPU kernel path {path}"
        f" (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})\n"
    )
    print("| shape | form | layout | outcome |\n|---|---|---|---|")
    for (shape, form, layout), outcome in outcomes.items():
        if outcome != "ok":
            print(f"| {shape} | {form} | {layout} | {outcome} |")
