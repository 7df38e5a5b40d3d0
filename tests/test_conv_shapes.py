"""Every convolution the networks build runs forward and backward on this CPU, in the engine's form.

torch 2.13's CPU backward of a 1×1 stride-2 convolution corrupts the heap at small channel counts on AMD
EPYC machines (issue 20's reproduction). The engine computes that layer as a subsample and a 1×1
convolution (``SubsampledPointConv2d``); these tests run each shape in a child process, so a crash fails
one test, and report what plain torch does on this machine as a warning (information, not a failure).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.conv_sweep import ConvShape, network_conv_shapes, run_case, sweep
from tests.isolation import Crashed, run_isolated


def plain_torch_strided_point_conv(c_in: int, c_out: int) -> None:
    """Issue 20's reproduction, no gali code: a channels-last 1×1 stride-2 convolution and its gradients."""
    x = torch.randn(2, c_in, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c_out, c_in, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = F.conv2d(x, w, stride=2)
    torch.autograd.grad(y.sum(), [x, w])


def _outcome(fn, *args) -> str:
    try:
        run_isolated(fn, *args, timeout=120)
    except Crashed as crash:
        return crash.signal_name
    return "ok"


@pytest.mark.parametrize(("c_in", "c_out"), [(4, 4), (3, 4), (4, 8), (8, 8)])
def test_the_reproduction_completes_through_the_engines_layer(c_in: int, c_out: int) -> None:
    shape = ConvShape("SubsampledPointConv2d", c_in, c_out, 1, 2, 0, False, (2, c_in, 64, 64))
    assert _outcome(run_case, shape, "engine", "channels_last") == "ok"
    plain = _outcome(plain_torch_strided_point_conv, c_in, c_out)
    warnings.warn(f"plain torch 1×1 stride-2 conv {c_in}→{c_out}, channels-last, on this CPU: {plain}", stacklevel=1)


def test_every_network_conv_shape_runs_in_the_engines_form() -> None:
    outcomes = sweep(network_conv_shapes())
    crashed = {case: outcome for case, outcome in outcomes.items() if outcome != "ok"}
    engine = [
        f"{shape} ({layout}): {outcome}" for (shape, form, layout), outcome in crashed.items() if form == "engine"
    ]
    assert not engine, "the engine's own layers crash on this CPU:\n" + "\n".join(engine)
    for (shape, _, layout), outcome in crashed.items():
        warnings.warn(f"plain torch form of {shape} ({layout}) on this CPU: {outcome}", stacklevel=1)
    assert len(outcomes) > 100  # the sweep found the networks' shapes
