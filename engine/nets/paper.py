"""The networks of docs/method.md §3: generator G, stochastic encoder E and the tuple discriminator D.

Each architecture is one small table (:data:`gali.engine.nets.arch.ARCH_SPECS`) read by three generic classes, so the
SVHN-32 and CelebA-64 networks differ only in their numbers; ``width`` scales the hidden widths. G: bias-free transposed
convolutions with BatchNorm and LeakyReLU, a bias-free 1×1 convolution to RGB, ``tanh(net(z) + output_bias)``. E:
bias-free Conv-BN-LReLU blocks down to 1×1 (for SVHN then a Linear-BN1d-LReLU block), then a Linear to ``2·d_z``, μ and
log σ (no clamp). D: one branch per slot kind, shared by the slots of that kind, concatenated in slot order into the
joint MLP and the K-logit ``head``; spectral norm (one power iteration) on every layer, no BatchNorm, no dropout; D(x)
has E's convolutions. Full-kernel layers are the GEMM layers of ``nets.layers``. Weights start as the authors'
``weights_init`` (N(0, 0.01²), biases 0, BatchNorm γ = 1, β = 0), in D before spectral norm is attached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from gali.engine.method.tuple_spec import EXTRA, IMAGE, LATENT
from gali.engine.nets.arch import ARCH_RESOLUTION, arch_spec, scaled
from gali.engine.nets.config import PAPER_ARCHS, ModelConfig
from gali.engine.nets.layers import branch_outputs, init_weights, make_conv
from gali.engine.nets.pair_head import PairHead

__all__ = ["Discriminator", "Encoder", "Generator", "build_models"]

SLOT_KINDS = (IMAGE, LATENT, EXTRA)
Slot = Tensor | Sequence[Tensor]  # one slot of D's tuple: a tensor, or row blocks that stack to it
# D's infer_y branch for auxiliary features (docs/method.md §3.4): the same widths and the default
# LeakyReLU slope for both architectures, even where the rest of the network uses 0.02.
EXTRA_WIDTHS = (512, 512)
EXTRA_SLOPE = 0.01


def _check_images(x: Tensor, resolution: int, who: str) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, resolution, resolution):
        raise ValueError(f"{who} takes images of shape (B, 3, {resolution}, {resolution}), got {tuple(x.shape)}")


class PaperNetwork(nn.Module):
    """What G, E and D share: their architecture's table, its image resolution and the latent size."""

    def __init__(self, arch: str, latent_dim: int) -> None:
        super().__init__()
        self.spec = arch_spec(arch)
        self.arch = arch
        self.resolution = ARCH_RESOLUTION[arch]
        self.latent_dim = latent_dim
        self.label_classes = 0  # the paper's networks are unconditional: they ignore labels


