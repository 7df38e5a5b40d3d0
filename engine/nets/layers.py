"""Layers with a fast path and a reference twin, and the authors' weight init (docs/method.md §3.1).

The layers whose kernel covers their whole input (E's and D's last convolution, G's first transposed
convolution) run as one GEMM, and 1×1 strided convolutions (ResNet's projection shortcut) as a subsample
and a 1×1 convolution; ``set_layer_impl(net, 'ref')`` switches them back to ``nn.Conv``'s own forward, the
twin the paper-structured baseline runs. Same parameters and state-dict keys either way.
``branch_outputs`` runs a discriminator's branches over a tuple's slots, grouped by gradient (both D's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.nets.arch import Layer

INIT_STD = 0.01


LAYER_IMPLS = ("fast", "ref")


class FullKernelConv2d(nn.Conv2d):
    """A convolution whose kernel covers its whole input (E's and D's last 4×4 → 1×1 layer), run as one GEMM.

    With one output pixel the convolution is a Linear on the flattened input, and a plain matrix
    product runs several times faster than the convolution primitives for this shape, backward
    included (oneDNN on CPU). ``impl='ref'`` runs ``nn.Conv2d``'s own forward: the reference twin,
    used by the paper-structured baseline. Same parameters, same state-dict keys.
    """

    impl = "fast"

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "ref" or tuple(x.shape[-2:]) != self.kernel_size:
            return super().forward(x)
        weight = self.weight
        if not x.is_contiguous():  # channels-last: flatten both in (H, W, C) order, a view of x
            x, weight = x.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
        return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]


class PointInputConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution of a 1×1 input (G's first layer, z → k×k), run as one GEMM.

    Each input pixel paints one copy of the kernel, so the output is ``z @ W`` reshaped to
    (N, C_out, k, k). ``impl='ref'`` runs ``nn.ConvTranspose2d``'s own forward (the reference twin).
    The output is channels-last when the weight is (``compute.channels_last``), like the layers after it.
    """

    impl = "fast"

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.impl == "ref" or output_size is not None or tuple(x.shape[-2:]) != (1, 1):
            return super().forward(x, output_size)
        n, (kh, kw) = x.shape[0], self.kernel_size
        weight = self.weight  # (C_in, C_out, kh, kw)
        if weight.is_contiguous():
            out = (x.flatten(1) @ weight.flatten(1)).view(n, -1, kh, kw)
        else:  # channels-last weight: a (kh, kw, C_out) product, viewed back as a channels-last output
            out = (x.flatten(1) @ weight.permute(0, 2, 3, 1).flatten(1)).view(n, kh, kw, -1).permute(0, 3, 1, 2)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class SubsampledPointConv2d(nn.Conv2d):
    """A 1×1 convolution at stride s (ResNet's projection shortcut), run as ``x[..., ::s, ::s]`` then stride 1.

    The same math: a 1×1 kernel at stride s reads every s-th pixel only. torch 2.13's CPU backward of the
    plain strided layer corrupts the heap at small channel counts on AMD EPYC machines, channels-last and
    NCHW alike (tests/test_conv_shapes.py sweeps it); this form never reaches that kernel.
    ``impl='ref'`` runs ``nn.Conv2d``'s own forward. Same parameters, same state-dict keys.
    """

    impl = "fast"

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "ref":
            return super().forward(x)
        sh, sw = self.stride
        return F.conv2d(x[..., ::sh, ::sw], self.weight, self.bias)


FAST_LAYERS = (FullKernelConv2d, PointInputConvTranspose2d, SubsampledPointConv2d)


def set_layer_impl(module: nn.Module, impl: str) -> None:
    """Run ``module``'s layers that have a fast form in it (``'fast'``, the default) or as ``nn.Conv`` (``'ref'``)."""
    if impl not in LAYER_IMPLS:
        raise ValueError(f"layer impl must be one of {LAYER_IMPLS}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, FAST_LAYERS):
            m.impl = impl


def make_conv(layer: Layer, in_channels: int, out_channels: int, in_size: int, *, bias: bool) -> tuple[nn.Module, int]:
    """The layer and its output size for a square input of side ``in_size``."""
    if layer.kind == "convT":
        cls = PointInputConvTranspose2d if in_size == 1 else nn.ConvTranspose2d
        out_size = (in_size - 1) * layer.stride + layer.kernel
    else:
        cls = FullKernelConv2d if in_size == layer.kernel else nn.Conv2d
        out_size = (in_size - layer.kernel) // layer.stride + 1
    return cls(in_channels, out_channels, layer.kernel, stride=layer.stride, bias=bias), out_size


def init_weights(module: nn.Module) -> None:
    """The authors' ``weights_init`` on every submodule of ``module`` (docs/method.md §3.1)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def branch_outputs(
    branch: Callable[[str, Tensor], Tensor], slot_kinds: Sequence[str], blocks: Sequence[Sequence[Tensor]]
) -> list[Tensor]:
    """Each slot's ``branch(kind, rows)`` output, its row blocks stacked: D's branches over a tuple's slots.

    ``blocks[i]`` are slot i's row blocks (one per tuple class). Each kind's branch runs at most twice,
    over the blocks of all its slots that require a gradient, then over the rest: a backward into the
    inputs (the G/E update) then skips the rows that have none (real images, prior z: half of GALI-4's
    image rows) instead of computing their input gradients inside one batched call. D has no batch
    statistics, so the grouping changes no value.
    """
    parts: dict[int, Tensor] = {}
    for kind in dict.fromkeys(slot_kinds):
        slots = [i for i, k in enumerate(slot_kinds) if k == kind]
        kind_blocks = [b for i in slots for b in blocks[i]]
        outputs: dict[int, Tensor] = {}  # the branch's output of each block, by its position in kind_blocks
        for needs_grad in (True, False):
            group = [j for j, b in enumerate(kind_blocks) if b.requires_grad == needs_grad]
            if group:
                out = branch(kind, torch.cat([kind_blocks[j] for j in group]))
                outputs.update(zip(group, out.split([kind_blocks[j].shape[0] for j in group]), strict=True))
        start = 0
        for i in slots:
            parts[i] = torch.cat([outputs[j] for j in range(start, start + len(blocks[i]))])
            start += len(blocks[i])
    return [parts[i] for i in range(len(blocks))]
