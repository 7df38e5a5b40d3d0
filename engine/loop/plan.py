"""A run plan (``gali info --gpus N --gpu NAME``): what batch fits a GPU, the accumulation, the time to ``run.kimg``.

The figures come from :func:`gali.engine.step.cost.measure_step_cost`'s count of the step (FLOPs and bytes saved
for the backward per image, fp32) and the GPU table below. The memory model of one GPU holding a micro-batch of
m = run.batch_size / (world × run.accumulate) images:

* states: 16 bytes per trained parameter of G, E and D (fp32 weight, its gradient and Adam's two moments); 4 more
  with several ranks (the all-reduce's flat copy of one side's gradients) or micro-batches (the summed
  gradients); 4 per parameter of G's and E's moving averages (``run.ema_kimg`` > 0) and of a frozen feature model.
* activations: the counted batch-independent saved bytes plus m × the saved bytes per image. In bf16 the per-image
  bytes are halved: autocast runs the convolutions and matmuls in bf16 and the element-wise ops, BatchNorm and
  upsampling follow their input's dtype (a count under the CPU's autocast gives 0.50-0.51 of the fp32 bytes);
  not modelled: CUDA's autocast also keeps the self-attention softmax in fp32, so SAGAN's attention maps cost 3/2
  of their fp32 bytes there, not 1/2. bf16 adds 2 bytes per trained parameter (autocast's weight copies).
  With ``compute.activation_checkpointing`` (biggan archs) what is kept is counted: the tensors saved outside
  the residual blocks, the blocks' inputs, and one block's own while it is recomputed.
* the K-way head's buffers (the Triton head on CUDA): two gradients of D's features, K·m rows × F in the
  activation dtype, and fp32 partials of (G·K·F + G·K + 2) per 64 rows.
* an allowance for the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation:
  2 GiB plus 10% of the above.

The step time is model FLOPs / (MFU × the dense bf16 peak), at :data:`PLANNED_MFU`; the count is of the
simultaneous update (n_dis = 1): with n_dis > 1 each phase does less (no D or no G/E weight gradients), so the
predicted time is an upper bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gali.engine.errors import ConfigError
from gali.engine.loop.config import Config
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.biggan import CheckpointedBlock
from gali.engine.nets.networks import Networks
from gali.engine.step.cost import StepCost, fake_networks, measure_step_cost

BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, its gradient and Adam's two moments
GRADIENT_COPY_BYTES = 4  # per trained parameter, with several ranks or micro-batches
AVERAGE_BYTES = 4  # per parameter of a moving average or of the frozen feature model (fp32)
AUTOCAST_WEIGHT_BYTES = 2  # per trained parameter under bf16: autocast's copies of the weights
CONTEXT_BYTES = 2 * 2**30  # CUDA context and library workspaces
ALLOCATOR_OVERHEAD = 0.10  # the caching allocator's fragmentation and the backward's transients
HEAD_ROWS_PER_PARTIAL = 64  # rows per program of the Triton K-way head on CUDA (kernels/kway_head.py)
PLANNED_MFU = 0.40  # model FLOP/s over the dense bf16 peak that the plan's step time assumes


@dataclass(frozen=True)
class GPU:
    """One GPU's dense bf16 tensor-core peak, HBM bandwidth and memory (the datasheet's GB, 10^9 bytes)."""

    name: str
    bf16_tflops: float
    hbm_tb_per_s: float
    memory_gb: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity (989 dense), 3.35 TB/s, 80 GB.
    "h100": GPU("NVIDIA H100 SXM", 989.0, 3.35, 80.0),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity (989 dense), 4.8 TB/s, 141 GB.
    "h200": GPU("NVIDIA H200 SXM", 989.0, 4.8, 141.0),
    # NVIDIA HGX B200 datasheet, per GPU: BF16 4.5 PFLOPS with sparsity (2,250 dense), 8 TB/s, 180 GB.
    "b200": GPU("NVIDIA B200 (HGX)", 2250.0, 8.0, 180.0),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM: BF16 312 TFLOPS dense, 2,039 GB/s, 80 GB.
    "a100-80gb": GPU("NVIDIA A100 80GB SXM", 312.0, 2.039, 80.0),
}


@dataclass(frozen=True)
class Sizes:
    """What the memory model needs of a config's networks and step: parameters, and the counted step."""

    trained: int  # parameters of G, E and D
    averaged: int  # parameters of G's and E's moving averages and of a frozen feature model
    cost: StepCost
    head_features: int  # F, the width of D's features under the K-way head
    head_columns: int  # G·K logit columns
    num_classes: int  # K
    checkpointing: bool  # whether the networks have residual blocks to recompute

    def activation_bytes(self, micro_batch: int, *, bf16: bool, checkpointed: bool) -> float:
        """The bytes saved for the backward at ``micro_batch`` images (the module's activation term)."""
        per_image = self.cost.checkpointed_bytes_per_image if checkpointed else self.cost.activation_bytes_per_image
        if not bf16:
            return self.cost.activation_bytes_fixed + micro_batch * per_image
        return self.cost.activation_bytes_fixed + self.trained * AUTOCAST_WEIGHT_BYTES + micro_batch * per_image / 2

    def memory_bytes(self, micro_batch: int, *, bf16: bool, checkpointed: bool, extra_gradients: bool) -> float:
        """Predicted device memory of one rank at ``micro_batch`` images (the module's model)."""
        states = self.trained * (BYTES_PER_TRAINED_PARAMETER + (GRADIENT_COPY_BYTES if extra_gradients else 0))
        states += self.averaged * AVERAGE_BYTES
        activations = self.activation_bytes(micro_batch, bf16=bf16, checkpointed=checkpointed)
        rows = self.num_classes * micro_batch
        head = 2 * rows * self.head_features * (2 if bf16 else 4)
        head += math.ceil(rows / HEAD_ROWS_PER_PARTIAL) * (self.head_columns * (self.head_features + 1) + 2) * 4
        return CONTEXT_BYTES + (1 + ALLOCATOR_OVERHEAD) * (states + activations + head)

    def largest_batch(self, memory: float, *, bf16: bool, checkpointed: bool, extra_gradients: bool) -> int:
        """The largest micro-batch whose predicted memory is at most ``memory`` bytes (0: not even one image)."""

        def fits(m: int) -> bool:
            return self.memory_bytes(m, bf16=bf16, checkpointed=checkpointed, extra_gradients=extra_gradients) <= memory

        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low


