"""The paper's architectures as tables: the numbers of docs/method.md §3.2-§3.3, read by ``nets.paper``.

``width`` scales every hidden channel count and hidden Linear width (``max(1, round(n·width))``);
image channels (3), ``latent_dim``, ``extra_dim`` and K are never scaled, and ``width=1.0`` is exactly
the paper's network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from gali.engine.nets.config import ARCH_RESOLUTION

__all__ = ["ARCH_RESOLUTION", "ARCH_SPECS", "ArchSpec", "Layer", "arch_spec", "scaled"]


class Layer(NamedTuple):
    """One convolution of a table: ``kind`` is 'conv' or 'convT'."""

    kind: str
    channels: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class ArchSpec:
    """The numbers of one architecture (width 1.0).

    slope:           LeakyReLU negative slope of G, E, D(x), D(z) and the joint MLP.
    generator:       G's hidden layers, each + BN + LReLU; a bias-free 1×1 conv to RGB follows.
    convs:           E's convolutions (+ BN + LReLU) and D(x)'s (+ bias + LReLU), down to 1×1.
    encoder_linears: widths of E's hidden Linear-BN1d-LReLU blocks after the convolutions.
    latent_widths:   D(z)'s Linear widths, each + LReLU.
    joint_widths:    the joint D(x,z) MLP's Linear widths, each + LReLU; the head follows.
    """

    slope: float
    generator: tuple[Layer, ...]
    convs: tuple[Layer, ...]
    encoder_linears: tuple[int, ...]
    latent_widths: tuple[int, ...]
    joint_widths: tuple[int, ...]


ARCH_SPECS: dict[str, ArchSpec] = {
    # docs/method.md §3.2, authors' model/SVHN/model_disc_4_SN_bat_linear_tanh.py
    "svhn32": ArchSpec(
        slope=0.01,
        generator=(
            Layer("convT", 256, 4, 1),  # 1 -> 4
            Layer("convT", 128, 4, 2),  # 4 -> 10
            Layer("convT", 64, 4, 1),  # 10 -> 13
            Layer("convT", 32, 4, 2),  # 13 -> 28
            Layer("convT", 32, 5, 1),  # 28 -> 32
            Layer("conv", 32, 1, 1),
        ),
        convs=(
            Layer("conv", 32, 5, 1),  # 32 -> 28
            Layer("conv", 64, 4, 2),  # 28 -> 13
            Layer("conv", 128, 4, 1),  # 13 -> 10
            Layer("conv", 256, 4, 2),  # 10 -> 4
            Layer("conv", 512, 4, 1),  # 4 -> 1
        ),
        encoder_linears=(512,),
        latent_widths=(512, 512),
        joint_widths=(1024, 1024),
    ),
    # docs/method.md §3.3, authors' model/CelebA/model_disc_4_celeb_SN_bat_linear_tanh.py
    "celeba64": ArchSpec(
        slope=0.02,
        generator=(
            Layer("convT", 512, 4, 1),  # 1 -> 4
            Layer("convT", 256, 7, 2),  # 4 -> 13
            Layer("convT", 256, 5, 2),  # 13 -> 29
            Layer("convT", 128, 7, 2),  # 29 -> 63
            Layer("convT", 64, 2, 1),  # 63 -> 64
        ),
        convs=(
            Layer("conv", 64, 2, 1),  # 64 -> 63
            Layer("conv", 128, 7, 2),  # 63 -> 29
            Layer("conv", 256, 5, 2),  # 29 -> 13
            Layer("conv", 256, 7, 2),  # 13 -> 4
            Layer("conv", 512, 4, 1),  # 4 -> 1
        ),
        encoder_linears=(),
        latent_widths=(1024, 1024),
        joint_widths=(2048, 2048),
    ),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCH_SPECS)}")
    return ARCH_SPECS[arch]


def scaled(n: int, width: float) -> int:
    """A hidden width scaled by the ``width`` multiplier: rounded, at least 1."""
    return max(1, round(n * width))