class Generator(PaperNetwork):
    """G: z (B, d_z) -> image (B, 3, R, R) in [-1, 1], ``tanh(net(z) + output_bias)``."""

    def __init__(self, arch: str = "svhn32", latent_dim: int = 256, width: float = 1.0) -> None:
        super().__init__(arch, latent_dim)
        spec = self.spec
        layers: list[nn.Module] = []
        channels, size = latent_dim, 1
        for layer in spec.generator:
            out = scaled(layer.channels, width)
            conv, size = make_conv(layer, channels, out, size, bias=False)
            layers += [conv, nn.BatchNorm2d(out), nn.LeakyReLU(spec.slope)]
            channels = out
        layers.append(nn.Conv2d(channels, 3, 1, bias=False))
        self.net = nn.Sequential(*layers)
        self.output_bias = nn.Parameter(torch.zeros(3, self.resolution, self.resolution))
        init_weights(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """G(z); ``labels`` are ignored (the same call as a class-conditional G's)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"Generator ({self.arch}) takes latents of shape (B, {self.latent_dim}), got {tuple(z.shape)}"
            )
        return torch.tanh(self.net(z[:, :, None, None]) + self.output_bias)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> Tensor:
        """Set ``output_bias`` so that G initially outputs the per-pixel mean of the batch ``x``.

        ``x`` is a batch of images in [-1, 1]. The bias becomes 0.5·logit(p), with p the batch mean
        of (x+1)/2 clamped to [1e-7, 1-1e-7]; since tanh(logit(p)/2) = 2p-1, ``tanh(output_bias)``
        is the mean image in [-1, 1] (the authors do this on the first batch of epoch 1). Returns the bias.
        """
        _check_images(x, self.resolution, f"Generator.init_output_bias ({self.arch})")
        p = ((x.float() + 1) / 2).mean(dim=0).clamp(1e-7, 1 - 1e-7)
        return self.output_bias.copy_(0.5 * torch.logit(p))


class Encoder(PaperNetwork):
    """E: image (B, 3, R, R) in [-1, 1] -> (μ, log σ), each (B, d_z).

    The stochastic encoder's sample is z = μ + exp(log σ)·ε; drawing ε is the caller's job.
    """

    def __init__(self, arch: str = "svhn32", latent_dim: int = 256, width: float = 1.0) -> None:
        super().__init__(arch, latent_dim)
        spec = self.spec
        channels, size = 3, self.resolution
        convs: list[nn.Module] = []
        for layer in spec.convs:
            out = scaled(layer.channels, width)
            conv, size = make_conv(layer, channels, out, size, bias=False)
            convs.append(nn.Sequential(conv, nn.BatchNorm2d(out), nn.LeakyReLU(spec.slope)))
            channels = out
        linears: list[nn.Module] = []
        for hidden in spec.encoder_linears:
            out = scaled(hidden, width)
            linears.append(
                nn.Sequential(nn.Linear(channels, out, bias=False), nn.BatchNorm1d(out), nn.LeakyReLU(spec.slope))
            )
            channels = out
        self.convs = nn.ModuleList(convs)
        self.linears = nn.ModuleList(linears)
        self.out = nn.Linear(channels, 2 * latent_dim)
        init_weights(self)

    def _hidden(self, x: Tensor) -> list[Tensor]:
        """Every hidden block's output (after its LeakyReLU), first to last."""
        _check_images(x, self.resolution, f"Encoder ({self.arch})")
        hidden = []
        h = x
        for block in self.convs:
            h = block(h)
            hidden.append(h)
        h = h.flatten(1)  # the convolutions end at 1×1
        for block in self.linears:
            h = block(h)
            hidden.append(h)
        return hidden

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.out(self._hidden(x)[-1].flatten(1))
        mu, log_sigma = out.chunk(2, dim=1)
        return mu, log_sigma

    def features(self, x: Tensor) -> list[Tensor]:
        """The linear-SVM probe's features (docs/method.md §4.1), each flattened to (B, n).

        ``[out, x3, x2, x1]``: the raw 2·d_z output (μ and log σ), then the last three hidden
        layers, last first. For svhn32 that is 512 + 512 + 512 + 4096 = 5632 numbers, for celeba64
        512 + 512 + 4096 + 43264 (at width 1, d_z = 256). Hidden layers are taken after their
        LeakyReLU: the authors' encoder returns the BN outputs, but the next block's
        ``LeakyReLU(inplace=True)`` overwrites them, so what it hands out is the activation.
        """
        hidden = self._hidden(x)
        out = self.out(hidden[-1].flatten(1))
        return [out, *(h.flatten(1) for h in reversed(hidden[-3:]))]


def _sn_mlp(in_features: int, widths: Sequence[int], slope: float) -> tuple[nn.Sequential, int]:
    """Linear + LeakyReLU per width (spectral norm is attached later, after the init)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_features, w), nn.LeakyReLU(slope)]
        in_features = w
    return nn.Sequential(*layers), in_features


class Discriminator(PaperNetwork):
    """D: a tuple of slots (images, latents, auxiliary features) -> K logits.

    ``slot_kinds`` fixes the tuple layout, e.g. ``('image', 'latent')`` for ALI/GALI-4,
    ``('image', 'latent', 'image', 'latent')`` for GALI-8 and ``('image', 'latent', 'extra')``
    for GALI-PT. Slots are (N, 3, R, R) images, (N, d_z) latents or (N, extra_dim) features. Every
    slot of one kind goes through the same branch (in one call, stacked along the batch); the
    branch outputs are concatenated in slot order, so the joint MLP's input width follows from
    the slots (docs/method.md §3.4). Branches of kinds that no slot uses are not built.

    ``features(slots)`` is everything before the last Linear; ``head`` is that Linear (F -> K),
    so ``forward(slots) == head(features(slots))``. Under the spectral-norm parametrization
    ``head.weight`` is the normalized weight; in training mode each read of it runs one power
    iteration (so read it once per step, or inside ``torch.nn.utils.parametrize.cached()``).
    """

    def __init__(
        self,
        arch: str = "svhn32",
        latent_dim: int = 256,
        width: float = 1.0,
        *,
        slot_kinds: Sequence[str],
        num_classes: int,
        extra_dim: int | None = None,
    ) -> None:
        super().__init__(arch, latent_dim)
        spec = self.spec
        slot_kinds = tuple(slot_kinds)
        if not slot_kinds or any(k not in SLOT_KINDS for k in slot_kinds):
            raise ValueError(f"slot_kinds must be a non-empty sequence of {', '.join(SLOT_KINDS)}; got {slot_kinds!r}")
        if "extra" in slot_kinds and (extra_dim is None or extra_dim < 1):
            raise ValueError(f"an 'extra' slot needs extra_dim >= 1 (the feature width); got {extra_dim!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.slot_kinds = slot_kinds
        self.num_classes = num_classes
        self.extra_dim = extra_dim if "extra" in slot_kinds else None

        branches: dict[str, nn.Module] = {}
        branch_width: dict[str, int] = {}
        if "image" in slot_kinds:
            layers: list[nn.Module] = []
            channels, size = 3, self.resolution
            for layer in spec.convs:
                out = scaled(layer.channels, width)
                conv, size = make_conv(layer, channels, out, size, bias=True)
                layers += [conv, nn.LeakyReLU(spec.slope)]
                channels = out
            branches["image"], branch_width["image"] = nn.Sequential(*layers, nn.Flatten()), channels
        if "latent" in slot_kinds:
            widths = [scaled(w, width) for w in spec.latent_widths]
            branches["latent"], branch_width["latent"] = _sn_mlp(latent_dim, widths, spec.slope)
        if self.extra_dim is not None:
            widths = [scaled(w, width) for w in EXTRA_WIDTHS]
            branches["extra"], branch_width["extra"] = _sn_mlp(self.extra_dim, widths, EXTRA_SLOPE)
        self.branches = nn.ModuleDict(branches)
        joint_in = sum(branch_width[k] for k in slot_kinds)
        self.joint, features = _sn_mlp(joint_in, [scaled(w, width) for w in spec.joint_widths], spec.slope)
        self.head = nn.Linear(features, num_classes)

        init_weights(self)
        for m in list(self.modules()):
            if isinstance(m, nn.Conv2d | nn.Linear):
                spectral_norm(m, n_power_iterations=1)

    def _check_slots(self, blocks: Sequence[Sequence[Tensor]]) -> None:
        if len(blocks) != len(self.slot_kinds):
            raise ValueError(
                f"Discriminator was built for {len(self.slot_kinds)} slots {self.slot_kinds}, got {len(blocks)}"
            )
        rows = sum(b.shape[0] for b in blocks[0])
        for i, (kind, slot) in enumerate(zip(self.slot_kinds, blocks, strict=True)):
            expected = {
                "image": (3, self.resolution, self.resolution),
                "latent": (self.latent_dim,),
                "extra": (self.extra_dim,),
            }[kind]
            got = [tuple(b.shape) for b in slot]
            if any(shape[1:] != expected for shape in got) or sum(shape[0] for shape in got) != rows:
                raise ValueError(
                    f"Discriminator ({self.arch}) slot {i} ({kind}) must have shape {(rows, *expected)} "
                    f"(N={rows} from slot 0), got {got[0] if len(got) == 1 else f'row blocks {got}'}"
                )

    def features(self, slots: Sequence[Slot], labels: Tensor | None = None) -> Tensor:
        """(N, F): the joint MLP's output, i.e. the input of ``head``; ``labels`` are ignored (unconditional).

        A slot is one (N, ...) tensor or a sequence of row blocks that stack to it (the step passes
        one block per tuple class); the branches run grouped by gradient (:func:`branch_outputs`).
        """
        blocks = [list(s) if isinstance(s, list | tuple) else [s] for s in slots]
        self._check_slots(blocks)
        parts = branch_outputs(lambda kind, x: self.branches[kind](x), self.slot_kinds, blocks)
        return self.joint(torch.cat(parts, dim=1))

    def forward(self, slots: Sequence[Slot]) -> Tensor:
        """(N, K) logits."""
        return self.head(self.features(slots))

    def head_weight(self) -> tuple[Tensor, Tensor, int]:
        """(weight (K, F), bias (K,), 1): the one K-way head over :meth:`features` (the step's interface)."""
        return self.head.weight, self.head.bias, 1


def build_models(
    cfg: ModelConfig,
    *,
    slot_kinds: Sequence[str],
    num_classes: int,
    extra_dim: int | None = None,
    pair_classes: int = 0,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """G, E and D for ``cfg``, D laid out for the tuple spec's slots: the paper's networks, or for the
    biggan archs those of :mod:`gali.engine.nets.biggan`. ``pair_classes`` = K_c > 0 (a spec's cycle classes) gives
    D a pair head, ``D.pair_head`` (:class:`gali.engine.nets.pair_head.PairHead`)."""
    G, E, D = _build_models(cfg, slot_kinds=slot_kinds, num_classes=num_classes, extra_dim=extra_dim)
    if pair_classes:
        D.pair_head = PairHead(cfg.resolution, pair_classes, cfg.width)
    return G, E, D


def _build_models(
    cfg: ModelConfig, *, slot_kinds: Sequence[str], num_classes: int, extra_dim: int | None
) -> tuple[nn.Module, nn.Module, nn.Module]:
    if cfg.arch not in PAPER_ARCHS:
        from gali.engine.nets import biggan

        return (
            biggan.BigGANGenerator(
                cfg.resolution, cfg.latent_dim, cfg.width, cfg.attention_resolution, cfg.label_classes
            ),
            biggan.ResNetEncoder(cfg.data_resolution, cfg.latent_dim, cfg.width, block=cfg.encoder_block),
            biggan.BigBiGANDiscriminator(
                cfg.resolution,
                cfg.latent_dim,
                cfg.width,
                slot_kinds=slot_kinds,
                num_classes=num_classes,
                extra_dim=extra_dim,
                attention_resolution=cfg.attention_resolution,
                unary_heads=cfg.unary_heads,
                label_classes=cfg.label_classes,
            ),
        )
    generator = Generator(cfg.arch, cfg.latent_dim, cfg.width)
    encoder = Encoder(cfg.arch, cfg.latent_dim, cfg.width)
    discriminator = Discriminator(
        cfg.arch,
        cfg.latent_dim,
        cfg.width,
        slot_kinds=slot_kinds,
        num_classes=num_classes,
        extra_dim=extra_dim,
    )
    return generator, encoder, discriminator
