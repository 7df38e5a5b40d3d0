"""One rule for comparing two ways of computing one quantity: a tolerance derived from the dtype and the reduction.

Two summation orders of n terms differ by about eps·√n relative to the terms' magnitude (random-walk
rounding; the worst case, eps·n, is not reached in practice), so the twins must agree within
``rtol = SAFETY · eps · √n`` and ``atol = rtol · scale``, where ``scale`` is the magnitude of the summed
terms: by default the largest |expected|, or, for gradients that cancel to near zero, the largest
gradient of the same backward pass. No fixed 1e-5 anywhere: what passes on one CPU's kernels passes on
another's, and a real error (a wrong sign, a missing term) still fails by orders of magnitude.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SAFETY = 8.0  # the rounding errors measured stay below 2·eps·√n; 8 leaves room and still rejects 1e-3 mistakes


def rounding_rtol(dtype: torch.dtype, reduction: int) -> float:
    """``SAFETY · eps(dtype) · √reduction``: the relative error two orders of a sum of ``reduction`` terms reach."""
    return SAFETY * torch.finfo(dtype).eps * math.sqrt(max(reduction, 1))


def assert_twins_close(
    actual: Tensor, expected: Tensor, *, reduction: int, scale: float | None = None, msg: str = ""
) -> None:
    """``actual`` equals ``expected`` up to rounding in a sum of ``reduction`` terms (see the module docstring)."""
    rtol = rounding_rtol(expected.dtype, reduction)
    magnitude = expected.detach().abs().max().item() if scale is None else scale
    atol = rtol * max(magnitude, torch.finfo(expected.dtype).tiny)
    prefix = f"{msg}: " if msg else ""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{prefix}{m}\n(reduction {reduction}, scale {magnitude:.3g})",
    )


def smooth_activations(*modules: nn.Module) -> None:
    """Swap every LeakyReLU of ``modules`` for SiLU, in place, before comparing two ways of computing gradients.

    A (Leaky)ReLU's gradient jumps where its input crosses 0. With tens of thousands of units, one of them sits
    within rounding of 0 in about one comparison in twenty, and two valid orders of a sum then put it on
    opposite sides: the gradients differ by a whole term (2% on the G/E gradients of issue 20's gali-mix case),
    not by rounding. A smooth activation keeps what the comparison checks (the same chains, losses and
    gradients, built two ways) and makes the difference rounding only, on every CPU.
    """
    for net in modules:
        for parent in list(net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.LeakyReLU):
                    setattr(parent, name, nn.SiLU())
