"""What one step computes: the tuples each spec builds, network calls, gradient isolation, phases, noise."""

import copy

import pytest
import torch
from torch import nn

from gali.engine.method.config import MethodConfig
from gali.engine.method.noise import instance_noise_std
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step import eager as step_module
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from tests.tolerance import assert_twins_close

BATCH, LATENT, EXTRA = 4, 8, 16


def make_step(spec_name: str, seed: int = 0, **method) -> GaliStep:
    torch.manual_seed(seed)
    spec = load_spec(spec_name)
    extra_dim = EXTRA if spec.uses_feature_model else None
    G, E, D = build_models(
        ModelConfig(arch="svhn32", latent_dim=LATENT, width=0.125),
        slot_kinds=spec.slot_kinds,
        num_classes=spec.num_classes,
        extra_dim=extra_dim,
    )
    M = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, EXTRA)).requires_grad_(False) if extra_dim else None
    nets = Networks(G=G, E=E, D=D, M=M, extra_dim=extra_dim)
    # NCHW: tests call discriminate() on the same batch as step(), and the layout decides where each noise draw lands
    return GaliStep(
        nets,
        spec,
        MethodConfig(tuples=spec_name, **method),
        OptimConfig(lr=1e-3),
        LATENT,
        ComputeConfig(channels_last=False, kernel_impl="ref"),
    )


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def record_step(step: GaliStep, monkeypatch, noise: float = 0.0) -> dict:
    """Run one forward and capture the chain values, D's slots and the head's labels."""
    seen: dict = {}
    evaluate, features, head = step.chains.evaluate, step.nets.D.features, step_module.kway_head

    def spy_evaluate(spec, x, z, masks=None, labels=None):
        values = evaluate(spec, x, z, masks, labels)
        seen["values"] = {str(node): value for node, value in values.items()}
        return values

    def spy_features(slots, labels=None):
        seen["slots"] = [torch.cat(blocks).detach().clone() for blocks in slots]  # K row blocks per slot
        return features(slots, labels)

    def spy_head(h, w, b, labels, *args, **kwargs):
        seen["labels"] = labels.clone()
        return head(h, w, b, labels, *args, **kwargs)

    monkeypatch.setattr(step.chains, "evaluate", spy_evaluate)
    monkeypatch.setattr(step.nets.D, "features", spy_features)
    monkeypatch.setattr(step_module, "kway_head", spy_head)
    seen["out"] = step.discriminate(images(), torch.tensor(noise))
    return seen


ALL_SPECS = [
    "ali",
    "alice",
    "gali4",
    "gali8",
    "gali-mix",
    "gali-pt",
    "ali-pt",
    "alice-pt",
    "gali4-masked",
    "ali-masked",
    "alice-masked",
]


@pytest.mark.parametrize("name", ALL_SPECS)
def test_each_spec_builds_exactly_its_classes(name, monkeypatch):
    step = make_step(name)
    seen = record_step(step, monkeypatch)
    spec, k = step.spec, step.spec.num_classes
    assert seen["labels"].tolist() == [c for c in range(k) for _ in range(BATCH)]
    assert len(seen["slots"]) == len(spec.slot_kinds)
    for position, kind in enumerate(spec.slot_kinds):
        slot = seen["slots"][position]
        width = {"image": (3, 32, 32), "latent": (LATENT,), "extra": (EXTRA,)}[kind]
        assert slot.shape == (k * BATCH, *width)
        for cls, exprs in enumerate(spec.classes):  # noise 0: each block of rows is its chain variable
            torch.testing.assert_close(slot[cls * BATCH : (cls + 1) * BATCH], seen["values"][str(exprs[position])])
    assert set(seen["out"]) >= {"loss_d", "loss_ge", "p_true"}
    assert ("recon" in seen["out"]) == (step.spec.reconstruction is not None)
    assert {"e_sigma", "e_mu_spread"} <= set(seen["out"])  # every spec encodes the real (or masked) batch


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["ali", "gali4"])
@pytest.mark.parametrize("objective", ["product", "minimax", "misclassification"])
def test_objectives_give_the_loss_terms_of_their_definition(name, objective, monkeypatch):
    """The step's losses from the logits D gave its K classes, by docs/method.md §1.3-1.5 (K = 2 and 4)."""
    step = make_step(name, objective=objective)
    seen: dict = {}
    linear = step_module.F.linear

    def spy_linear(h, w, b):
        seen["logits"] = linear(h, w, b).detach().double()
        return linear(h, w, b)

    monkeypatch.setattr(step_module.F, "linear", spy_linear)
    out = step.discriminate(images(), torch.tensor(0.0))
    k = step.spec.num_classes
    log_p = torch.log_softmax(seen["logits"], dim=1).view(k, BATCH, k)  # class-k rows are block k
    log_true = torch.stack([log_p[c, :, c] for c in range(k)])  # (K, B): log D_k(t_k)
    want_d = -(2 / k) * log_true.mean(dim=1).sum()
    want_ge = {
        "product": -(2 / (k * (k - 1))) * sum(log_p[c, :, j].mean() for c in range(k) for j in range(k) if j != c),
        "minimax": -want_d,
        "misclassification": -(2 / k) * torch.log1p(-log_true.exp()).mean(dim=1).sum(),
    }[objective]
    assert out["loss_d"].item() == pytest.approx(want_d.item(), rel=1e-5)
    assert out["loss_ge"].item() == pytest.approx(want_ge.item(), rel=1e-5)


