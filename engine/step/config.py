"""The step's sections: ``[optim]`` (Adam for each side) and ``[compute]`` (how the step runs)."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.config import check_choice, check_positive
from gali.engine.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KERNEL_IMPLS = ("auto", "triton", "ref")


@dataclass
class OptimConfig:
    """Adam for D and for E+G (docs/method.md §3.1); n_dis D steps per E/G step (1 = simultaneous).

    lr is both sides' learning rate (the paper's one); lr_d / lr_ge, when > 0, set one side's own
    (BigGAN and BigBiGAN train D and G/E at different rates).
    """

    lr: float = 2e-4
    lr_d: float = 0.0
    lr_ge: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.999
    n_dis: int = 1

    def validate(self) -> None:
        check_positive("optim.lr", self.lr)
        check_positive("optim.lr_d", self.lr_d, allow_zero=True)
        check_positive("optim.lr_ge", self.lr_ge, allow_zero=True)
        for key, beta in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(key, f"got {beta}; must be in [0, 1)")
        check_positive("optim.n_dis", self.n_dis)


@dataclass
class ComputeConfig:
    """How the step runs: precision, kernels, CUDA graphs, torch.compile, memory layout, NVTX.

    precision:     'auto' (bf16 autocast on a CUDA device that supports it, else fp32), 'fp32',
                   'bf16' (autocast) or 'fp16' (autocast with one GradScaler per side, D and G/E).
                   Spectral-norm power iterations, the losses and the optimizer state stay fp32.
    kernel_impl:   'auto' | 'triton' | 'ref' for the fused kernels (K-way head, mask composite):
                   'auto' runs Triton on CUDA and the reference elsewhere (``method.kernel_impl`` is
                   a deprecated alias).
    cuda_graph:    capture the whole step in a CUDA graph after warm-up and replay it; on a CPU
                   device the eager twin runs instead (the same function, not captured).
    compile:       torch.compile G, E and D's feature trunk (the kernels stay opaque custom ops);
                   slower than eager on CPU, see ``gali.engine.step.build.compile_networks``.
    channels_last: keep G, E, D, the step's input and the pipeline's batches in channels-last memory
                   format (default on: 1.1–1.3× faster per step than NCHW on the CPU benchmark, and
                   the layout PyTorch recommends for convolutions under autocast on NVIDIA GPUs);
                   ``data.channels_last`` is a deprecated alias.
    nvtx:          named NVTX ranges (gali/step, gali/chains, gali/D, ...) for Nsight Systems.
    activation_checkpointing: recompute the residual blocks of G, E and D in the backward instead of
                   keeping their activations (biggan archs; gali.engine.nets.biggan), for larger batches.
    """

    precision: str = "auto"
    kernel_impl: str = "auto"
    cuda_graph: bool = False
    compile: bool = False
    channels_last: bool = True
    nvtx: bool = False
    activation_checkpointing: bool = False

    def validate(self) -> None:
        check_choice("compute.precision", self.precision, PRECISIONS)
        check_choice("compute.kernel_impl", self.kernel_impl, KERNEL_IMPLS)
