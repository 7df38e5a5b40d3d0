"""The cycle families of docs/method.md §2.6: gali4-alice, gali4-alice-mu (the mu(...) expression) and gali4-cycle
(D's pair head): their losses by hand on a two-image batch, the pairs the pair head sees, bad specs, one CLI step."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from gali.engine.cli import main
from gali.engine.errors import ConfigError
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec, parse_expr, spec_from_table
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import build_networks
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from tests.test_launch import TINY

BATCH, LATENT = 2, 8
GALI4 = [["x", "E(x)"], ["x", "E(G(E(x)))"], ["G(z)", "z"], ["G(E(G(z)))", "z"]]


def make_step(name: str, **method) -> GaliStep:
    torch.manual_seed(0)
    spec, config = load_spec(name), MethodConfig(tuples=name, **method)
    nets = build_networks(
        ModelConfig(arch="svhn32", latent_dim=LATENT, width=0.125), config, spec, resolution=32, device="cpu"
    )
    compute = ComputeConfig(precision="fp32", channels_last=False, kernel_impl="ref")
    return GaliStep(nets, spec, config, OptimConfig(lr=1e-3), LATENT, compute)


def images() -> torch.Tensor:
    return torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def kway_by_hand(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §1.3 and §1.5 with the paper's weights: (L_D, L_GE) of K class blocks of BATCH rows."""
    k = logits.shape[1]
    log_p = torch.log_softmax(logits.double(), dim=1).view(k, BATCH, k)
    loss_d = -(2 / k) * sum(log_p[c, :, c].mean() for c in range(k))
    loss_ge = -(2 / (k * (k - 1))) * sum(log_p[c, :, j].mean() for c in range(k) for j in range(k) if j != c)
    return loss_d, loss_ge


@pytest.mark.parametrize("name", ["gali4-alice", "gali4-alice-mu", "gali4-cycle"])
def test_losses_equal_a_hand_computation(name):
    """Tuples, D's logits and both losses recomputed with torch ops on copies of the networks, the same draws."""
    step = make_step(name, alice_lambda=0.5, cycle_lambda=0.7)
    nets = copy.deepcopy(step.nets)  # before the step's forward moves the power iterations on
    x = images()
    torch.manual_seed(5)
    out = step.discriminate(x, torch.tensor(0.0))

    torch.manual_seed(5)
    G, E, D = nets.G, nets.E, nets.D
    with torch.no_grad(), parametrize.cached():  # each spectral-normed weight once, as the step computes it
        z = torch.randn(BATCH, LATENT)  # the step's draws in its order: z, then one ε per E call
        mu_x, log_sigma_x = E(x)
        e_x = mu_x + log_sigma_x.exp() * torch.randn_like(mu_x)
        g_e_x = G(e_x)
        mu, log_sigma = E(g_e_x)
        e_g_e_x = mu + log_sigma.exp() * torch.randn_like(mu)
        g_z = G(z)
        mu, log_sigma = E(g_z)
        g_e_g_z = G(mu + log_sigma.exp() * torch.randn_like(mu))
        logits = D([torch.cat([x, x, g_z, g_e_g_z]), torch.cat([e_x, e_g_e_x, z, z])])
        want_d, want_ge = kway_by_hand(logits)
        if name == "gali4-cycle":
            pair_logits = D.pair_head(torch.cat([torch.cat([x, x], 1), torch.cat([x, g_e_x], 1)]))
            cycle_d, cycle_ge = kway_by_hand(pair_logits)
            assert out["cycle_d"].item() == pytest.approx(cycle_d.item(), rel=1e-5)
            assert out["cycle_ge"].item() == pytest.approx(cycle_ge.item(), rel=1e-5)
            want_d, want_ge = want_d + 0.7 * cycle_d, want_ge + 0.7 * cycle_ge
        else:
            output = g_e_x if name == "gali4-alice" else G(mu_x)  # gali4-alice-mu: G(μ_E(x)), no noise
            recon = ((output.double() - x.double()) ** 2).mean()
            assert out["recon"].item() == pytest.approx(recon.item(), rel=1e-5)
            want_ge = want_ge + 0.5 * recon
    assert out["loss_d"].item() == pytest.approx(want_d.item(), rel=1e-5)
    assert out["loss_ge"].item() == pytest.approx(want_ge.item(), rel=1e-5)


