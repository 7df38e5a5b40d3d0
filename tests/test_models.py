"""G, E and D of docs/method.md §3: shapes, exact layer hyperparameters, init, spectral norm, slots."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gali.engine.nets.config import ModelConfig
from gali.engine.nets.layers import (
    FullKernelConv2d,
    PointInputConvTranspose2d,
    SubsampledPointConv2d,
    set_layer_impl,
)
from gali.engine.nets.paper import Discriminator, Encoder, Generator, build_models
from tests.isolation import run_isolated
from tests.tolerance import assert_twins_close, smooth_activations

D_Z = 256
RES = {"svhn32": 32, "celeba64": 64}


def torch_type(m: nn.Module) -> str:
    """The torch.nn class a layer is (the engine's GEMM layers and parametrizations subclass them)."""
    return next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules"))


def convs(module: nn.Module) -> list[tuple[str, int, int, int, int, bool]]:
    """(torch type, in, out, kernel, stride, has bias) of every convolution, in order."""
    return [
        (
            torch_type(m),
            m.in_channels,
            m.out_channels,
            m.kernel_size[0],
            m.stride[0],
            m.bias is not None,
        )
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]


def linears(module: nn.Module) -> list[tuple[int, int, bool]]:
    return [(m.in_features, m.out_features, m.bias is not None) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ["svhn32", "celeba64"])
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_shapes(arch: str, width: float) -> None:
    r = RES[arch]
    g, e, d = build_models(ModelConfig(arch=arch, width=width), slot_kinds=("image", "latent"), num_classes=4)
    x = g(torch.randn(3, D_Z))
    assert x.shape == (3, 3, r, r)
    assert x.abs().max() <= 1
    mu, log_sigma = e(x)
    assert mu.shape == log_sigma.shape == (3, D_Z)
    assert d([x, mu]).shape == (3, 4)
    assert d.features([x, mu]).shape == (3, d.head.in_features)
    assert g.resolution == e.resolution == d.resolution == r
    assert g.latent_dim == e.latent_dim == D_Z


def test_svhn32_layers_match_the_paper() -> None:
    g, e, d = build_models(ModelConfig(arch="svhn32"), slot_kinds=("image", "latent"), num_classes=4)
    assert convs(g) == [
        ("ConvTranspose2d", 256, 256, 4, 1, False),
        ("ConvTranspose2d", 256, 128, 4, 2, False),
        ("ConvTranspose2d", 128, 64, 4, 1, False),
        ("ConvTranspose2d", 64, 32, 4, 2, False),
        ("ConvTranspose2d", 32, 32, 5, 1, False),
        ("Conv2d", 32, 32, 1, 1, False),
        ("Conv2d", 32, 3, 1, 1, False),
    ]
    assert [torch_type(m) for m in g.net] == ["ConvTranspose2d", "BatchNorm2d", "LeakyReLU"] * 5 + [
        "Conv2d",
        "BatchNorm2d",
        "LeakyReLU",
        "Conv2d",
    ]
    assert g.output_bias.shape == (3, 32, 32)
    assert convs(e) == [
        ("Conv2d", 3, 32, 5, 1, False),
        ("Conv2d", 32, 64, 4, 2, False),
        ("Conv2d", 64, 128, 4, 1, False),
        ("Conv2d", 128, 256, 4, 2, False),
        ("Conv2d", 256, 512, 4, 1, False),
    ]
    assert linears(e) == [(512, 512, False), (512, 512, True)]
    assert [type(m).__name__ for m in e.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)] == [
        "BatchNorm2d"
    ] * 5 + ["BatchNorm1d"]
    assert convs(d) == [
        ("Conv2d", 3, 32, 5, 1, True),
        ("Conv2d", 32, 64, 4, 2, True),
        ("Conv2d", 64, 128, 4, 1, True),
        ("Conv2d", 128, 256, 4, 2, True),
        ("Conv2d", 256, 512, 4, 1, True),
    ]
    assert linears(d) == [(256, 512, True), (512, 512, True), (1024, 1024, True), (1024, 1024, True), (1024, 4, True)]
    for net, slope in ((g, 0.01), (e, 0.01), (d, 0.01)):
        assert {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)} == {slope}


