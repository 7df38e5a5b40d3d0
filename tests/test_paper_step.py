"""The benchmark's baseline computes the same update as the fast step, only structured like the authors' code."""

import copy

import pytest
import torch

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.paper import PaperStep
from tests.tolerance import assert_twins_close, smooth_activations

pytestmark = pytest.mark.numerics  # parity of twins: run again under a second CPU kernel path

BATCH, LATENT = 4, 8


@pytest.mark.parametrize("spec_name", ["ali", "alice", "gali4", "gali-mix"])
def test_paper_step_and_fast_step_compute_the_same_update(spec_name):
    torch.manual_seed(0)
    spec = load_spec(spec_name)
    G, E, D = build_models(
        ModelConfig(arch="svhn32", latent_dim=LATENT, width=0.125),
        slot_kinds=spec.slot_kinds,
        num_classes=spec.num_classes,
    )
    smooth_activations(G, E, D)  # gradients compared across two orders of the sums: no kinks to round across
    D.eval()  # freeze the power iteration: the baseline's K D calls would otherwise advance it K times
    method = MethodConfig(tuples=spec_name, mask_min_size=4)
    nets = Networks(G=G, E=E, D=D)
    fast = GaliStep(nets, spec, method, OptimConfig(lr=1e-3), LATENT, ComputeConfig(precision="fp32"))
    paper_nets = copy.deepcopy(nets)
    paper = PaperStep(paper_nets, spec, method, OptimConfig(lr=1e-3), LATENT)
    x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.tensor(0.0)  # the two draw instance noise in a different order

    torch.manual_seed(3)
    want = fast.step(x, noise)
    torch.manual_seed(3)
    got = paper.step(x, noise)
    reduction = spec.num_classes * BATCH * 32 * 32  # the most terms summed into one value: a D weight's gradient
    assert_twins_close(got["loss_d"], want["loss_d"], reduction=reduction)
    assert_twins_close(got["loss_ge"], want["loss_ge"], reduction=reduction)
    # Parameters are not compared: Adam's first update is ±lr for near-zero gradients. A gradient that cancels
    # to near zero keeps the rounding of its terms: the scale is the largest gradient of its backward pass.
    for mine, theirs in ((fast.d_params, paper.d_params), (fast.ge_params, paper.ge_params)):
        scale = max(p.grad.abs().max().item() for p in mine)
        for a, b in zip(mine, theirs, strict=True):
            assert_twins_close(b.grad, a.grad, reduction=reduction, scale=scale, msg=f"gradient of {tuple(a.shape)}")
