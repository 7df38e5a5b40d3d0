"""BigBiGAN-class networks at 128² and 256²: every tuple spec runs, unary heads, checkpointing, resolutions, sizes,
the RevNet encoder."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gali.engine.errors import ConfigError
from gali.engine.loop.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.train import train
from gali.engine.method.config import MethodConfig
from gali.engine.method.losses import loss_weights
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets import biggan
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import build_networks
from gali.engine.nets.paper import build_models
from gali.engine.step.build import build_step
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.kernels.kway_head import kway_losses
from tests.isolation import run_isolated
from tests.tolerance import assert_twins_close

WIDTH = 1 / 48  # ch = 2 in G and D, 1 base channel in E: seconds per step on a CPU
CPU = torch.device("cpu")
PRESETS = (
    "imagenet128-gali4",
    "imagenet128-ali",
    "imagenet128-gali-mix",
    "imagenet256-gali4",
    "imagenet128-gali4-e256",
)
TINY = ["data.backend=synthetic", f"model.width={WIDTH}", "run.batch_size=2"]


def _step(
    arch: str,
    tuples: str,
    *,
    latent_dim: int = 12,
    encoder_resolution: int = 0,
    unary: bool = True,
    encoder_block: str = "bottleneck",
    label_classes: int = 0,
    **compute,
):
    torch.manual_seed(0)
    model = ModelConfig(
        arch=arch,
        latent_dim=latent_dim,
        width=WIDTH,
        encoder_resolution=encoder_resolution,
        unary_heads=unary,
        encoder_block=encoder_block,
        label_classes=label_classes,
    )
    spec = load_spec(tuples)
    nets = build_networks(model, MethodConfig(tuples=tuples), spec, resolution=model.resolution, device=CPU)
    step = build_step(
        nets,
        spec,
        MethodConfig(tuples=tuples),
        OptimConfig(),
        latent_dim,
        ComputeConfig(**{"kernel_impl": "ref", "channels_last": False, **compute}),
    )
    return step, nets, model


def _images(resolution: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("preset", PRESETS)
def test_every_imagenet_preset_builds(preset):
    cfg = load_config(preset, TINY)
    spec = load_spec(cfg.method.tuples)
    nets = build_networks(cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=CPU)
    assert isinstance(nets.G, biggan.BigGANGenerator) and isinstance(nets.D, biggan.BigBiGANDiscriminator)
    assert nets.E.resolution == cfg.data.resolution and nets.G.resolution == cfg.model.resolution


@pytest.mark.parametrize(
    ("arch", "latent_dim", "encoder_resolution", "data"),
    [("biggan128", 12, 0, 128), ("biggan256", 14, 0, 256), ("biggan128", 12, 256, 256)],
)
def test_a_training_step_runs_and_moves_every_network(arch, latent_dim, encoder_resolution, data):
    step, nets, _ = _step(arch, "gali4", latent_dim=latent_dim, encoder_resolution=encoder_resolution)
    nets.G.init_output_bias(_images(data, batch=4))  # resized to G's side
    before = {name: copy.deepcopy(getattr(nets, name).state_dict()) for name in ("G", "E", "D")}
    out = step.step(_images(data), torch.tensor(0.1))
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_ge"]) and out["p_true"].shape == (4,)
    for name in ("G", "E", "D"):
        after = getattr(nets, name).state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before[name].items()), name


def channels_last_step_at_the_smallest_width() -> tuple[bool, int]:
    """One channels-last step of the smallest biggan128 nets with E at 256²: (finite loss, E's fewest channels)."""
    step, _, _ = _step("biggan128", "gali4", encoder_resolution=256, channels_last=True)
    out = step.step(_images(256), torch.tensor(0.1))
    channels = min(m.out_channels for m in step.nets.E.modules() if isinstance(m, nn.Conv2d))
    return bool(torch.isfinite(out["loss_d"])), channels


def test_a_channels_last_step_runs_at_the_smallest_width():
    """In a child process: torch 2.13's CPU kernels crashed here (1-channel activations; 1×1 stride-2 convolutions
    on AVX-512 EPYCs, issue 20). Channel counts stay >= 2 and the strided 1×1 convolutions are subsampled."""
    finite, channels = run_isolated(channels_last_step_at_the_smallest_width)
    assert finite and channels >= 2


@pytest.mark.parametrize("tuples", ["ali", "gali4", "gali8", "gali-mix"])
def test_every_tuple_spec_runs_with_the_new_networks(tuples):
    step, _, _ = _step("biggan128", tuples)
    out = step.step(_images(128), torch.tensor(0.1))
    k = load_spec(tuples).num_classes
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_ge"]) and out["p_true"].shape == (k,)


@pytest.mark.numerics
def test_unary_heads_add_their_k_way_losses_with_weight_one(monkeypatch):
    """L = Σ over the image, latent and joint heads of the K-way losses, checked against three separate heads."""
    step, nets, _ = _step("biggan128", "gali4")
    seen = {}
    features = nets.D.features

    def spy(slots, labels=None):
        seen["h"] = features(slots, labels)
        return seen["h"]

    monkeypatch.setattr(nets.D, "features", spy)
    out = step.discriminate(_images(128), torch.tensor(0.0))
    h = seen["h"].detach()
    d = nets.D
    image_width = d.unary_image.in_features
    latent_width = d.unary_latent.in_features
    parts = h.split([image_width, latent_width, d.head.in_features], dim=1)
    labels = torch.arange(4).repeat_interleave(2)
    w_true, w_pair = loss_weights(4)
    want_d = want_ge = 0.0
    with torch.no_grad():
        for part, head in zip(parts, (d.unary_image, d.unary_latent, d.head), strict=True):
            loss_d, loss_ge = kway_losses(F.linear(part, head.weight, head.bias), labels, w_true, w_pair, 0.5)
            want_d, want_ge = want_d + loss_d, want_ge + loss_ge
    assert_twins_close(out["loss_d"], want_d, reduction=h.shape[1])  # the heads sum over D's feature width
    assert_twins_close(out["loss_ge"], want_ge, reduction=h.shape[1])
    # without unary heads only the joint head's loss is left
    plain, _, _ = _step("biggan128", "gali4", unary=False)
    assert plain.nets.D.head_weight()[2] == 1 and d.head_weight()[2] == 3


@pytest.mark.numerics
@pytest.mark.parametrize("encoder_block", ["bottleneck", "revnet"])
def test_activation_checkpointing_gives_the_same_gradients(encoder_block):
    plain, _, _ = _step("biggan128", "gali4", encoder_block=encoder_block)
    checkpointed = copy.deepcopy(plain)
    assert (
        sum(
            biggan.set_activation_checkpointing(net, True)
            for net in (checkpointed.nets.G, checkpointed.nets.E, checkpointed.nets.D)
        )
        > 10
    )
    grads = []
    for step in (plain, checkpointed):
        torch.manual_seed(3)
        step.step(_images(128), torch.tensor(0.1))  # the gradients it stepped with stay in .grad
        grads.append([p.grad.clone() for p in step.d_params + step.ge_params])
    scale = max(g.abs().max().item() for g in grads[0])  # recomputation reorders nothing but float sums
    for a, b in zip(*grads, strict=True):
        assert_twins_close(b, a, reduction=8 * 2 * 128 * 128, scale=scale)  # a D weight's gradient: rows × pixels


def test_a_reversible_block_inverts_exactly():
    """(x1, x2) from (y1, y2) to float64 rounding, with BatchNorm statistics and affine parameters far from 0 and 1."""
    torch.manual_seed(0)
    block = biggan.ReversibleBlock(16, 4).double().eval()
    generator = torch.Generator().manual_seed(2)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            for tensor in (m.weight, m.bias, m.running_mean):
                tensor.data = torch.randn(m.num_features, generator=generator, dtype=torch.float64)
            m.running_var.data = torch.rand(m.num_features, generator=generator, dtype=torch.float64) + 0.5
    x = torch.randn(3, 16, 8, 8, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        recovered = block.inverse(y)
    assert (y - x).abs().max() > 0.1  # F and G are far from zero
    torch.testing.assert_close(recovered, x, rtol=0, atol=1e-10)


def test_a_training_step_runs_with_the_revnet_encoder():
    """Reversible units after each stage's first (bottleneck) block, channels >= 2 in channels-last, finite
    gradients in every parameter of E."""
    step, nets, _ = _step("biggan128", "gali4", encoder_block="revnet", channels_last=True)
    blocks = list(nets.E.blocks)
    assert [type(b).__name__ for b in blocks[:4]] == ["Bottleneck", "ReversibleBlock", "ReversibleBlock", "Bottleneck"]
    assert sum(isinstance(b, biggan.ReversibleBlock) for b in blocks) == sum(biggan.RESNET_STAGES) - 4
    assert min(m.out_channels for m in nets.E.modules() if isinstance(m, nn.Conv2d)) >= 2
    out = step.step(_images(128), torch.tensor(0.1))  # the gradients it stepped with stay in .grad
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_ge"]) and out["p_true"].shape == (4,)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nets.E.parameters())
    mu, log_sigma = nets.E(_images(256))  # resized to E's 128²
    assert mu.shape == log_sigma.shape == (2, 12)
    out_features, pooled = nets.E.features(_images(128))
    assert out_features.shape == (2, 24) and pooled.shape == (2, nets.E.out.in_features)


def test_the_bottleneck_encoder_is_the_default_and_bad_encoder_blocks_are_refused():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    encoders = []
    for block in (None, "bottleneck", "revnet"):
        torch.manual_seed(0)
        encoders.append(biggan.ResNetEncoder(128, 12, WIDTH, **({} if block is None else {"block": block})))
    default, bottleneck, revnet = encoders
    assert ModelConfig().encoder_block == "bottleneck" and count(default) == count(bottleneck) != count(revnet)
    assert all(torch.equal(v, bottleneck.state_dict()[k]) for k, v in default.state_dict().items())
    with torch.device("meta"):
        full = biggan.ResNetEncoder(128, 120)
    assert count(full) - count(full.out) == 25_557_032 - 2048 * 1000 - 1000  # torchvision's ResNet-50 less its fc
    with pytest.raises(ConfigError, match=r"model.encoder_block.*accepted: bottleneck, revnet"):
        ModelConfig(arch="biggan128", encoder_block="resnet").validate()
    with pytest.raises(ConfigError, match=r"model.encoder_block.*paper's networks"):
        load_config("demo", ["model.encoder_block=revnet"])
    with pytest.raises(ValueError, match="block is one of bottleneck, revnet"):
        biggan.ResNetEncoder(128, 12, WIDTH, block="resnet")


def test_d_sees_its_resolution_in_every_slot_and_e_its_own_in_every_call():
    cfg = load_config("imagenet128-gali4-e256", TINY)
    spec = load_spec(cfg.method.tuples)
    torch.manual_seed(0)
    nets = build_networks(cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=CPU)
    step = build_step(
        nets, spec, cfg.method, cfg.optim, cfg.model.latent_dim, ComputeConfig(kernel_impl="ref", channels_last=False)
    )
    e_inputs, d_inputs = [], []
    nets.E.stem.register_forward_pre_hook(lambda m, args: e_inputs.append(tuple(args[0].shape[-2:])))
    nets.D.branches["image"].register_forward_pre_hook(lambda m, args: d_inputs.append(tuple(args[0].shape[-2:])))
    step.step(_images(256), torch.tensor(0.1))
    assert len(e_inputs) == spec.count_calls("E") and set(e_inputs) == {(256, 256)}
    assert d_inputs and set(d_inputs) == {(128, 128)}


def test_masked_specs_need_one_resolution_and_paper_nets_refuse_the_new_options():
    with pytest.raises(ConfigError, match=r"model.encoder_resolution.*masks and mixes"):
        load_config("imagenet128-gali4-e256", [*TINY, "method.tuples=gali-mix"])
    with pytest.raises(ConfigError, match=r"model.unary_heads.*paper's networks"):
        load_config("demo", ["model.unary_heads=true"])
    with pytest.raises(ConfigError, match=r"compute.activation_checkpointing.*no residual blocks"):
        load_config("demo", ["compute.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match=r"data.resolution.*encoder_resolution=256"):
        load_config("imagenet128-gali4-e256", [*TINY, "data.resolution=128"])
    with pytest.raises(ValueError, match="latent_dim 13 is not a multiple of 6"):
        biggan.BigGANGenerator(128, 13, WIDTH)


def test_class_conditioning_reaches_g_and_the_joint_features_of_d():
    """model.label_classes: every G block and D's joint MLP take each row's label; a step without labels is refused."""
    step, nets, _ = _step("biggan128", "gali4", label_classes=3, unary=False)
    z = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    nets.G.eval()
    with torch.no_grad():
        a, b = nets.G(z, torch.tensor([0, 1])), nets.G(z, torch.tensor([0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # row 1's label changed only row 1
    x, latents = _images(128), torch.randn(2, 12)
    slots = [[x, x], [latents, latents]]  # two tuple classes of the same rows
    nets.D.eval()  # no spectral-norm power iteration between the two calls
    with torch.no_grad():
        h = nets.D.features(slots, torch.tensor([0, 1]))
        h_other = nets.D.features(slots, torch.tensor([2, 1]))
    assert torch.equal(h[:2], h[2:])  # each block's rows carry the batch's labels
    assert not torch.allclose(h[0], h_other[0]) and torch.equal(h[1], h_other[1])
    nets.D.train()
    out = step.step(x, torch.tensor(0.1), "both", labels=torch.tensor([0, 2]))
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_ge"])
    with pytest.raises(ValueError, match=r"class-conditional \(model.label_classes=3\).*labels"):
        step.step(x, torch.tensor(0.1))
    unconditional, _, _ = _step("biggan128", "gali4", unary=False)
    assert unconditional.nets.G.label_classes == 0 and unconditional.nets.G.shared is None


def test_class_conditional_runs_check_the_datas_classes_and_train(tmp_path):
    """A two-class image folder at 128² (8 training, 4 held-out images): the data's classes are checked, then a
    class-conditional run trains, snapshots (held-out metrics, grids) and checkpoints."""
    from PIL import Image

    for split, count in (("train", 4), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                color = (40 + 100 * (label == "b"), 20 * i, 200)
                Image.new("RGB", (128, 128), color).save(tmp_path / "data" / split / label / f"{i}.png")
    data = ["data.source=folder", f"data.root={tmp_path / 'data'}", "data.backend=torch", "data.workers=0"]
    with pytest.raises(ConfigError, match=r"model.label_classes.*paper's networks"):
        load_config("demo", ["model.label_classes=10"])
    with pytest.raises(ConfigError, match=r"model.label_classes.*got 3, but the training data has 2 classes"):
        train(load_config("imagenet128-ali", [*TINY, *data, "model.label_classes=3", f"run.out_dir={tmp_path}"]))
    overrides = [
        *TINY,
        *data,
        "model.label_classes=2",
        "run.kimg=0.004",
        "run.snapshot_kimg=0.004",
        "run.tick_kimg=0.002",
        "run.grid_size=2",
        "run.identity_images=0",
        "run.ema_kimg=0",
        f"run.out_dir={tmp_path / 'runs'}",
    ]
    result = train(load_config("imagenet128-ali", overrides), log=lambda line: None)
    assert result.kimg == pytest.approx(0.004) and math.isfinite(result.recon_mse)


def test_a_checkpoint_of_the_new_networks_round_trips(tmp_path):
    cfg = load_config("imagenet128-gali4", TINY)
    spec = load_spec(cfg.method.tuples)
    nets = build_networks(cfg.model, cfg.method, spec, resolution=128, device=CPU)
    path = save_checkpoint(tmp_path / "checkpoint-0000000002.pt", Checkpoint(cfg, nets).state_dict())
    _, state = load_checkpoint(path)
    torch.manual_seed(5)
    fresh = build_networks(cfg.model, cfg.method, spec, resolution=128, device=CPU)
    Checkpoint(cfg, fresh).load_state_dict(state)
    for name in ("G", "E", "D"):
        mine, theirs = getattr(nets, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), name


def test_full_size_parameter_counts_match_the_published_networks(monkeypatch):
    """BigGAN ch96 at 128²: G 70.4 M with its class embedding (ours has none), D trunk 86.4 M (88.0 M less
    the 1000 x 1536 projection embedding); ResNet-50 23.5 M without its classifier, plus our 2048 x 2·d_z head."""
    monkeypatch.setattr(biggan, "_spectral_norm_all", lambda module: None)  # no parameters of its own; slow on meta
    with torch.device("meta"):
        G, E, D = build_models(
            ModelConfig(arch="biggan128", latent_dim=120), slot_kinds=("image", "latent"), num_classes=4
        )
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(G) == pytest.approx(70.4e6, rel=0.04)
    assert count(D.branches["image"]) == pytest.approx(88.0e6 - 1000 * 1536, rel=0.01)
    assert count(E) - count(E.out) == pytest.approx(23.5e6, rel=0.01)
    assert isinstance(E.out, nn.Linear) and E.out.in_features == 2048
