"""D's pair head: K_c logits for two images concatenated on channels (adversarial cycle family, docs/method.md §2.6).

A small DCGAN-style discriminator: 4×4 stride-2 convolutions with LeakyReLU(0.2) from the (B, 6, R, R) pair down to
4×4, channels 64, 128, 256, 512, 512, ... (each scaled by ``model.width``), then one Linear to K_c logits. Like the
rest of D: the authors' init, then spectral norm (one power iteration) on every layer, no BatchNorm. It is a submodule
of D (``D.pair_head``), so its parameters join D's optimiser, checkpoint and gradient all-reduce.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from gali.engine.nets.arch import scaled
from gali.engine.nets.layers import init_weights

PAIR_WIDTHS = (64, 128, 256, 512)  # channels of the first convolutions; deeper ones keep the last
PAIR_SLOPE = 0.2


class PairHead(nn.Module):
    """(B, 3·images, R, R) -> (B, num_classes) logits; R a power of two >= 4."""

    def __init__(self, resolution: int, num_classes: int, width: float = 1.0, *, images: int = 2) -> None:
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"the pair head takes a power-of-two resolution >= 4, got {resolution}")
        if num_classes < 2:
            raise ValueError(f"the pair head needs num_classes >= 2, got {num_classes}")
        self.in_channels, self.num_classes = 3 * images, num_classes
        layers: list[nn.Module] = []
        channels, size, depth = self.in_channels, resolution, 0
        while size > 4:
            out = scaled(PAIR_WIDTHS[min(depth, len(PAIR_WIDTHS) - 1)], width)
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.LeakyReLU(PAIR_SLOPE)]
            channels, size, depth = out, size // 2, depth + 1
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * size * size, num_classes)
        init_weights(self)
        for m in list(self.modules()):
            if isinstance(m, nn.Conv2d | nn.Linear):
                spectral_norm(m, n_power_iterations=1)

    def forward(self, pairs: Tensor) -> Tensor:
        """(B, num_classes) logits of ``pairs``, the images of each tuple concatenated on channels."""
        if pairs.dim() != 4 or pairs.shape[1] != self.in_channels:
            raise ValueError(f"the pair head takes (B, {self.in_channels}, R, R) image pairs, got {tuple(pairs.shape)}")
        return self.head(self.net(pairs))
