"""What one training step costs per image: model FLOPs and activation memory, measured on small batches.

Both are measured on the eager step's forward (every chain call, D over all K tuples, the head) and
one backward of L_D + L_GE, at two small batch sizes, and reported as the slope per image, so the
batch-independent work (spectral norm's power iterations, weights saved for the backward) does not
count. ``torch.utils.flop_counter`` counts the matmuls and convolutions (2 FLOPs per multiply-add);
activation memory is the bytes of the distinct non-parameter tensors autograd saves for the backward
(``torch.autograd.graph.saved_tensors_hooks``), in fp32. ``gali info`` prints both, and the step
benchmark's model-FLOP/s column uses the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.nets.networks import Networks
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep

COST_BATCHES = (2, 3)  # the two batch sizes measured (BatchNorm needs two rows; small, for the host memory)


@dataclass(frozen=True)
class StepCost:
    """Per real image of the batch: model FLOPs of forward + backward, and bytes saved for the backward."""

    flops_per_image: float
    activation_bytes_per_image: float


def measure_step_cost(
    nets: Networks,
    spec: TupleSpec,
    method: MethodConfig,
    latent_dim: int,
    resolution: int,
    *,
    device: torch.device | None = None,
) -> StepCost:
    """The step's FLOPs and activation bytes per image, as the slope between two small batches.

    The networks are used as they are (their weights do not move: no optimizer step is taken, and
    the gradients it leaves are cleared).
    """
    device = device or next(nets.D.parameters()).device
    step = GaliStep(
        nets,
        spec,
        method,
        OptimConfig(),
        latent_dim,
        ComputeConfig(precision="fp32", kernel_impl="ref", channels_last=False),
    )
    measured = [_measure(step, batch, resolution, device) for batch in COST_BATCHES]
    (small_flops, small_bytes), (large_flops, large_bytes) = measured
    images = COST_BATCHES[1] - COST_BATCHES[0]
    for p in step.d_params + step.ge_params:
        p.grad = None
    return StepCost(
        flops_per_image=(large_flops - small_flops) / images,
        activation_bytes_per_image=(large_bytes - small_bytes) / images,
    )


def _measure(step: GaliStep, batch: int, resolution: int, device: torch.device) -> tuple[int, int]:
    """(FLOPs, saved activation bytes) of one forward and backward at ``batch`` real images."""
    parameters = {p.data_ptr() for p in step.d_params + step.ge_params}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.data_ptr() not in parameters:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    classes = step.nets.G.label_classes  # class-conditional networks take one label per image
    labels = torch.randint(classes, (batch,), device=device) if classes else None
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step.discriminate(x, torch.tensor(0.0, device=device), labels=labels)
        (out["loss_d"] + out["loss_ge"]).backward()
    return counter.get_total_flops(), sum(saved.values())
