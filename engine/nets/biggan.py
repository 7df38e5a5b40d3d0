"""BigBiGAN-class networks for ImageNet resolution: a BigGAN generator, a ResNet-50 encoder, a joint discriminator.

Same slot interface as :mod:`gali.engine.nets.paper`. ``width`` scales every channel count (1.0: BigGAN's ch = 96 for G
and D, ResNet-50's 64 for E; never below 2). G is BigGAN's (hierarchical latent; class-conditional when
``label_classes`` > 0). E is ResNet-50 v1, or RevNet units with ``block="revnet"`` (plain autograd, no memory-saving
backward); it resizes any image to its own resolution. D is BigGAN's D trunk, a latent MLP and a joint MLP under the
K-way head, fed images at ``D.resolution`` by the step; ``unary_heads`` adds x-only and z-only heads as one grouped head
(``kernels.kway_head_grouped``), the three losses summed unweighted. Labels condition D's joint features, not a per-row
projection. ``activation_checkpointing`` recomputes residual blocks in the backward with the step's spectral-norm
weights (same gradients); BatchNorm running statistics are updated a second time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

from gali.engine.method.tuple_spec import EXTRA, IMAGE, LATENT
from gali.engine.nets.arch import scaled
from gali.engine.nets.config import ENCODER_BLOCKS
from gali.engine.nets.feature_models import resize_to
from gali.engine.nets.layers import SubsampledPointConv2d, branch_outputs

BIGGAN_CH = 96  # BigGAN's base channel count at width 1
SHARED_DIM = 128  # BigGAN's shared class embedding, joined to every G block's z chunk
RESNET_CH = 64  # ResNet-50's stem width at width 1
RESNET_STAGES = (3, 4, 6, 3)
MLP_WIDTH, MLP_RESIDUAL_LAYERS = 2048, 3  # D's latent branch and joint MLP: Linear + 3 residual layers
EXTRA_WIDTH = 512

# BigGAN-PyTorch's G_arch / D_arch: (in, out) channel multiples of ch per block, and each block's output side.
G_ARCH = {
    128: ((16, 16), (16, 8), (8, 4), (4, 2), (2, 1)),
    256: ((16, 16), (16, 8), (8, 8), (8, 4), (4, 2), (2, 1)),
}
D_ARCH = {  # (in, out, downsample); in = 0 is the RGB input
    128: ((0, 1, True), (1, 2, True), (2, 4, True), (4, 8, True), (8, 16, True), (16, 16, False)),
    256: ((0, 1, True), (1, 2, True), (2, 4, True), (4, 8, True), (8, 8, True), (8, 16, True), (16, 16, False)),
}
BIGGAN_RESOLUTIONS = tuple(G_ARCH)


def _channels(base: int, width: float) -> int:
    """A scaled channel count, at least 2: in channels-last, a 1-channel activation crashed torch 2.13's CPU
    kernels (a double free in the ResNet stem at width 0.02, measured on the development machine)."""
    return max(2, scaled(base, width))


def _check_resolution(resolution: int, who: str) -> None:
    if resolution not in BIGGAN_RESOLUTIONS:
        raise ValueError(f"{who} is built for {', '.join(map(str, BIGGAN_RESOLUTIONS))}² images; got {resolution}")


def _init(module: nn.Module) -> None:
    """BigGAN's init: orthogonal weights, zero biases; BatchNorm γ = 1, β = 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding):
            nn.init.orthogonal_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _spectral_norm_all(module: nn.Module) -> None:
    for m in list(module.modules()):
        if isinstance(m, nn.Conv2d | nn.Linear):
            spectral_norm(m, n_power_iterations=1)


def check_labels(labels: Tensor | None, label_classes: int, rows: int, who: str) -> None:
    """A class-conditional network needs one int64 label per row; an unconditional one ignores labels."""
    if not label_classes:
        return
    if labels is None or labels.shape != (rows,) or labels.dtype != torch.int64:
        got = "none" if labels is None else f"{tuple(labels.shape)} {labels.dtype}"
        raise ValueError(
            f"{who} is class-conditional (model.label_classes={label_classes}): it needs int64 labels "
            f"of shape ({rows},), got {got}; the data must have labels"
        )