def network_sizes(cfg: Config, nets: Networks, cost: StepCost) -> Sizes:
    """:class:`Sizes` of ``cfg``'s networks ``nets`` (real or fake) and their counted step."""
    trained = sum(p.numel() for net in (nets.G, nets.E, nets.D) for p in net.parameters())
    averaged = sum(p.numel() for net in (nets.G, nets.E) for p in net.parameters()) if cfg.run.ema_kimg else 0
    averaged += sum(p.numel() for p in nets.M.parameters()) if nets.M is not None else 0
    weight, _, _ = nets.D.head_weight()
    blocks = any(isinstance(m, CheckpointedBlock) for net in (nets.G, nets.E, nets.D) for m in net.modules())
    return Sizes(
        trained=trained,
        averaged=averaged,
        cost=cost,
        head_features=weight.shape[1],
        head_columns=weight.shape[0],
        num_classes=load_spec(cfg.method.tuples).num_classes,
        checkpointing=blocks,
    )


def count_sizes(cfg: Config) -> Sizes:
    """Count ``cfg``'s step on fake networks (seconds, no weights allocated): :func:`network_sizes`."""
    spec = load_spec(cfg.method.tuples)
    nets = fake_networks(cfg.model, cfg.method, spec, cfg.data.resolution)
    cost = measure_step_cost(nets, spec, cfg.method, cfg.model.latent_dim, cfg.data.resolution)
    return network_sizes(cfg, nets, cost)


