"""How the step runs (the [compute] section): graph-ready twin, precision, fp32 spectral norm, NVTX, compile, layout."""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gali.engine.errors import ConfigError, GaliError
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.ranges import ranges_enabled
from gali.engine.step.build import build_step
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.graphed import GraphedStep
from gali.engine.step.precision import fp32_spectral_norm, resolve_precision
from tests.tolerance import assert_twins_close, smooth_activations

BATCH, LATENT = 4, 8
STEP_REDUCTION = 8 * BATCH * 32 * 32  # the most terms summed into one value (K ≤ 8 classes): a D weight's gradient


def make_step(spec_name: str = "gali4", seed: int = 0, smooth: bool = False, **compute) -> GaliStep:
    """``smooth``: SiLU for LeakyReLU, for comparing gradients computed two ways (tests/tolerance.py)."""
    torch.manual_seed(seed)
    spec = load_spec(spec_name)
    G, E, D = build_models(
        ModelConfig(arch="svhn32", latent_dim=LATENT, width=0.125),
        slot_kinds=spec.slot_kinds,
        num_classes=spec.num_classes,
    )
    if smooth:
        smooth_activations(G, E, D)
    return GaliStep(
        Networks(G=G, E=E, D=D),
        spec,
        MethodConfig(tuples=spec_name),
        OptimConfig(lr=1e-3),
        LATENT,
        ComputeConfig(**{"kernel_impl": "ref", **compute}),
    )


def images(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(runner, steps: int = 3, seed: int = 7, phases=("both",), noise: float = 0.1) -> list[dict]:
    torch.manual_seed(seed)
    outs = []
    for i in range(steps):
        out = runner.step(images(seed=i), torch.tensor(noise), phases[i % len(phases)])
        outs.append({name: value.clone() for name, value in out.items()})
    return outs


def parameters(step: GaliStep) -> list[torch.Tensor]:
    return [p.detach() for p in step.d_params + step.ge_params]


@pytest.mark.numerics
@pytest.mark.parametrize("phases", [("both",), ("d", "d", "ge")])
def test_graph_ready_step_equals_the_eager_twin_in_fp32(phases):
    """Same seed, same batches: the static-buffer graph-ready update and the eager step agree bit for bit."""
    eager = make_step(cuda_graph=True)
    graphed = GraphedStep(copy.deepcopy(eager))
    want, got = run(eager, phases=phases), run(graphed, phases=phases)
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for name in w:
            assert torch.equal(w[name], g[name]), name
    for a, b in zip(parameters(eager), parameters(graphed.inner), strict=True):
        assert torch.equal(a, b)
    # and the test can fail: a different seed moves the parameters differently
    other = GraphedStep(make_step(cuda_graph=True))
    run(other, phases=phases, seed=8)
    assert any(not torch.equal(a, b) for a, b in zip(parameters(eager), parameters(other.inner), strict=True))


def test_graphed_step_keeps_its_own_copy_of_the_batch():
    graphed = GraphedStep(make_step(cuda_graph=True))
    x = images()
    graphed.step(x, torch.tensor(0.0))
    x.fill_(0.5)  # the step keeps its own copy of the batch
    assert not torch.equal(graphed._x, x)


@pytest.mark.parametrize(
    ("x", "noise", "match"),
    [
        (images(batch=BATCH + 1), torch.tensor(0.1), r"shape \(5, 3, 32, 32\).*built for shape \(4, 3, 32, 32\)"),
        (images().double(), torch.tensor(0.1), "float64"),
        (images(), torch.tensor([0.1]), "noise_std must be a 0-d"),
    ],
)
def test_graphed_step_rejects_a_batch_that_differs_from_the_captured_one(x, noise, match):
    graphed = GraphedStep(make_step(cuda_graph=True))
    graphed.step(images(), torch.tensor(0.1))
    before = [p.clone() for p in parameters(graphed.inner)]
    with pytest.raises(GaliError, match=match):
        graphed.step(x, noise)
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(graphed.inner), strict=True))