class CheckpointedBlock(nn.Module):
    """A residual block that recomputes its forward in the backward when ``checkpointing`` is on (training only)."""

    checkpointing = False

    def forward(self, *inputs: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *inputs, use_reentrant=False)
        return self.block(*inputs)

    def block(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError


def set_activation_checkpointing(net: nn.Module, on: bool) -> int:
    """Turn recomputation of ``net``'s residual blocks on or off; returns how many blocks it has."""
    blocks = [m for m in net.modules() if isinstance(m, CheckpointedBlock)]
    for block in blocks:
        block.checkpointing = on
    return len(blocks)


class SelfAttention(nn.Module):
    """SAGAN self-attention (BigGAN's): θ, φ at C/8 and g at C/2 channels, φ and g max-pooled 2×, gain γ from 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(channels, max(1, channels // 8), 1, bias=False)
        self.phi = nn.Conv2d(channels, max(1, channels // 8), 1, bias=False)
        self.g = nn.Conv2d(channels, max(1, channels // 2), 1, bias=False)
        self.out = nn.Conv2d(max(1, channels // 2), channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (B, C/8, HW)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (B, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # (B, C/2, HW/4)
        attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (B, HW, HW/4)
        o = (g @ attention.transpose(1, 2)).view(b, -1, h, w)
        return x + self.gamma * self.out(o)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then gain 1 + Linear(y) and bias Linear(y) per channel."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(cond_dim, channels, bias=False)
        self.bias = nn.Linear(cond_dim, channels, bias=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.norm(x) * (1 + self.gain(y)[:, :, None, None]) + self.bias(y)[:, :, None, None]


class GeneratorBlock(CheckpointedBlock):
    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(c_in, cond_dim), ConditionalBatchNorm(c_out, cond_dim)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def block(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2.0)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2.0))


class BigGANGenerator(nn.Module):
    """G: z (B, d_z) -> image (B, 3, R, R) in [-1, 1], R = 128 or 256; d_z splits into len(blocks) + 1 chunks."""

    def __init__(
        self,
        resolution: int = 128,
        latent_dim: int = 120,
        width: float = 1.0,
        attention_resolution: int = 64,
        label_classes: int = 0,
    ) -> None:
        super().__init__()
        _check_resolution(resolution, "BigGANGenerator")
        arch = G_ARCH[resolution]
        if latent_dim % (len(arch) + 1):
            raise ValueError(
                f"BigGANGenerator at {resolution}² splits z into {len(arch) + 1} equal chunks; "
                f"latent_dim {latent_dim} is not a multiple of {len(arch) + 1} (BigGAN: 120 at 128², "
                "140 at 256²)"
            )
        self.resolution, self.latent_dim, self.label_classes = resolution, latent_dim, label_classes
        self.chunk = latent_dim // (len(arch) + 1)
        self.shared = nn.Embedding(label_classes, SHARED_DIM) if label_classes else None
        cond_dim = self.chunk + (SHARED_DIM if label_classes else 0)
        ch = _channels(BIGGAN_CH, width)
        self.first_channels = arch[0][0] * ch
        self.linear = nn.Linear(self.chunk, 4 * 4 * self.first_channels)
        blocks: list[nn.Module] = []
        side = 4
        for c_in, c_out in arch:
            side *= 2
            blocks.append(GeneratorBlock(c_in * ch, c_out * ch, cond_dim))
            if side == attention_resolution:
                blocks.append(SelfAttention(c_out * ch))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.BatchNorm2d(ch)
        self.out_conv = nn.Conv2d(ch, 3, 3, padding=1)
        self.output_bias = nn.Parameter(torch.zeros(3, resolution, resolution))
        _init(self)
        _spectral_norm_all(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """G(z), or G(z, y) when class-conditional (``labels``: int64 (B,))."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"BigGANGenerator takes latents of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        check_labels(labels, self.label_classes, z.shape[0], "BigGANGenerator")
        chunks = z.split(self.chunk, dim=1)
        h = self.linear(chunks[0]).view(z.shape[0], self.first_channels, 4, 4)
        if self.shared is not None:
            embedding = self.shared(labels)
            chunks = (chunks[0], *(torch.cat((chunk, embedding), dim=1) for chunk in chunks[1:]))
        conditions = iter(chunks[1:])
        for block in self.blocks:
            h = block(h, next(conditions)) if isinstance(block, GeneratorBlock) else block(h)
        return torch.tanh(self.out_conv(F.relu(self.out_norm(h))) + self.output_bias)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> Tensor:
        """``output_bias`` = 0.5·logit(mean image of ``x``), x resized to G's resolution: G starts at the mean image."""
        p = ((resize_to(x.float(), self.resolution) + 1) / 2).mean(dim=0).clamp(1e-7, 1 - 1e-7)
        return self.output_bias.copy_(0.5 * torch.logit(p))


class Bottleneck(CheckpointedBlock):
    """ResNet-50's bottleneck: 1×1 → 3×3 (stride) → 1×1 (×4), BatchNorm and ReLU, projection shortcut when needed."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Sequential(SubsampledPointConv2d(c_in, c_out, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def block(self, x: Tensor) -> Tensor:
        return F.relu(self.convs(x) + self.shortcut(x))


def _preactivation_bottleneck(channels: int, width: int) -> nn.Sequential:
    """BN → ReLU → 1×1 → BN → ReLU → 3×3 → BN → ReLU → 1×1, channels → width → width → channels (ResNet v2's)."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, channels, 1, bias=False),
    )


class ReversibleBlock(CheckpointedBlock):
    """RevNet's reversible unit: the channels split into halves (x1, x2), y1 = x1 + F(x2), y2 = x2 + G(y1).

    F and G are the bottleneck's shape at half the channels, pre-activation (``channels/2 → width/2 → width/2 →
    channels/2``, the inner width at least 2 as :func:`_channels`), so each unit has about half a bottleneck's
    parameters; no ReLU follows the sums, which keeps the unit invertible (:meth:`inverse`).
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.f = _preactivation_bottleneck(channels // 2, max(2, width // 2))
        self.g = _preactivation_bottleneck(channels // 2, max(2, width // 2))

    def block(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        return torch.cat((y1, x2 + self.g(y1)), dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """The unit's input from its output: x2 = y2 − G(y1), x1 = y1 − F(x2); exact up to rounding while F's and
        G's BatchNorms normalise as they did in the forward (eval mode, or training mode on the same batch)."""
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        return torch.cat((y1 - self.f(x2), x2), dim=1)


class ResNetEncoder(nn.Module):
    """E: image in [-1, 1] (any square size: resized to E's ``resolution``) -> (μ, log σ), each (B, d_z).

    ``block``: ``"bottleneck"`` (ResNet-50) or ``"revnet"`` (reversible units after each stage's first block).
    """

    def __init__(
        self, resolution: int = 128, latent_dim: int = 120, width: float = 1.0, *, block: str = "bottleneck"
    ) -> None:
        super().__init__()
        if resolution < 32:
            raise ValueError(f"ResNetEncoder needs images of at least 32²; got {resolution}")
        if block not in ENCODER_BLOCKS:
            raise ValueError(f"ResNetEncoder's block is one of {', '.join(ENCODER_BLOCKS)}; got {block!r}")
        self.resolution, self.latent_dim = resolution, latent_dim
        base = _channels(RESNET_CH, width)
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        c_in = base
        for stage, depth in enumerate(RESNET_STAGES):
            width_stage = base * 2**stage
            for i in range(depth):
                if block == "revnet" and i > 0:
                    blocks.append(ReversibleBlock(c_in, width_stage))
                else:
                    blocks.append(Bottleneck(c_in, width_stage, stride=2 if i == 0 and stage > 0 else 1))
                c_in = 4 * width_stage
        if block == "revnet":  # the last units' sums are not normalised: ResNet v2's and RevNet's final BN → ReLU
            blocks += [nn.BatchNorm2d(c_in), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(c_in, 2 * latent_dim)
        _init(self)

    def _pooled(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"ResNetEncoder takes square RGB images (B, 3, R, R), got {tuple(x.shape)}")
        return self.blocks(self.stem(resize_to(x, self.resolution))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.out(self._pooled(x)).chunk(2, dim=1)
        return mu, log_sigma

    def features(self, x: Tensor) -> list[Tensor]:
        """The linear probe's features: [out (μ, log σ), the pooled trunk features]."""
        pooled = self._pooled(x)
        return [self.out(pooled), pooled]


class DiscriminatorBlock(CheckpointedBlock):
    """BigGAN's D block: (ReLU →) 3×3 conv → ReLU → 3×3 conv (→ avg-pool), plus a 1×1 shortcut (the first block
    has no leading ReLU and pools before its shortcut, as BigGAN's)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool) -> None:
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out or downsample else None

    def block(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        shortcut = x
        if self.first:
            shortcut = self.skip(F.avg_pool2d(x, 2) if self.downsample else x)
        elif self.skip is not None:
            shortcut = self.skip(x)
            if self.downsample:
                shortcut = F.avg_pool2d(shortcut, 2)
        return h + shortcut


class ResidualMLP(nn.Module):
    """Linear(in → width) then ``layers`` residual layers h + ReLU(Linear(h)) (BigBiGAN's MLP with skips)."""

    def __init__(self, in_features: int, width: int, layers: int) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.first(x))
        for layer in self.layers:
            h = h + F.relu(layer(h))
        return h


class BigBiGANDiscriminator(nn.Module):
    """D: a tuple of slots (images at D's resolution, latents, auxiliary features) -> K logits (joint head).

    Slots, grouping of rows by gradient and ``features``/``head`` as in the paper's
    :class:`gali.engine.nets.paper.Discriminator`; with ``unary_heads``, ``features`` returns
    ``[h_x, h_z, h_joint]`` concatenated and :meth:`head_weight` the three heads as one grouped head.
    """

    def __init__(
        self,
        resolution: int = 128,
        latent_dim: int = 120,
        width: float = 1.0,
        *,
        slot_kinds: Sequence[str],
        num_classes: int,
        extra_dim: int | None = None,
        attention_resolution: int = 64,
        unary_heads: bool = False,
        label_classes: int = 0,
    ) -> None:
        super().__init__()
        _check_resolution(resolution, "BigBiGANDiscriminator")
        slot_kinds = tuple(slot_kinds)
        if not slot_kinds or any(k not in (IMAGE, LATENT, EXTRA) for k in slot_kinds):
            raise ValueError(f"slot_kinds must be a non-empty sequence of image, latent, extra; got {slot_kinds!r}")
        if EXTRA in slot_kinds and (extra_dim is None or extra_dim < 1):
            raise ValueError(f"an 'extra' slot needs extra_dim >= 1 (the feature width); got {extra_dim!r}")
        if unary_heads and not (IMAGE in slot_kinds and LATENT in slot_kinds):
            raise ValueError("unary heads score the image and the latent branch alone: the tuples need both kinds")
        self.resolution, self.latent_dim, self.num_classes = resolution, latent_dim, num_classes
        self.slot_kinds, self.extra_dim = slot_kinds, extra_dim if EXTRA in slot_kinds else None
        self.unary_heads, self.label_classes = unary_heads, label_classes
        ch = _channels(BIGGAN_CH, width)
        mlp = scaled(MLP_WIDTH, width)
        branches: dict[str, nn.Module] = {}
        widths: dict[str, int] = {}
        if IMAGE in slot_kinds:
            layers: list[nn.Module] = []
            side = resolution
            for i, (c_in, c_out, down) in enumerate(D_ARCH[resolution]):
                layers.append(DiscriminatorBlock(c_in * ch or 3, c_out * ch, down, first=i == 0))
                side //= 2 if down else 1
                if side == attention_resolution:
                    layers.append(SelfAttention(c_out * ch))
            branches[IMAGE], widths[IMAGE] = nn.Sequential(*layers), D_ARCH[resolution][-1][1] * ch
        if LATENT in slot_kinds:
            branches[LATENT] = ResidualMLP(latent_dim, mlp, MLP_RESIDUAL_LAYERS)
            widths[LATENT] = mlp
        if self.extra_dim is not None:
            branches[EXTRA] = ResidualMLP(self.extra_dim, scaled(EXTRA_WIDTH, width), 1)
            widths[EXTRA] = scaled(EXTRA_WIDTH, width)
        self.branches = nn.ModuleDict(branches)
        self.label_embedding = nn.Linear(label_classes, mlp, bias=False) if label_classes else None  # one-hot in
        self.joint = ResidualMLP(
            sum(widths[k] for k in slot_kinds) + (mlp if label_classes else 0), mlp, MLP_RESIDUAL_LAYERS
        )
        self.head = nn.Linear(mlp, num_classes)
        if unary_heads:
            self.unary_image = nn.Linear(widths[IMAGE] * slot_kinds.count(IMAGE), num_classes)
            self.unary_latent = nn.Linear(widths[LATENT] * slot_kinds.count(LATENT), num_classes)
        _init(self)
        _spectral_norm_all(self)

    def _branch(self, kind: str, x: Tensor) -> Tensor:
        if kind == IMAGE:
            if tuple(x.shape[1:]) != (3, self.resolution, self.resolution):
                raise ValueError(
                    f"BigBiGANDiscriminator takes images of shape (N, 3, {self.resolution}, "
                    f"{self.resolution}) in its image slots, got {tuple(x.shape)}"
                )
            return F.relu(self.branches[IMAGE](x)).sum(dim=(2, 3))  # BigGAN's sum pool
        return self.branches[kind](x)

    def features(self, slots: Sequence[Tensor | Sequence[Tensor]], labels: Tensor | None = None) -> Tensor:
        """(N, F): the joint MLP's output, or [h_x, h_z, h_joint] with unary heads; rows grouped by gradient.

        ``labels`` (class-conditional D only): int64 (B,), the labels of one row block, the same for every
        block of a slot (the step's K classes of one batch).
        """
        blocks = [list(s) if isinstance(s, list | tuple) else [s] for s in slots]
        if len(blocks) != len(self.slot_kinds):
            raise ValueError(
                f"BigBiGANDiscriminator was built for {len(self.slot_kinds)} slots {self.slot_kinds}, got {len(blocks)}"
            )
        check_labels(labels, self.label_classes, blocks[0][0].shape[0], "BigBiGANDiscriminator")
        parts = branch_outputs(self._branch, self.slot_kinds, blocks)
        joint_in = parts
        if self.label_embedding is not None:
            one_hot = F.one_hot(labels, self.label_classes).to(parts[0].dtype).repeat(len(blocks[0]), 1)
            joint_in = [*parts, self.label_embedding(one_hot)]
        joint = self.joint(torch.cat(joint_in, dim=1))
        if not self.unary_heads:
            return joint
        images = torch.cat([p for p, k in zip(parts, self.slot_kinds, strict=True) if k == IMAGE], dim=1)
        latents = torch.cat([p for p, k in zip(parts, self.slot_kinds, strict=True) if k == LATENT], dim=1)
        return torch.cat([images, latents, joint], dim=1)

    def head_weight(self) -> tuple[Tensor, Tensor, int]:
        """(weight (G·K, F), bias (G·K,), G): the head(s) over :meth:`features`, G = 3 with unary heads, else 1."""
        if not self.unary_heads:
            return self.head.weight, self.head.bias, 1
        heads = (self.unary_image, self.unary_latent, self.head)
        return (torch.block_diag(*(h.weight for h in heads)), torch.cat([h.bias for h in heads]), len(heads))

    def forward(self, slots: Sequence[Tensor | Sequence[Tensor]], labels: Tensor | None = None) -> Tensor:
        """(N, G·K) logits: the joint head's K, after the unary heads' with ``unary_heads``."""
        weight, bias, _ = self.head_weight()
        return F.linear(self.features(slots, labels), weight, bias)