def _bf16(cfg: Config) -> bool:
    """Whether the run's step on a GPU is bf16 ('auto' resolves to bf16 on the GPUs of the table)."""
    return cfg.compute.precision in ("auto", "bf16", "fp16")


def recommended_accumulate(sizes: Sizes, cfg: Config, world_size: int, memory_bytes: float) -> int | None:
    """The smallest ``run.accumulate`` N dividing the per-rank batch whose micro-batch fits ``memory_bytes``
    (with the run's precision and activation checkpointing); None when not even one image fits."""
    per_rank = cfg.run.batch_size // world_size
    for n in range(1, per_rank + 1):
        if per_rank % n:
            continue
        memory = sizes.memory_bytes(
            per_rank // n,
            bf16=_bf16(cfg),
            checkpointed=cfg.compute.activation_checkpointing and sizes.checkpointing,
            extra_gradients=world_size > 1 or n > 1,
        )
        if memory <= memory_bytes:
            return n
    return None


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s, the denominator of MFU: the table's dense bf16 peak of a CUDA GPU found by name
    (None for a GPU not in the table); on a CPU, the fp32 matmul rate measured now (512², the threads torch uses;
    a measured rate, not a datasheet figure)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("-", " ")
        card = next((gpu for key, gpu in GPUS.items() if all(part in name for part in key.split("-"))), None)
        return None if card is None else card.bf16_tflops * 1e12
    a = torch.randn(512, 512)
    a @ a  # warm-up
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    return 2 * 512**3 * reps / (time.perf_counter() - start)


def resolve_accumulate(cfg: Config, world_size: int, memory_bytes: float | None, sizes: Sizes | None = None) -> int:
    """``run.accumulate`` as a number: 'auto' is :func:`recommended_accumulate` for ``memory_bytes`` of device memory
    (1 without a figure: a CPU run); a number stays. Not even one image per micro-batch fitting is refused.
    ``sizes`` defaults to a count of ``cfg``'s step (a few seconds)."""
    if cfg.run.accumulate != "auto":
        return cfg.run.accumulate
    if memory_bytes is None:
        return 1
    found = recommended_accumulate(sizes or count_sizes(cfg), cfg, world_size, memory_bytes)
    if found is None:
        raise ConfigError(
            "run.accumulate",
            f"'auto' found no micro-batch of run.batch_size={cfg.run.batch_size} over {world_size} rank(s) that fits "
            f"{memory_bytes / 2**30:.1f} GiB of device memory, not even one image (gali info --gpus N --gpu ... "
            "shows the memory model); use more GPUs, compute.activation_checkpointing=true or smaller networks",
        )
    return found


def warn_if_batch_will_not_fit(
    cfg: Config, world_size: int, memory_bytes: float, log: Callable[[str], None], sizes: Sizes | None = None
) -> bool:
    """Log one warning line when the plan says the run's micro-batch will not fit ``memory_bytes`` of device memory;
    returns whether it warned. ``sizes`` defaults to a count of ``cfg``'s step (a few seconds)."""
    sizes = sizes or count_sizes(cfg)
    micro = cfg.run.batch_size // (world_size * cfg.run.accumulate)
    checkpointed = cfg.compute.activation_checkpointing and sizes.checkpointing
    extra = world_size > 1 or cfg.run.accumulate > 1
    need = sizes.memory_bytes(micro, bf16=_bf16(cfg), checkpointed=checkpointed, extra_gradients=extra)
    if need <= memory_bytes:
        return False
    fix = recommended_accumulate(sizes, cfg, world_size, memory_bytes)
    advice = f"run.accumulate={fix}" if fix else "smaller networks or more GPUs"
    log(
        f"warning: the run plan predicts {need / 2**30:.1f} GiB per GPU for micro-batches of {micro} images, more "
        f"than the device's {memory_bytes / 2**30:.1f} GiB: it will likely run out of memory; try {advice} "
        f"(gali info --gpus {world_size} --gpu NAME shows the plan)"
    )
    return True