@pytest.mark.numerics
def test_channels_last_step_matches_contiguous():
    contiguous = make_step(smooth=True, channels_last=False)
    channels_last = copy.deepcopy(contiguous)
    channels_last.compute = ComputeConfig(channels_last=True)
    for net in (channels_last.nets.G, channels_last.nets.E, channels_last.nets.D):
        net.to(memory_format=torch.channels_last)
    # One step: Adam's first update is ±lr wherever a gradient is near zero, so later steps diverge.
    # No instance noise: randn_like follows the memory format, so the same seed draws other noise.
    (want,), (got,) = run(contiguous, steps=1, noise=0.0), run(channels_last, steps=1, noise=0.0)
    for name in ("loss_d", "loss_ge", "grad_norm_d", "grad_norm_ge"):
        assert_twins_close(got[name], want[name], reduction=STEP_REDUCTION, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_is_finite_and_near_fp32(precision):
    fp32 = make_step(precision="fp32")
    low = make_step(precision=precision)
    want, got = run(fp32, steps=1), run(low, steps=3)
    for out in got:
        for name, value in out.items():
            assert torch.isfinite(value).all(), (precision, name)
    # the first step starts from the same weights: its losses differ only by the precision
    torch.testing.assert_close(got[0]["loss_d"], want[0]["loss_d"], rtol=3e-2, atol=0)
    torch.testing.assert_close(got[0]["loss_ge"], want[0]["loss_ge"], rtol=3e-2, atol=0)
    assert got[0]["skipped_d"] == 0 and want[0]["skipped_d"] == 0  # counted in every precision, none here
    moved = [not torch.equal(a, b) for a, b in zip(parameters(fp32), parameters(low), strict=True)]
    assert any(moved)


def test_fp16_scaler_skips_an_overflowing_update_and_counts_it():
    step = make_step(precision="fp16")
    step.scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # scaled grads overflow fp32 → inf
    d_before = [p.clone() for p in step.d_params]
    out = step.step(images(), torch.tensor(0.1))
    assert out["skipped_d"].item() == 1.0 and out["skipped_ge"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(d_before, step.d_params, strict=True))
    assert step.scaler_d.get_scale() < 2.0**120  # backed off


def test_precision_auto_is_fp32_on_cpu_and_names_are_checked():
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"compute\.precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_spectral_norm_is_computed_once_in_fp32_under_autocast():
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 8))
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        want = reference.weight  # one fp32 power iteration, no autocast
    with fp32_spectral_norm(layer, "cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = layer.weight, layer.weight
    assert first is second and first.dtype == torch.float32  # one read, one power iteration
    torch.testing.assert_close(first.detach(), want, rtol=0, atol=0)
    u = layer.parametrizations.weight[0]._u
    torch.testing.assert_close(u, reference.parametrizations.weight[0]._u, rtol=0, atol=0)
    assert parametrize.is_parametrized(layer, "weight")


STEP_RANGES = ["gali/step", "gali/chains", "gali/D", "gali/head", "gali/backward_D", "gali/backward_GE", "gali/optim"]


@pytest.mark.parametrize(
    ("spec_name", "phase", "expected"),
    [
        ("gali4", "both", STEP_RANGES),
        ("gali4", "d", [r for r in STEP_RANGES if r != "gali/backward_GE"]),
        ("gali-mix", "both", STEP_RANGES[:2] + ["gali/mask_composite"] * 5 + STEP_RANGES[2:]),
    ],
)
def test_nvtx_ranges_are_entered_in_the_documented_order(spec_name, phase, expected, recorded_ranges):
    step = make_step(spec_name)
    mask_ops = [v for v in step.spec.variables() if v.op.startswith(("mask", "mix"))]
    assert expected.count("gali/mask_composite") == len(mask_ops)  # one launch per mask/mix variable
    with recorded_ranges() as names:
        step.step(images(), torch.tensor(0.1), phase)
    assert names == expected
    assert not ranges_enabled()  # off again outside the block


def test_graph_ready_step_with_capturable_adam_makes_no_host_sync(monkeypatch):
    """Not even the optimizers: capturable fused Adam keeps its step counters on the device."""
    graphed = GraphedStep(make_step("gali-mix", cuda_graph=True))
    graphed.step(images(), torch.tensor(0.1))  # state created

    def forbidden(name):
        def guarded(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside the step")

        return guarded

    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    out = graphed.step(images(seed=2), torch.tensor(0.1))
    monkeypatch.undo()
    assert torch.isfinite(out["loss_d"])


def test_build_step_gives_the_eager_twin_on_cpu_and_converts_layout():
    step = make_step()
    runner = build_step(
        step.nets, step.spec, step.method, OptimConfig(), LATENT, ComputeConfig(cuda_graph=True, channels_last=True)
    )
    assert isinstance(runner, GaliStep)
    conv = next(m for m in runner.nets.D.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = runner.step(images(), torch.tensor(0.1))
    assert torch.isfinite(out["loss_ge"])


@pytest.mark.numerics
@pytest.mark.slow
def test_compiled_step_matches_eager(monkeypatch):
    """Dynamo + AOTAutograd through G, E, D's trunk and the custom-op kernels (Triton interpreter).

    The aot_eager backend keeps this under a minute on two cores; Inductor's code generation is
    exercised by the ``compiled`` benchmark mode instead.
    """
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = make_step("gali-mix", smooth=True, kernel_impl="triton")
    compiled = copy.deepcopy(eager)
    runner = build_step(
        compiled.nets,
        compiled.spec,
        compiled.method,
        OptimConfig(lr=1e-3),
        LATENT,
        ComputeConfig(compile=True, kernel_impl="triton"),
    )
    assert "features" in vars(runner.nets.D)  # the instance now holds the compiled trunk
    (want,), (got,) = run(eager, steps=1, noise=0.0), run(runner, steps=1, noise=0.0)
    for name in ("loss_d", "loss_ge", "grad_norm_d", "grad_norm_ge"):
        assert_twins_close(got[name], want[name], reduction=STEP_REDUCTION, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager_on_gpu(precision):
    """On a GPU: replays run, draw fresh noise, make no sync, and track the eager twin's losses."""

    def on_gpu(**compute):
        step = make_step(**compute)
        nets = Networks(G=step.nets.G.cuda(), E=step.nets.E.cuda(), D=step.nets.D.cuda())
        return GaliStep(nets, step.spec, step.method, OptimConfig(lr=1e-3), LATENT, step.compute)

    eager = on_gpu(precision=precision, cuda_graph=True)
    graphed = GraphedStep(copy.deepcopy(eager), warmup=2)
    x = images().cuda()
    noise = torch.tensor(0.1, device="cuda")
    want, got = [], []
    for i in range(6):
        torch.manual_seed(i)
        want.append(eager.step(x, noise)["loss_d"].clone())
        torch.manual_seed(i)
        if i >= 3:
            torch.cuda.set_sync_debug_mode("error")
        got.append(graphed.step(x, noise)["loss_d"].clone())
        torch.cuda.set_sync_debug_mode("default")
    assert "both" in graphed._graphs
    assert len({round(v.item(), 6) for v in got[3:]}) == 3  # fresh noise per replay
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2 if precision == "bf16" else 1e-3, atol=1e-3)


def test_each_side_takes_its_own_learning_rate_when_set():
    from gali.engine.step.config import OptimConfig
    from gali.engine.step.optim import build_optimizers

    d, ge = [torch.zeros(2, requires_grad=True)], [torch.zeros(2, requires_grad=True)]
    opt_d, opt_ge = build_optimizers(d, ge, OptimConfig(lr=2e-4))
    assert opt_d.param_groups[0]["lr"] == opt_ge.param_groups[0]["lr"] == 2e-4
    opt_d, opt_ge = build_optimizers(d, ge, OptimConfig(lr=2e-4, lr_d=1e-4, lr_ge=4e-4))
    assert (opt_d.param_groups[0]["lr"], opt_ge.param_groups[0]["lr"]) == (1e-4, 4e-4)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_restored_step_keeps_adams_state_but_takes_its_settings_from_the_config(cuda_graph):
    """A resume with optim.lr=... takes the new lr; capturable follows compute.cuda_graph (issue 22, finding 3)."""
    trained = make_step()
    run(trained, steps=2)
    restored = GaliStep(
        trained.nets, trained.spec, trained.method, OptimConfig(lr=5e-4), LATENT, ComputeConfig(cuda_graph=cuda_graph)
    )
    restored.load_state_dict(trained.state_dict())
    for optimizer, saved in ((restored.opt_d, trained.opt_d), (restored.opt_ge, trained.opt_ge)):
        assert all(g["lr"] == 5e-4 and g["capturable"] == cuda_graph for g in optimizer.param_groups)
        for param, mine in zip(optimizer.param_groups[0]["params"], saved.param_groups[0]["params"], strict=True):
            assert torch.equal(optimizer.state[param]["exp_avg"], saved.state[mine]["exp_avg"])
    run(restored, steps=1)  # and it steps
