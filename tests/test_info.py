"""gali info: parameters, and the step's FLOPs per image checked against a hand count on a tiny network."""

import pytest
import torch
from torch import Tensor, nn

from gali.engine.cli import main
from gali.engine.loop.config import load_config
from gali.engine.loop.info import parameter_counts
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import Networks, build_networks
from gali.engine.step.cost import measure_step_cost

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