def test_mu_shares_the_encoder_forward_with_e_of_the_same_image():
    step = make_step("gali4-alice-mu")
    calls = []
    step.nets.E.register_forward_pre_hook(lambda _, args: calls.append(args[0]))
    step.step(images(), torch.tensor(0.1))
    assert len(calls) == step.spec.count_calls("E") == 3  # E(x) and mu(x): one forward of x
    assert sum(c is not None and torch.equal(c, images()) for c in calls) == 1


def test_pair_head_sees_exactly_the_documented_pairs(monkeypatch):
    """docs/method.md §2.6: one pair-head call over K_c = 2 blocks, rows cat(x, x) then cat(x, G(E(x)))."""
    step = make_step("gali4-cycle")
    inputs, values_out = [], {}
    evaluate = step.chains.evaluate

    def recording_evaluate(*args, **kwargs):
        values = evaluate(*args, **kwargs)
        values_out.update({str(node): v.detach().clone() for node, v in values.items()})
        return values

    monkeypatch.setattr(step.chains, "evaluate", recording_evaluate)
    step.nets.D.pair_head.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    x = images()
    step.step(x, torch.tensor(0.0))
    assert len(inputs) == 1
    pairs = inputs[0]
    assert pairs.shape == (2 * BATCH, 6, 32, 32)
    torch.testing.assert_close(pairs[:BATCH], torch.cat([x, x], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(pairs[BATCH:], torch.cat([x, values_out["G(E(x))"]], dim=1), rtol=0, atol=0)
    d_params = {id(p) for p in step.d_params}
    assert all(id(p) in d_params for p in step.nets.D.pair_head.parameters())  # D's optimiser steps the pair head


@pytest.mark.parametrize(
    ("cycle_classes", "fragment"),
    [
        ([["x", "E(x)"], ["x", "x"]], r"'cycle_classes' class 0 has slot kinds \['image', 'latent'\]"),
        ([["x", "x"]], "'cycle_classes' must be a list of 2 to 16"),
        ([["x", "x", "x"], ["x", "G(E(x))"]], "'cycle_classes' class 0 has slot kinds"),
        ([["x", "x"], ["x", "x"]], "two of 'cycle_classes' are the same pair"),
        ([["x", "x"], ["x", "G(E(z))"]], r"cycle_classes class 1': 'E' expects image"),
    ],
)
def test_bad_cycle_classes_are_named(cycle_classes, fragment):
    with pytest.raises(ConfigError, match=r"config key 'myspec.toml.*" + fragment):
        spec_from_table({"classes": GALI4, "cycle_classes": cycle_classes}, where="myspec.toml")


def test_unknown_keys_and_mu_of_a_latent_are_refused(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('classes = [["x", "E(x)"], ["G(z)", "z"]]\ncycle_class = [["x", "x"], ["x", "G(E(x))"]]\n')
    with pytest.raises(ConfigError, match=rf"{path}.*unknown keys \['cycle_class'\]; accepted: .*cycle_classes"):
        load_spec(str(path))
    with pytest.raises(ConfigError, match=r"'mu' expects image argument\(s\), got latent 'z'"):
        parse_expr("mu(z)", where="test")
    assert str(parse_expr("G(mu(mask1(x)))")) == "G(mu(mask1(x)))"  # typed like E: masked inputs allowed
    with pytest.raises(ConfigError, match=r"method\.cycle_lambda"):
        MethodConfig(cycle_lambda=-1.0).validate()


def test_the_paper_step_refuses_the_pair_head():
    from gali.engine.step.paper import PaperStep

    step = make_step("gali4-cycle")
    with pytest.raises(ConfigError, match=r"'method.tuples'.*gali4-cycle.*cycle_classes.*eager or graphed step"):
        PaperStep(step.nets, step.spec, step.method, OptimConfig(), LATENT)


def test_one_cli_step_of_gali4_cycle_saves_the_pair_head(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "job"
    assert main(["train", *TINY, "method.tuples=gali4-cycle", "run.kimg=0.032", f"run.dir={run_dir}"]) == 0
    (checkpoint,) = run_dir.glob("checkpoint-*.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    pair_keys = [key for key in state["D"] if key.startswith("pair_head.")]
    assert "pair_head.head.bias" in pair_keys and len(pair_keys) > 4
    assert state["D"]["pair_head.head.bias"].shape == (2,)
