"""The two optimizers of a GALI step: Adam for D, and Adam for G and E together (docs/method.md §3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gali.engine.step.config import OptimConfig


def build_optimizers(
    d_params: Sequence[Tensor],
    ge_params: Sequence[Tensor],
    optim: OptimConfig,
    *,
    fused: bool | None = None,
    capturable: bool = False,
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """``(opt_d, opt_ge)`` with ``optim``'s learning rates (``lr_d`` / ``lr_ge`` where set, else ``lr``) and betas.

    ``fused=True`` is torch's fused Adam (one kernel per step, ``found_inf`` read on the device);
    ``None`` is torch's default implementation, the paper-structured baseline's. ``capturable``
    keeps the step counters on the device, as a CUDA graph needs.
    """
    betas = (optim.beta1, optim.beta2)
    opt_d = torch.optim.Adam(d_params, lr=optim.lr_d or optim.lr, betas=betas, fused=fused, capturable=capturable)
    opt_ge = torch.optim.Adam(ge_params, lr=optim.lr_ge or optim.lr, betas=betas, fused=fused, capturable=capturable)
    return opt_d, opt_ge


def trainable_parameters(*modules: torch.nn.Module) -> list[Tensor]:
    """The parameters of ``modules`` that require a gradient, in module order."""
    return [p for module in modules for p in module.parameters() if p.requires_grad]