def test_celeba64_layers_match_the_paper() -> None:
    g, e, d = build_models(ModelConfig(arch="celeba64"), slot_kinds=("image", "latent"), num_classes=4)
    assert convs(g) == [
        ("ConvTranspose2d", 256, 512, 4, 1, False),
        ("ConvTranspose2d", 512, 256, 7, 2, False),
        ("ConvTranspose2d", 256, 256, 5, 2, False),
        ("ConvTranspose2d", 256, 128, 7, 2, False),
        ("ConvTranspose2d", 128, 64, 2, 1, False),
        ("Conv2d", 64, 3, 1, 1, False),
    ]
    expected_convs = [(3, 64, 2, 1), (64, 128, 7, 2), (128, 256, 5, 2), (256, 256, 7, 2), (256, 512, 4, 1)]
    assert convs(e) == [("Conv2d", *c, False) for c in expected_convs]
    assert linears(e) == [(512, 512, True)]
    assert convs(d) == [("Conv2d", *c, True) for c in expected_convs]
    assert linears(d) == [
        (256, 1024, True),
        (1024, 1024, True),
        (1536, 2048, True),
        (2048, 2048, True),
        (2048, 4, True),
    ]
    for net in (g, e, d):
        assert {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)} == {0.02}


@pytest.mark.parametrize(
    ("arch", "slot_kinds", "extra_dim", "joint_in"),
    [
        ("svhn32", ("image", "latent", "image", "latent"), None, 2048),  # GALI-8
        ("svhn32", ("image", "latent", "extra"), 3072, 1536),  # GALI-PT
        ("celeba64", ("image", "latent", "extra"), 2048, 2048),  # GALI-PT
    ],
)
def test_discriminator_variants_match_the_paper(
    arch: str, slot_kinds: tuple, extra_dim: int | None, joint_in: int
) -> None:
    d = Discriminator(arch, D_Z, slot_kinds=slot_kinds, num_classes=8, extra_dim=extra_dim)
    assert d.joint[0].in_features == joint_in
    if extra_dim is not None:
        assert linears(d.branches["extra"]) == [(extra_dim, 512, True), (512, 512, True)]
        # infer_y keeps the default slope even in the CelebA network
        assert {m.negative_slope for m in d.branches["extra"].modules() if isinstance(m, nn.LeakyReLU)} == {0.01}


def test_width_scales_hidden_layers_only() -> None:
    g, e, d = build_models(
        ModelConfig(arch="svhn32", width=0.25), slot_kinds=("image", "latent", "extra"), num_classes=5, extra_dim=7
    )
    assert [c[2] for c in convs(g)] == [64, 32, 16, 8, 8, 8, 3]
    assert convs(g)[0][1] == D_Z
    assert convs(e)[0][1] == 3
    assert linears(e)[-1] == (128, 2 * D_Z, True)
    assert linears(d.branches["latent"])[0][0] == D_Z
    assert linears(d.branches["extra"]) == [(7, 128, True), (128, 128, True)]
    assert d.head.out_features == 5
    tiny = Generator("svhn32", 8, width=0.001)
    assert [c[2] for c in convs(tiny)] == [1, 1, 1, 1, 1, 1, 3]


def test_discriminator_is_spectral_normalized_without_bn_or_dropout() -> None:
    d = Discriminator("svhn32", D_Z, slot_kinds=("image", "latent", "extra"), num_classes=4, extra_dim=10)
    layers = [m for m in d.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 5 + 2 + 2 + 2 + 1
    for m in layers:
        assert parametrize.is_parametrized(m, "weight")
        (sn,) = m.parametrizations.weight
        assert type(sn).__name__ == "_SpectralNorm"
        assert sn.n_power_iterations == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout) for m in d.modules())
    # the head's weight reads back normalized: largest singular value 1 (up to the power iteration)
    d.eval()
    assert torch.linalg.matrix_norm(d.head.weight, ord=2).item() == pytest.approx(1.0, rel=1e-2)


