"""Gradient averaging across ranks, shaped for the step's ``torch.autograd.grad`` calls.

DDP's reducer hooks see only ``.backward()``; the step takes each side's gradient with
``torch.autograd.grad`` instead (so that each loss reaches only its own side), so it averages them
itself: one side's gradients are flattened into one buffer and summed over the ranks with one
all-reduce, then divided by the world size and copied back. The simultaneous update stays exact: the
G/E gradient is still taken at D's pre-update weights, on every rank. With NCCL the all-reduce is
capturable in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def average_gradients(grads: Sequence[Tensor], world_size: int) -> Sequence[Tensor]:
    """``grads`` averaged over the ``world_size`` ranks in place (one all-reduce); unchanged for one rank."""
    if world_size == 1:
        return grads
    flat = _flatten_dense_tensors(list(grads))
    dist.all_reduce(flat)
    flat /= world_size
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, list(grads)), strict=True):
        grad.copy_(mean)  # keeps each gradient's memory layout (channels-last stays channels-last)
    return grads