def test_misclassification_is_refused_on_the_fused_head():
    from gali.engine.errors import ConfigError
    from gali.engine.loop.config import load_config

    with pytest.raises(
        ConfigError,
        match=r"compute.kernel_impl.*no form of method.objective='misclassification'.*"
        r"compute.kernel_impl=ref",
    ):
        load_config("demo", ["method.objective=misclassification", "compute.kernel_impl=triton"])
    assert load_config("demo", ["method.objective=misclassification"]).compute.kernel_impl == "auto"


def network_calls(step: GaliStep) -> dict[str, int]:
    """How often one step calls E, G and M, counted by forward hooks on the networks."""
    calls = {"E": 0, "G": 0, "M": 0}
    hooks = [
        getattr(step.nets, op).register_forward_hook(lambda *_, op=op: calls.__setitem__(op, calls[op] + 1))
        for op in calls
        if getattr(step.nets, op) is not None
    ]
    step.step(images(), torch.tensor(0.1))
    for hook in hooks:
        hook.remove()
    return calls


@pytest.mark.parametrize("name", ALL_SPECS)
def test_step_calls_each_network_once_per_distinct_variable(name):
    step = make_step(name)
    assert network_calls(step) == {op: step.spec.count_calls(op) for op in ("E", "G", "M")}


def test_gali4_costs_three_encoder_and_three_generator_calls():
    step = make_step("gali4")
    assert network_calls(step) == {"E": 3, "G": 3, "M": 0}


@pytest.mark.parametrize(
    ("phase", "want"), [("both", [(2 * BATCH, True), (2 * BATCH, False)]), ("d", [(4 * BATCH, False)])]
)
def test_gali4_image_rows_without_a_gradient_get_their_own_d_call(phase, want):
    """G's rows (G(z), G(E(G(z)))) and the real rows (x twice) reach D's image branch in separate calls."""
    step = make_step("gali4")
    calls = []
    branch = step.nets.D.branches["image"]
    branch.register_forward_pre_hook(lambda _, a: calls.append((a[0].shape[0], a[0].requires_grad)))
    step.step(images(), torch.tensor(0.1), phase)
    assert calls == want


def test_each_encoder_call_draws_its_own_noise(monkeypatch):
    step = make_step("gali-mix")
    seen = record_step(step, monkeypatch)
    # E(mask2(...)) and E(mask4(mix1(...))) shared one ε in the authors' code (docs/method.md §5 item 14)
    latents = [v for key, v in seen["values"].items() if key.startswith("E(")]
    assert len(latents) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(latents[i], latents[j])


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed-twin"])
def test_pipeline_masks_reach_the_encoder_inputs(graphed):
    """With the batch's masks (method.mask_source=pipeline), E(mask1(x)) sees x with fill exactly where mask 1 is."""
    from gali.engine.step.graphed import GraphedStep
    from gali.pipelines.masks import MaskSpec, draw_masks

    step = make_step("gali-mix", mask_source="pipeline")
    runner = GraphedStep(step) if graphed else step
    args = MaskSpec(kind_weights=(1.0, 0.0, 1.0)).args(len(step.spec.mask_indices), 32, 32)
    masks = torch.from_numpy(draw_masks(range(BATCH), args))
    inputs = []
    step.nets.E.register_forward_pre_hook(lambda _, a: inputs.append(a[0].detach().clone()))
    x = images()
    runner.step(x, torch.tensor(0.0), "both", masks)
    hidden = masks[:, :1].bool().expand_as(x)
    assert hidden.any() and (~hidden).any()
    assert torch.equal(inputs[0], torch.where(hidden, torch.tensor(step.method.mask_fill), x))  # E(mask1(x)) first
    with pytest.raises(ValueError, match="needs 4"):
        step.step(x, torch.tensor(0.0), "both", masks[:, :2])


