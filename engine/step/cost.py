"""What one training step costs per image: model FLOPs and activation memory, counted from shapes in seconds.

Both come from the eager step's forward (every chain call, D over all K tuples, the head) and one backward of
L_D + L_GE, at two small batch sizes, reported as the slope per image, so the batch-independent work (spectral
norm's power iterations, weights saved for the backward) does not count. ``torch.utils.flop_counter`` counts the
matmuls and convolutions (2 FLOPs per multiply-add); activation memory is the bytes of the distinct non-parameter
tensors autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``), each storage position
counted once. :func:`fake_networks` builds the networks on the meta device and runs the step on fake tensors
(``FakeTensorMode``): no weight or activation is allocated, so an ImageNet step is counted in seconds on a laptop.
:func:`measure_step_cost` runs the same count on real networks too (the twin the test compares with). ``gali
info``, the run plan and the step benchmark's model-FLOP/s column use this count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils import parametrizations
from torch.utils.flop_counter import FlopCounterMode

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.nets.biggan import CheckpointedBlock
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks, build_networks
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep

COST_BATCHES = (2, 3)  # the two batch sizes counted (BatchNorm needs two rows; small, for the real twin's memory)


@dataclass(frozen=True)
class StepCost:
    """Per real image of the batch: model FLOPs of forward + backward, and bytes saved for the backward.

    ``activation_bytes_fixed`` is the batch-independent part of the saved bytes (the spectral-normalised weights,
    autocast's low-precision weight copies). ``checkpointed_bytes_per_image`` is what is kept with
    ``compute.activation_checkpointing``: the tensors saved outside the residual blocks, the blocks' inputs, and
    the largest block's own saved tensors (one block is recomputed at a time); without blocks it equals
    ``activation_bytes_per_image``.
    """

    flops_per_image: float
    activation_bytes_per_image: float
    activation_bytes_fixed: float
    checkpointed_bytes_per_image: float


def fake_networks(model: ModelConfig, method: MethodConfig, spec: TupleSpec, resolution: int) -> Networks:
    """The config's networks with fake CPU tensors for weights: shapes only, nothing allocated, built in seconds.

    Built on the meta device (the spectral norms' power iterations, which compute nothing there, are skipped),
    then every parameter and buffer becomes a fake CPU tensor of one ``FakeTensorMode``, which
    :func:`measure_step_cost` enters.
    """
    meta = torch.device("meta")
    with meta, mock.patch.object(parametrizations._SpectralNorm, "_power_method", lambda *args, **kwargs: None):
        nets = build_networks(model, method, spec, resolution=resolution, device=meta)
    mode = FakeTensorMode()
    cpu = torch.device("cpu")
    converted: dict[int, Tensor] = {}  # shared tensors stay shared

    def fake(t: Tensor) -> Tensor:
        if id(t) not in converted:
            f = mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu)
            converted[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
        return converted[id(t)]

    for net in _modules(nets):
        for module in net.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is not None:
                        tensors[name] = fake(t)
    return nets


def measure_step_cost(
    nets: Networks,
    spec: TupleSpec,
    method: MethodConfig,
    latent_dim: int,
    resolution: int,
    *,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> StepCost:
    """The step's FLOPs and saved bytes per image, as the slope between two small batches.

    ``nets`` are real or from :func:`fake_networks` (then counted on fake tensors); ``precision`` 'fp32' or 'bf16'
    (the CPU's autocast: its op lists, not CUDA's). The networks are used as they are: no optimizer step is
    taken, and the gradients it leaves are cleared.
    """
    parameter = next(nets.D.parameters())
    device = device or parameter.device
    mode = parameter.fake_mode if isinstance(parameter, FakeTensor) else nullcontext()
    with mode:
        compute = ComputeConfig(precision=precision, kernel_impl="ref", channels_last=False)
        step = GaliStep(nets, spec, method, OptimConfig(), latent_dim, compute)
        small, large = (_measure(step, batch, resolution, device) for batch in COST_BATCHES)
    for p in step.d_params + step.ge_params:
        p.grad = None
    images = COST_BATCHES[1] - COST_BATCHES[0]
    per_image = [(b - a) / images for a, b in zip(small, large, strict=True)]
    return StepCost(
        flops_per_image=per_image[0],
        activation_bytes_per_image=per_image[1],
        activation_bytes_fixed=small[1] - COST_BATCHES[0] * per_image[1],
        checkpointed_bytes_per_image=per_image[2],
    )


def _modules(nets: Networks) -> list[nn.Module]:
    return [net for net in (nets.G, nets.E, nets.D, nets.M) if net is not None]


def _storage(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _measure(step: GaliStep, batch: int, resolution: int, device: torch.device) -> tuple[int, int, int]:
    """(FLOPs, saved bytes, saved bytes under activation checkpointing) of one forward and backward at ``batch``."""
    parameters = {_storage(p) for p in step.d_params + step.ge_params}
    saved: dict[tuple[int, int], int] = {}  # (storage, byte offset) -> bytes: distinct tensors, views counted once
    kept = _Checkpointed()

    def pack(t: Tensor) -> Tensor:
        if _storage(t) not in parameters:
            key, size = (_storage(t), t.storage_offset() * t.element_size()), t.numel() * t.element_size()
            saved[key] = max(saved.get(key, 0), size)
            kept.add(key, size)
        return t

    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    classes = step.nets.G.label_classes  # class-conditional networks take one label per image
    labels = torch.randint(classes, (batch,), device=device) if classes else None
    with FlopCounterMode(display=False) as counter, kept.watching(_modules(step.nets), parameters):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step.discriminate(x, torch.tensor(0.0, device=device), labels=labels)
        (out["loss_d"] + out["loss_ge"]).backward()
    return counter.get_total_flops(), sum(saved.values()), kept.total()


class _Checkpointed:
    """Which saved tensors activation checkpointing keeps: those saved outside every residual block
    (:class:`gali.engine.nets.biggan.CheckpointedBlock`) and the blocks' inputs, plus the largest block call's
    own saved tensors, alive while that block is recomputed in the backward."""

    def __init__(self) -> None:
        self.outside: dict[tuple[int, int], int] = {}
        self.calls: list[dict[tuple[int, int], int]] = []  # each block call's saved tensors
        self.open: dict[tuple[int, int], int] | None = None
        self.opened_by: nn.Module | None = None
        self.inputs: list[Tensor] = []

    def add(self, key: tuple[int, int], size: int) -> None:
        into = self.outside if self.open is None else self.open
        into[key] = max(into.get(key, 0), size)

    def total(self) -> int:
        recomputed = (sum(v for k, v in call.items() if k not in self.outside) for call in self.calls)
        return sum(self.outside.values()) + max(recomputed, default=0)

    @contextmanager
    def watching(self, nets: list[nn.Module], parameters: set[int]) -> Iterator[None]:
        def enter(module: nn.Module, inputs: tuple) -> None:
            if self.open is None:  # the outermost block: its inputs are what recomputing it needs
                for t in inputs:
                    if isinstance(t, Tensor) and _storage(t) not in parameters:
                        self.inputs.append(t)  # kept, as checkpointing keeps it: no other tensor takes its storage
                        self.add((_storage(t), t.storage_offset() * t.element_size()), t.numel() * t.element_size())
                self.open = {}
                self.opened_by = module

        def leave(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.open is not None and module is self.opened_by:
                self.calls.append(self.open)
                self.open = None

        blocks = [m for net in nets for m in net.modules() if isinstance(m, CheckpointedBlock)]
        handles = [h for m in blocks for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
