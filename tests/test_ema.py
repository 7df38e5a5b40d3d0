"""Moving averages of G and E: the decay of the configured half-life, ramp-up and start, in the checkpoint."""

import copy

import pytest
import torch
from torch import nn

from gali.engine.loop.checkpoint import Checkpoint, load_checkpoint, load_networks, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.ema import WeightAverage
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import build_networks

TINY = ["model.width=0.125", "model.latent_dim=8"]


def _nets():
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    return cfg, build_networks(cfg.model, cfg.method, load_spec("gali4"), resolution=32, device=torch.device("cpu"))


def _perturb(net: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
        for b in net.buffers():
            if b.is_floating_point():
                b.add_(1.0)


@pytest.mark.parametrize(
    ("images_seen", "rampup", "half_life"), [(100_000, 0.0, 2000.0), (10_000, 0.05, 500.0), (100_000, 0.05, 2000.0)]
)
def test_average_moves_toward_the_live_weights_by_the_half_life(images_seen, rampup, half_life):
    _, nets = _nets()
    ema = WeightAverage(nets, ema_kimg=2.0, rampup=rampup, start_kimg=0.0)
    before = copy.deepcopy(ema.G.state_dict())
    _perturb(nets.G, seed=1)
    beta = 0.5 ** (32 / half_life)  # the average's weight halves every half_life images
    assert ema.beta(images_seen, 32) == pytest.approx(beta)
    ema.update(images_seen, 32)
    live = nets.G.state_dict()
    for name, p in nets.G.named_parameters():
        torch.testing.assert_close(ema.G.state_dict()[name], beta * before[name] + (1 - beta) * p.detach())
    for name, _ in nets.G.named_buffers():
        assert torch.equal(ema.G.state_dict()[name], live[name]), name  # buffers are copied
    # after n steps a constant live weight has pulled the average (1 - beta^n) of the way
    start = ema.G.output_bias.detach().clone()
    for _ in range(10):
        ema.update(images_seen, 32)
    torch.testing.assert_close(ema.G.output_bias, nets.G.output_bias + beta**10 * (start - nets.G.output_bias))


def test_before_the_start_the_average_is_the_live_weights():
    _, nets = _nets()
    ema = WeightAverage(nets, ema_kimg=10.0, rampup=0.0, start_kimg=1.0)
    _perturb(nets.E, seed=2)
    assert ema.beta(1000, 32) == 0.0 and ema.beta(1032, 32) > 0.99
    ema.update(1000, 32)
    assert all(
        torch.equal(a, b) for a, b in zip(ema.E.state_dict().values(), nets.E.state_dict().values(), strict=True)
    )
    assert all(not p.requires_grad for p in ema.E.parameters())


def test_checkpoint_keeps_the_averages_and_eval_loads_them_unless_told(tmp_path):
    cfg, nets = _nets()
    ema = WeightAverage(nets, ema_kimg=1.0, rampup=0.0, start_kimg=0.0)
    _perturb(nets.G, seed=3)
    ema.update(5000, 32)  # now the average differs from the live G
    path = save_checkpoint(tmp_path / "checkpoint-0000005000.pt", Checkpoint(cfg, nets, ema=ema).state_dict())
    _, state = load_checkpoint(path)
    assert set(state) >= {"G_ema", "E_ema"}
    _, loaded, weights = load_networks(path, torch.device("cpu"))
    assert weights == "ema" and torch.equal(loaded.G.output_bias, ema.G.output_bias)
    _, live, weights = load_networks(path, torch.device("cpu"), ema=False)
    assert weights == "live" and torch.equal(live.G.output_bias, nets.G.output_bias)
    # a run resumed with an average from a checkpoint written without one starts it from the live weights
    restored = WeightAverage(nets, ema_kimg=1.0, rampup=0.0, start_kimg=0.0)
    restored.load_state_dict({"G": state["G"], "E": state["E"]})
    assert torch.equal(restored.G.output_bias, nets.G.output_bias)