def test_init_matches_the_authors() -> None:
    g, e, d = build_models(ModelConfig(arch="svhn32"), slot_kinds=("image", "latent"), num_classes=4)
    weights = [
        m.weight for net in (g, e) for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    weights += [m.parametrizations.weight.original for m in d.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for w in weights:
        if w.numel() >= 10_000:
            assert w.mean().item() == pytest.approx(0.0, abs=1e-3)
            assert w.std().item() == pytest.approx(0.01, rel=0.05)
    for net in (g, e, d):
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear) and m.bias is not None:
                assert torch.all(m.bias == 0)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(g.output_bias == 0)


@pytest.mark.parametrize("arch", ["svhn32", "celeba64"])
def test_output_bias_init_gives_the_batch_mean_image(arch: str) -> None:
    r = RES[arch]
    g = Generator(arch, 16, width=0.125)
    x = torch.rand(10, 3, r, r) * 2 - 1
    x[:, 0, 0, 0] = 1.0  # a saturated pixel: the clamp keeps the bias finite
    g.init_output_bias(x)
    assert torch.isfinite(g.output_bias).all()
    mean = x.mean(dim=0)
    assert torch.allclose(torch.tanh(g.output_bias), mean.clamp(-1 + 2e-7, 1 - 2e-7), atol=1e-5)
    # with the network's contribution zeroed, G outputs the mean image for any z
    nn.init.zeros_(g.net[-1].weight)
    out = g(torch.randn(4, 16))
    assert torch.allclose(out, mean.expand_as(out), atol=1e-4)


def test_encoder_features_are_the_svm_probe_layers() -> None:
    e = Encoder("svhn32", D_Z).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = e.features(x)
    assert [f.shape[1] for f in feats] == [512, 512, 512, 4096]  # out, x3, x2, x1
    mu, log_sigma = e(x)
    assert torch.equal(feats[0], torch.cat([mu, log_sigma], dim=1))
    e64 = Encoder("celeba64", D_Z, width=0.25).eval()
    assert [f.shape[1] for f in e64.features(torch.zeros(2, 3, 64, 64))] == [512, 128, 64 * 16, 64 * 13 * 13]


def test_wrong_resolution_names_the_shapes() -> None:
    e = Encoder("svhn32", 8, width=0.125)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(2, 3, 64, 64\)"):
        e(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(2, 1, 32, 32\)"):
        e.features(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        Generator("svhn32", 8, width=0.125)(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="unknown architecture"):
        Generator("cifar32")


def _slots(d: Discriminator, n: int = 3) -> list[torch.Tensor]:
    shapes = {"image": (n, 3, d.resolution, d.resolution), "latent": (n, d.latent_dim), "extra": (n, d.extra_dim)}
    return [torch.randn(*shapes[k], requires_grad=True) for k in d.slot_kinds]


def test_discriminator_slot_order_matters() -> None:
    d = Discriminator("svhn32", 16, 0.125, slot_kinds=("image", "latent", "image", "latent"), num_classes=8)
    d.eval()  # no power iteration per call, so repeated calls see the same weights
    x1, z1, x2, z2 = _slots(d)
    base = d([x1, z1, x2, z2])
    assert not torch.allclose(base, d([x2, z1, x1, z2]))
    assert not torch.allclose(base, d([x1, z2, x2, z1]))
    # shared branches: features are [f(x1), f(z1), f(x2), f(z2)]
    parts = [d.branches["image"](x1), d.branches["latent"](z1), d.branches["image"](x2), d.branches["latent"](z2)]
    assert torch.allclose(d.features([x1, z1, x2, z2]), d.joint(torch.cat(parts, dim=1)), atol=1e-6)
    assert torch.allclose(base, d.head(d.features([x1, z1, x2, z2])))


def test_discriminator_gradient_reaches_every_slot() -> None:
    d = Discriminator("celeba64", 16, 0.125, slot_kinds=("image", "latent", "extra"), num_classes=4, extra_dim=6)
    slots = _slots(d)
    d(slots).sum().backward()
    for s in slots:
        assert s.grad is not None and s.grad.abs().sum() > 0


def test_discriminator_rejects_bad_slots() -> None:
    d = Discriminator("svhn32", 16, 0.125, slot_kinds=("image", "latent"), num_classes=2)
    x, z = _slots(d)
    with pytest.raises(ValueError, match="built for 2 slots"):
        d([x, z, z])
    with pytest.raises(ValueError, match=r"slot 1 \(latent\).*\(3, 16\).*\(3, 17\)"):
        d([x, torch.zeros(3, 17)])
    with pytest.raises(ValueError, match=r"slot 1 \(latent\).*\(3, 16\).*\(4, 16\)"):
        d([x, torch.zeros(4, 16)])
    with pytest.raises(ValueError, match=r"slot 0 \(image\).*\(3, 3, 32, 32\).*\(3, 3, 64, 64\)"):
        d([torch.zeros(3, 3, 64, 64), z])
    with pytest.raises(ValueError, match="slot_kinds"):
        Discriminator("svhn32", 16, slot_kinds=("image", "label"), num_classes=2)
    with pytest.raises(ValueError, match="extra_dim"):
        Discriminator("svhn32", 16, slot_kinds=("image", "latent", "extra"), num_classes=2)
    with pytest.raises(ValueError, match=r"slot 1 \(latent\).*\(3, 16\).*row blocks \[\(2, 16\), \(2, 16\)\]"):
        d([[x[:2], x[2:]], [torch.zeros(2, 16), torch.zeros(2, 16)]])


def _layer_pair(kind: str, layout: torch.memory_format) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A full-kernel layer as built by the models (fast) and its deep copy on the reference path, plus an input."""
    if kind == "conv":  # D's last layer: spectral norm, bias, 4×4 → 1×1
        layer = spectral_norm_layer(FullKernelConv2d(16, 24, 4, stride=1, bias=True))
        x = torch.randn(5, 16, 4, 4)
    else:  # G's first layer: bias-free, 1×1 → 4×4
        layer = PointInputConvTranspose2d(16, 24, 4, stride=1, bias=False)
        x = torch.randn(5, 16, 1, 1)
    layer.eval()  # one fixed spectral-norm weight for both paths
    layer.to(memory_format=layout)
    ref = copy.deepcopy(layer)
    set_layer_impl(ref, "ref")
    return layer, ref, x.contiguous(memory_format=layout)


def spectral_norm_layer(m: nn.Module) -> nn.Module:
    nn.init.normal_(m.weight, 0.0, 0.1)
    return torch.nn.utils.parametrizations.spectral_norm(m)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["conv", "convT"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_full_kernel_layers_match_their_reference_twin(kind: str, layout: torch.memory_format) -> None:
    layer, ref, x = _layer_pair(kind, layout)
    assert layer.impl == "fast" and ref.impl == "ref"
    x_gemm, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(x_gemm), ref(x_ref)
    reduction = 16 * 4 * 4  # fp32: only the order of each output's fan-in sum differs
    assert_twins_close(out, want, reduction=reduction)
    if kind == "convT" and layout == torch.channels_last:  # the layers after it get the layout they were set to
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    upstream = torch.randn_like(want)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert_twins_close(x_gemm.grad, x_ref.grad, reduction=reduction)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        assert_twins_close(p.grad, q.grad, reduction=reduction, msg=name)


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def subsampled_point_conv_matches_its_twin(layout: str) -> None:
    """A 1×1 stride-2 layer in its fast form and as ``nn.Conv2d``'s forward: output, layout, every gradient."""
    torch.manual_seed(0)
    layer = SubsampledPointConv2d(16, 24, 2, bias=True).to(memory_format=LAYOUTS[layout])
    ref = copy.deepcopy(layer)
    set_layer_impl(ref, "ref")
    assert layer.impl == "fast" and ref.impl == "ref"
    x = torch.randn(5, 16, 9, 9).contiguous(memory_format=LAYOUTS[layout])  # odd side: the last row is read
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(x_fast), ref(x_ref)
    assert out.shape == want.shape == (5, 24, 5, 5)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_twins_close(out, want, reduction=16)
    upstream = torch.randn_like(want)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert_twins_close(x_fast.grad, x_ref.grad, reduction=24)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        assert_twins_close(p.grad, q.grad, reduction=5 * 5 * 5, msg=name)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_subsampled_point_conv_matches_its_reference_twin(layout: str) -> None:
    run_isolated(subsampled_point_conv_matches_its_twin, layout)  # the twin is the layer that crashes on some CPUs


def test_models_use_the_gemm_layers_exactly_where_the_kernel_covers_the_input() -> None:
    for arch in ("svhn32", "celeba64"):
        g, e, d = build_models(ModelConfig(arch=arch, width=0.125), slot_kinds=("image", "latent"), num_classes=4)
        assert [isinstance(m, PointInputConvTranspose2d) for m in g.modules() if isinstance(m, nn.ConvTranspose2d)] == [
            True
        ] + [False] * 4
        for net in (e, d):
            assert [isinstance(m, FullKernelConv2d) for m in net.modules() if isinstance(m, nn.Conv2d)] == [
                False
            ] * 4 + [True]
    with pytest.raises(ValueError, match=r"layer impl must be one of \('fast', 'ref'\), got 'cuda'"):
        set_layer_impl(g, "cuda")


@pytest.mark.numerics
def test_discriminator_runs_each_branch_once_per_gradient_group() -> None:
    """Row blocks give the same features and gradients as stacked slots; real rows skip the input-gradient work."""
    d = Discriminator("svhn32", 16, 0.125, slot_kinds=("image", "latent"), num_classes=4)
    smooth_activations(d)  # gradients compared across two batchings: no kinks to round across
    d.eval()
    n = 3
    real, fake = torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32, requires_grad=True)
    prior, encoded = torch.randn(n, 16), torch.randn(n, 16, requires_grad=True)
    images, latents = [real, fake, real * 0.5, fake * 2], [encoded, prior, encoded * 3, prior]
    calls: list[tuple[int, bool]] = []
    d.branches["image"].register_forward_pre_hook(lambda _, a: calls.append((a[0].shape[0], a[0].requires_grad)))
    grouped = d.features([images, latents])
    assert calls == [(2 * n, True), (2 * n, False)]  # the fake rows in one call, the real rows in another
    stacked = d.features([torch.cat(images), torch.cat(latents)])
    assert calls[2:] == [(4 * n, True)]
    reduction = 4 * n * 32 * 32  # the most terms summed into one value: a branch weight's gradient
    assert_twins_close(grouped, stacked, reduction=reduction)
    upstream = torch.randn_like(stacked)
    wrt = [fake, encoded, *d.branches.parameters(), *d.joint.parameters()]
    want = torch.autograd.grad((stacked * upstream).sum(), wrt, retain_graph=True)  # the blocks are shared
    got = torch.autograd.grad((grouped * upstream).sum(), wrt)
    scale = max(w.abs().max().item() for w in want)
    for a, b in zip(got, want, strict=True):
        assert_twins_close(a, b, reduction=reduction, scale=scale)


def test_encoding_stats_are_mean_sigma_and_the_spread_of_mu_over_images():
    from gali.engine.nets.inference import encoding_stats

    mu = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    stats = encoding_stats(mu, torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])))
    assert stats["e_sigma"].item() == pytest.approx(3.5)
    assert stats["e_mu_spread"].item() == pytest.approx(1.0)  # std 2 over the first dimension, 0 over the second


def test_batch_norm_recalibration_replaces_the_statistics_by_their_average_on_real_data():
    from gali.engine.nets.inference import recalibrate_batch_norm

    torch.manual_seed(0)
    G, E = Generator("svhn32", 8, width=0.125), Encoder("svhn32", 8, width=0.125)
    first_bn = next(m for m in E.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.running_mean.fill_(7.0)  # statistics from elsewhere (e.g. generated images)
    weights = {k: v.clone() for k, v in E.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.rand(6, 3, 32, 32) * 2 - 1 for _ in range(3)]
    assert recalibrate_batch_norm(G, E, [(b, None) for b in batches]) == 18
    assert not E.training and not G.training and first_bn.momentum == 0.1
    # the first BN's input is the first conv's output on every image: its mean over the three batches
    with torch.no_grad():
        conv_out = torch.cat([E.convs[0][0](b) for b in batches])
    assert torch.allclose(first_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert all(torch.equal(v, E.state_dict()[k]) for k, v in weights.items())  # weights untouched
    before = first_bn.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batch_norm(G, E, [])
    assert torch.equal(first_bn.running_mean, before)  # nothing lost
