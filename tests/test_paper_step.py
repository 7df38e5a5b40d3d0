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
    torch.testing.assert_close(got["loss_d"], want["loss_d"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss_ge"], want["loss_ge"], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(fast.d_params + fast.ge_params, paper.d_params + paper.ge_params, strict=True):
        # sums in another order; parameters are not compared: Adam's first update is ±lr for near-zero gradients
        torch.testing.assert_close(theirs.grad, mine.grad, rtol=1e-4, atol=1e-5)
