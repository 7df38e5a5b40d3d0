"""gali info: parameters, the step's FLOPs per image checked against a hand count on a tiny network, the fast count
(fake tensors) against the measured one (real tensors), and the run plan's memory model."""

import functools
import re

import pytest
import torch
from torch import Tensor, nn

from gali.engine.cli import main
from gali.engine.loop.config import load_config
from gali.engine.loop.info import parameter_counts
from gali.engine.loop.plan import (
    GPUS,
    count_sizes,
    network_sizes,
    recommended_accumulate,
    warn_if_batch_will_not_fit,
)
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import Networks, build_networks
from gali.engine.step.cost import fake_networks, measure_step_cost

R, DZ, F, K = 2, 3, 5, 2  # image side, latent size, D's feature width, ALI's two classes
PIXELS = 3 * R * R


class TinyG(nn.Module):
    label_classes = 0  # unconditional

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(DZ, PIXELS, bias=False)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(z).view(-1, 3, R, R)


class TinyE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(PIXELS, 2 * DZ, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x.flatten(1)).chunk(2, dim=1)


class TinyD(nn.Module):
    resolution = R

    def __init__(self) -> None:
        super().__init__()
        self.joint = nn.Linear(PIXELS + DZ, F)
        self.head = nn.Linear(F, K)

    def head_weight(self) -> tuple[Tensor, Tensor, int]:
        return self.head.weight, self.head.bias, 1

    def features(self, slots: list[list[Tensor]], labels: Tensor | None = None) -> Tensor:
        images, latents = (torch.cat(blocks) for blocks in slots)
        return self.joint(torch.cat([images.flatten(1), latents], dim=1))


def test_step_flops_per_image_match_a_hand_count():
    torch.manual_seed(0)
    nets = Networks(G=TinyG(), E=TinyE(), D=TinyD())
    cost = measure_step_cost(nets, load_spec("ali"), MethodConfig(tuples="ali"), DZ, R)
    # 2 FLOPs per multiply-add. Per real image: E(x) and G(z) once each forward, and their weight gradients in
    # the backward (x and z need no input gradient); D's joint layer on both classes' rows (2 per image),
    # forward, input gradient and weight gradient; the head's F x K layer three times forward (the D loss, the
    # G/E loss on the detached weight, the step's p_true statistics), with backward input gradients for the
    # two losses and a weight gradient for the D loss.
    encoder = 2 * PIXELS * 2 * DZ
    generator = 2 * DZ * PIXELS
    joint = 2 * 2 * (PIXELS + DZ) * F
    head = 2 * 2 * F * K
    want = 2 * encoder + 2 * generator + 3 * joint + 3 * head + 3 * head
    assert cost.flops_per_image == want
    # saved for the backward, per image: at least the inputs of D's joint layer (2 rows of PIXELS + DZ) in fp32
    assert cost.activation_bytes_per_image >= 2 * (PIXELS + DZ) * 4
    assert all(p.grad is None for p in nets.D.parameters())  # measuring leaves no gradients behind


def test_parameter_counts_are_every_networks_parameters():
    cfg = load_config("demo")
    nets = build_networks(cfg.model, cfg.method, load_spec("gali4"), resolution=32, device=torch.device("cpu"))
    counts = parameter_counts(nets)
    assert counts == {name: sum(p.numel() for p in getattr(nets, name).parameters()) for name in ("G", "E", "D")}


def test_gali_info_sizes_a_preset_without_its_data(capsys):
    assert main(["info", "--preset", "celeba64-gali4", "model.width=0.125"]) == 0  # data.root is not set
    out = capsys.readouterr().out
    assert "GFLOP per real image" in out and "MiB per real image" in out and "TFLOP per step of 100" in out
    for name in ("G", "E", "D"):
        assert f"  {name} " in out


@pytest.mark.parametrize("bad", ["model.width=-1", "run.batch_size=0"])
def test_gali_info_names_a_bad_override(capsys, bad):
    assert main(["info", bad]) == 2
    assert bad.split("=")[0] in capsys.readouterr().err


# the paper's svhn32 networks (the demo preset's width), and tiny BigGAN ones (unary heads; class-conditional)
TINY = {
    "paper": ("demo", []),
    "biggan": ("imagenet128-gali4", ["model.width=0.03125"]),
    "biggan-conditional": ("imagenet128-gali4", ["model.width=0.03125", "model.label_classes=5"]),
}


@functools.cache
def _real_and_fake(name: str, precision: str = "fp32"):
    """(config, fake networks, the real networks' measured cost, the fake networks' counted cost)."""
    preset, overrides = TINY[name]
    cfg = load_config(preset, ["data.backend=synthetic", *overrides])
    spec = load_spec(cfg.method.tuples)
    args = (spec, cfg.method, cfg.model.latent_dim, cfg.data.resolution)
    torch.manual_seed(0)
    real = build_networks(cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=torch.device("cpu"))
    fake = fake_networks(cfg.model, cfg.method, spec, cfg.data.resolution)
    assert parameter_counts(fake) == parameter_counts(real)
    measured = measure_step_cost(real, *args, precision=precision)
    return cfg, fake, measured, measure_step_cost(fake, *args, precision=precision)


