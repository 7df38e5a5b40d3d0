"""The step runner the ``[compute]`` section asks for: layout, compiled networks, graphed or eager."""

from __future__ import annotations

import torch

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.nets.biggan import set_activation_checkpointing
from gali.engine.nets.networks import Networks
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.graphed import GraphedStep


def compile_networks(nets: Networks) -> None:
    """torch.compile G, E and D's feature trunk in place (state-dict keys unchanged).

    D is called through ``features`` (the head is the fused kernel), so that method is what is
    compiled; the kernels are custom ops, opaque to the compiler. AOTAutograd's compiled backward
    computes the gradient of every input that requires one, whatever ``autograd.grad`` asked for
    (checked on a two-conv function: two convolution backwards for one weight's gradient, against
    one in eager), so each of the step's two gradient passes runs all of D's backward: on the
    2-core CPU the compiled step is slower than eager (bench/reports/2026-11-30-cpu-step-2.md).
    """
    nets.G.compile()
    nets.E.compile()
    nets.D.features = torch.compile(nets.D.features)


def build_step(
    nets: Networks,
    spec: TupleSpec,
    method: MethodConfig,
    optim: OptimConfig,
    latent_dim: int,
    compute: ComputeConfig,
    *,
    world_size: int = 1,
    accumulate: int = 1,
) -> GaliStep | GraphedStep:
    """The step runner ``compute`` asks for: channels-last and compiled networks, graphed or eager.

    ``compute.cuda_graph`` on a CPU device gives the eager twin (there is nothing to capture). With ``accumulate``
    micro-batches per update a graph captures the whole update, all of its micro-batches included.
    """
    if compute.channels_last:
        for net in (nets.G, nets.E, nets.D):
            net.to(memory_format=torch.channels_last)
    if compute.activation_checkpointing:
        for net in (nets.G, nets.E, nets.D):
            set_activation_checkpointing(net, True)
    if compute.compile:
        compile_networks(nets)
    step = GaliStep(nets, spec, method, optim, latent_dim, compute, world_size=world_size, accumulate=accumulate)
    if compute.cuda_graph and step.device.type == "cuda":
        return GraphedStep(step)
    return step
