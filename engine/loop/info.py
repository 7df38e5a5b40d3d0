"""``gali info``: what a run of a config costs before it starts: parameters, FLOPs and memory per image, a run plan.

The networks are built with fake tensors (shapes only: :func:`gali.engine.step.cost.fake_networks`) and one
training step is counted by :func:`gali.engine.step.cost.measure_step_cost` at two small batches, then scaled
to ``run.batch_size``; with a GPU named, :mod:`gali.engine.loop.plan` adds the run plan.
"""

from __future__ import annotations

from torch import nn

from gali.engine.loop.config import Config
from gali.engine.loop.plan import BYTES_PER_TRAINED_PARAMETER, describe_plan, network_sizes
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import Networks
from gali.engine.step.cost import COST_BATCHES, fake_networks, measure_step_cost


def parameter_counts(nets: Networks) -> dict[str, int]:
    """Parameters of G, E, D (trained) and of the frozen feature model M where the spec uses one."""
    counts = {name: _count(getattr(nets, name)) for name in ("G", "E", "D")}
    if nets.M is not None:
        counts["M (frozen)"] = _count(nets.M)
    return counts


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def describe(cfg: Config, gpus: int = 1, gpu: str | None = None) -> str:
    """The table ``gali info`` prints for ``cfg``, and the run plan on ``gpus`` × ``gpu`` where a GPU is named."""
    spec = load_spec(cfg.method.tuples)
    nets = fake_networks(cfg.model, cfg.method, spec, cfg.data.resolution)
    counts = parameter_counts(nets)
    cost = measure_step_cost(nets, spec, cfg.method, cfg.model.latent_dim, cfg.data.resolution)
    batch = cfg.run.batch_size
    trained = sum(v for k, v in counts.items() if k in ("G", "E", "D"))
    width = max(len(k) for k in counts)
    lines = [
        f"preset {cfg.preset}: tuples {spec.name} (K={spec.num_classes}), model {cfg.model.arch} width "
        f"{cfg.model.width:g}, d_z {cfg.model.latent_dim}, {cfg.data.resolution}x{cfg.data.resolution} images, "
        f"run.batch_size {batch}",
        "parameters:",
    ]
    lines += [f"  {name:<{width}}  {count / 1e6:10.3f} M" for name, count in counts.items()]
    lines += [
        f"training step (forward and backward of every chain call and of D over all {spec.num_classes} tuples), "
        f"counted from shapes at batches of {COST_BATCHES[0]} and {COST_BATCHES[1]} and scaled:",
        f"  model FLOPs   {cost.flops_per_image / 1e9:10.3f} GFLOP per real image, "
        f"{cost.flops_per_image * batch / 1e12:.3f} TFLOP per step of {batch}",
        f"  activations   {cost.activation_bytes_per_image / 2**20:10.2f} MiB per real image (fp32; about half in "
        f"bf16), {cost.activation_bytes_per_image * batch / 2**30:.2f} GiB per step of {batch}",
    ]
    if cost.checkpointed_bytes_per_image != cost.activation_bytes_per_image:
        lines.append(
            f"                {cost.checkpointed_bytes_per_image / 2**20:10.2f} MiB per real image with "
            "compute.activation_checkpointing"
        )
    lines.append(
        f"  weights, gradients and Adam state of G, E and D: {trained * BYTES_PER_TRAINED_PARAMETER / 2**30:.2f} GiB"
    )
    if gpu is not None:
        lines += describe_plan(cfg, network_sizes(cfg, nets, cost), gpus, gpu)
    return "\n".join(lines)