def test_instance_noise_only_on_image_slots(monkeypatch):
    step = make_step("gali8")
    seen = record_step(step, monkeypatch, noise=0.5)
    for position, kind in enumerate(step.spec.slot_kinds):
        cls0 = seen["slots"][position][:BATCH]
        clean = seen["values"][str(step.spec.classes[0][position])]
        assert torch.allclose(cls0, clean) == (kind == "latent")
    diff = seen["slots"][0][:BATCH] - seen["values"]["x"]
    assert 0.4 < diff.std().item() < 0.6


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_instance_noise_keeps_the_layout_and_is_standard_normal(layout):
    x = torch.zeros(64, 3, 32, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither dense layout: the plain randn_like path
        x = torch.zeros(64, 3, 32, 64)[..., ::2]
    noise = step_module._randn_in_layout(x)
    assert noise.shape == x.shape and (noise.stride() == x.stride()) == (layout != "strided")
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    assert not torch.equal(noise, step_module._randn_in_layout(x))  # fresh draws


def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["gali4", "alice"])
def test_simultaneous_step_takes_each_gradient_from_its_own_loss(name):
    """D's gradient equals a separate L_D backward, G/E's a separate L_GE backward, on copies."""
    reference = make_step(name)
    stepped = copy.deepcopy(reference)
    x, noise = images(), torch.tensor(0.1)

    def separate_backward(loss_name):
        twin = copy.deepcopy(reference)
        torch.manual_seed(5)
        out = twin.discriminate(x, noise)
        out[loss_name].backward()
        return twin

    d_twin = separate_backward("loss_d")
    ge_twin = separate_backward("loss_ge")
    both_twin = copy.deepcopy(reference)
    torch.manual_seed(5)
    out = both_twin.discriminate(x, noise)
    (out["loss_d"] + out["loss_ge"]).backward()

    torch.manual_seed(5)
    before = [p.detach().clone() for p in stepped.d_params + stepped.ge_params]
    stepped.step(x, noise)
    reduction = load_spec(name).num_classes * BATCH * 32 * 32  # the most terms summed into one gradient
    for mine, twins in ((stepped.d_params, d_twin.d_params), (stepped.ge_params, ge_twin.ge_params)):
        scale = max(g.abs().max().item() for g in _grads(twins))
        for got, want in zip(_grads(mine), _grads(twins), strict=True):
            assert_twins_close(got, want, reduction=reduction, scale=scale)
    # The test can fail: one backward of L_D + L_GE would have mixed G/E's loss into D.
    assert any(
        not torch.allclose(g, m) for g, m in zip(_grads(stepped.d_params), _grads(both_twin.d_params), strict=True)
    )
    after = [p.detach() for p in stepped.d_params + stepped.ge_params]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True) if b.numel() > 1)


@pytest.mark.parametrize(
    ("phase", "moves_d", "moves_ge"), [("d", True, False), ("ge", False, True), ("both", True, True)]
)
def test_alternating_phases_step_one_side_only(phase, moves_d, moves_ge):
    step = make_step("gali4")
    d_before = [p.detach().clone() for p in step.d_params]
    ge_before = [p.detach().clone() for p in step.ge_params]
    step.step(images(), torch.tensor(0.1), phase)
    d_moved = any(not torch.equal(b, p) for b, p in zip(d_before, step.d_params, strict=True))
    ge_moved = any(not torch.equal(b, p) for b, p in zip(ge_before, step.ge_params, strict=True))
    assert (d_moved, ge_moved) == (moves_d, moves_ge)


def test_unknown_phase_is_an_error():
    with pytest.raises(ValueError, match="phase"):
        make_step("ali").step(images(), torch.tensor(0.0), "g")


def test_losses_after_steps_are_finite_for_the_authors_weights():
    step = make_step("gali4", loss_weights="authors")
    for _ in range(3):
        out = step.step(images(), torch.tensor(0.1))
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_ge"])


def test_step_makes_no_host_sync(monkeypatch):
    """No .item(), .tolist(), .cpu(), .numpy() or tensor truth test in the chains, D, head or gradients.

    The optimizers are exempt: non-capturable Adam keeps its step counter as a host tensor, which
    is no device sync (the graphed step of the CUDA-graph issue uses capturable Adam).
    """
    step = make_step("gali-mix")
    x, noise = images(), torch.tensor(0.1)
    inside_optimizer = []

    def forbidden(name):
        original = getattr(torch.Tensor, name)

        def guarded(*args, **kwargs):
            if not inside_optimizer:
                raise AssertionError(f"host sync: Tensor.{name} called inside the step")
            return original(*args, **kwargs)

        return guarded

    for optimizer in (step.opt_d, step.opt_ge):

        def exempt(*args, _step=optimizer.step, **kwargs):
            inside_optimizer.append(True)
            try:
                return _step(*args, **kwargs)
            finally:
                inside_optimizer.pop()

        monkeypatch.setattr(optimizer, "step", exempt)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    out = step.step(x, noise)
    monkeypatch.undo()
    assert torch.isfinite(out["loss_d"])


def test_linear_instance_noise_schedule_matches_the_code():
    method = MethodConfig(instance_noise=0.1)
    assert [round(instance_noise_std(method, e, 4), 6) for e in range(1, 5)] == [0.075, 0.05, 0.025, 0.0]
    constant = MethodConfig(instance_noise=0.1, noise_schedule="constant")
    assert instance_noise_std(constant, 3, 4) == 0.1