@pytest.mark.parametrize("name", list(TINY))
def test_fast_count_equals_the_measured_count(name):
    _, _, measured, counted = _real_and_fake(name)
    assert counted.flops_per_image == measured.flops_per_image
    for field in ("activation_bytes_per_image", "activation_bytes_fixed", "checkpointed_bytes_per_image"):
        assert getattr(counted, field) == pytest.approx(getattr(measured, field), rel=0.01), field


def test_memory_models_activations_are_the_measured_saved_bytes():
    """The plan's activation term against the real networks' saved bytes at a batch of 48: fp32 exactly as counted,
    bf16 (the fp32 count halved) against a count under the CPU's autocast."""
    cfg, fake, measured, counted = _real_and_fake("biggan")
    sizes = network_sizes(cfg, fake, counted)
    m = 48
    real = measured.activation_bytes_fixed + m * measured.activation_bytes_per_image
    assert sizes.activation_bytes(m, bf16=False, checkpointed=False) == pytest.approx(real, rel=0.01)
    _, _, measured_bf16, _ = _real_and_fake("biggan", "bf16")
    real_bf16 = measured_bf16.activation_bytes_fixed + m * measured_bf16.activation_bytes_per_image
    assert sizes.activation_bytes(m, bf16=True, checkpointed=False) == pytest.approx(real_bf16, rel=0.03)
    assert counted.checkpointed_bytes_per_image < counted.activation_bytes_per_image


def test_gali_info_prints_a_run_plan_that_follows_from_the_memory_model(capsys):
    assert main(["info", "--preset", "imagenet128-gali4", "--gpus", "8", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "run plan on 8 x NVIDIA H200" in out and "989 TFLOP/s dense bf16" in out and "141 GB" in out
    fits = {
        label: (int(bf16.replace(",", "")), int(fp32.replace(",", "")))
        for label, bf16, fp32 in re.findall(r"(\w+) activation checkpointing +([\d,]+) +([\d,]+)", out)
    }
    assert set(fits) == {"without", "with"}
    cfg = load_config("imagenet128-gali4", ["data.backend=synthetic"])
    sizes = count_sizes(cfg)
    memory = GPUS["h200"].memory_bytes
    for label, checkpointed in (("without", False), ("with", True)):
        for fit, bf16 in zip(fits[label], (True, False), strict=True):
            kw = {"bf16": bf16, "checkpointed": checkpointed, "extra_gradients": True}
            assert sizes.memory_bytes(fit, **kw) <= memory < sizes.memory_bytes(fit + 1, **kw)
    # the preset's 1024 over 8 GPUs: 128 per GPU in bf16 without checkpointing
    fits_128 = sizes.memory_bytes(128, bf16=True, checkpointed=False, extra_gradients=True) <= memory
    assert fits_128 == (fits["without"][0] >= 128)
    accumulate = 1 if fits_128 else recommended_accumulate(sizes, cfg, 8, memory)
    assert f"global batch 1024 = 8 GPUs x 128 per GPU: {'fits' if fits_128 else 'does not fit'}" in out
    assert f"run.accumulate={accumulate}: micro-batches of {128 // accumulate}" in out
    step = sizes.cost.flops_per_image * 128 / (0.40 * 989e12)
    assert f"{step * 1e3:,.1f} ms per step, {1024 / step:,.0f} img/s" in out
    assert f"time to run.kimg=300000: {300000e3 * step / 1024 / 3600:,.1f} h" in out


def test_recommended_accumulate_is_the_smallest_divisor_that_fits():
    cfg = load_config("demo", ["run.batch_size=96"])
    sizes = count_sizes(cfg)

    def need(micro: int) -> float:  # precision 'auto' is bf16 on a GPU; two ranks
        return sizes.memory_bytes(micro, bf16=True, checkpointed=False, extra_gradients=True)

    assert recommended_accumulate(sizes, cfg, 2, need(48)) == 1
    assert recommended_accumulate(sizes, cfg, 2, need(48) - 1) == 2  # 24 per micro-batch
    assert recommended_accumulate(sizes, cfg, 2, need(16)) == 3  # 48 = 3 x 16
    assert recommended_accumulate(sizes, cfg, 2, need(1) - 1) is None


def test_train_warns_when_the_plan_says_the_batch_will_not_fit():
    cfg = load_config("demo", ["run.batch_size=64"])
    sizes = count_sizes(cfg)
    lines: list[str] = []
    enough = sizes.memory_bytes(32, bf16=True, checkpointed=False, extra_gradients=True)  # 'auto': bf16 on a GPU
    assert not warn_if_batch_will_not_fit(cfg, 2, enough, lines.append, sizes)
    assert not lines
    # counted here: a count of its own, whose saved bytes may differ from the first's by a few bytes per image
    # (16 in 2.1 MB seen: which fake tensors share storage varies between counts), hence 4 KiB less memory
    assert warn_if_batch_will_not_fit(cfg, 2, enough - 4096, lines.append)
    assert len(lines) == 1 and "warning:" in lines[0] and "try run.accumulate=2" in lines[0]


def test_gali_info_names_an_unknown_gpu(capsys):
    assert main(["info", "--gpu", "v100"]) == 2
    assert "h100, h200, b200, a100-80gb" in capsys.readouterr().err