def describe_plan(cfg: Config, sizes: Sizes, gpus: int, gpu: str) -> list[str]:
    """The run plan's lines for ``gpus`` × ``gpu`` (a key of :data:`GPUS`)."""
    card = GPUS[gpu]
    memory = card.memory_bytes
    batch = cfg.run.batch_size
    bf16 = _bf16(cfg)
    extra = gpus > 1 or cfg.run.accumulate != 1  # 'auto' may split: counted as if it does
    lines = [
        f"run plan on {gpus} x {card.name} ({card.bf16_tflops:g} TFLOP/s dense bf16, {card.hbm_tb_per_s:g} TB/s, "
        f"{card.memory_gb:g} GB each; NVIDIA datasheets), per GPU:",
        f"  memory model: {BYTES_PER_TRAINED_PARAMETER} bytes per trained parameter (+{GRADIENT_COPY_BYTES} with "
        f"several ranks or micro-batches), {AVERAGE_BYTES} per averaged or frozen one, the activations counted "
        f"(halved in bf16), the K-way head's buffers, and {CONTEXT_BYTES / 2**30:g} GiB + "
        f"{ALLOCATOR_OVERHEAD:.0%} for the CUDA context and the allocator",
        "  largest per-GPU batch that fits          bf16      fp32",
    ]
    modes = [("without activation checkpointing", False)]
    if sizes.checkpointing:
        modes.append(("with activation checkpointing", True))
    for label, checkpointed in modes:
        fit = [
            sizes.largest_batch(memory, bf16=half, checkpointed=checkpointed, extra_gradients=extra)
            for half in (True, False)
        ]
        lines.append(f"    {label:<36} {fit[0]:>8,} {fit[1]:>9,}")
    if not sizes.checkpointing:
        lines.append(f"    ({cfg.model.arch} has no activation checkpointing: it is for the biggan archs)")
    precision = "bf16" if bf16 else "fp32"
    checkpointed = cfg.compute.activation_checkpointing and sizes.checkpointing
    setting = f"{precision}, {'with' if checkpointed else 'without'} activation checkpointing"
    if batch % gpus:
        lines.append(f"  run.batch_size {batch} cannot be shared by {gpus} GPUs: choose a multiple of {gpus}")
        return lines
    per_rank = batch // gpus
    accumulate = recommended_accumulate(sizes, cfg, gpus, memory)
    if accumulate is None:
        lines.append(f"  global batch {batch} = {gpus} x {per_rank}: not even one image per GPU fits ({setting})")
        return lines
    micro = per_rank // accumulate
    need = sizes.memory_bytes(micro, bf16=bf16, checkpointed=checkpointed, extra_gradients=gpus > 1 or accumulate > 1)
    verdict = "fits" if accumulate == 1 else "does not fit in one pass"
    lines.append(
        f"  global batch {batch} = {gpus} GPUs x {per_rank} per GPU: {verdict} ({setting}); "
        f"run.accumulate={accumulate}: micro-batches of {micro}, predicted {need / 2**30:.1f} GiB of "
        f"{memory / 2**30:.1f} GiB"
    )
    step_seconds = sizes.cost.flops_per_image * per_rank / (PLANNED_MFU * card.bf16_tflops * 1e12)
    images_per_second = batch / step_seconds
    hours = cfg.run.kimg * 1000 / images_per_second / 3600
    lines += [
        f"  predicted at {PLANNED_MFU:.0%} MFU (of the dense bf16 peak): {step_seconds * 1e3:,.1f} ms per step, "
        f"{images_per_second:,.0f} img/s ({images_per_second / gpus:,.0f} per GPU)",
        f"  time to run.kimg={cfg.run.kimg:g}: {hours:,.1f} h ({hours / 24:,.1f} days)",
    ]
    return lines
