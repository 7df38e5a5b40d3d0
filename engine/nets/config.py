"""The ``[model]`` section: which networks (the paper's, or BigBiGAN-class at ImageNet resolution), how big."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.config import check_choice, check_positive
from gali.engine.errors import ConfigError

# The image side each architecture's G and D work at.
ARCH_RESOLUTION = {"svhn32": 32, "celeba64": 64, "biggan128": 128, "biggan256": 256}
PAPER_ARCHS = ("svhn32", "celeba64")
ENCODER_BLOCKS = ("bottleneck", "revnet")  # the biggan archs' E: ResNet-50's bottlenecks, or RevNet's units


@dataclass
class ModelConfig:
    """Networks of docs/method.md §3 (svhn32, celeba64) or BigBiGAN-class ones (biggan128, biggan256).

    width:                scales every hidden channel count (1.0 = the paper's; for biggan archs BigGAN's
                          ch = 96 in G and D and ResNet-50's 64 base channels in E).
    attention_resolution: biggan archs: the side at which G and D apply self-attention (0 = none).
    encoder_resolution:   biggan archs: E's input side when it differs from G's and D's (BigBiGAN: 256 with
                          biggan128); 0 = the same. The data is read at E's resolution; D sees real images
                          shrunk to its own and E sees G's outputs enlarged to its own
                          (gali.engine.nets.feature_models.resize_to).
    unary_heads:          biggan archs: D also scores the image and the latent branch alone with K-way heads
                          (BigBiGAN's s_x and s_z), summed into both losses with weight 1.
    encoder_block:        biggan archs: E's blocks, "bottleneck" (ResNet-50) or "revnet" (RevNet's reversible
                          units after each stage's first block, which stays a bottleneck transition;
                          BigBiGAN found RevNet encoders better than ResNets of the same depth).
    label_classes:        biggan archs: 0 (unconditional, BigBiGAN's choice), or the number of classes of the
                          data's labels: G's blocks and D's joint MLP then take each image's label (BigGAN's
                          class conditioning; the fake rows carry the real batch's labels).
    """

    arch: str = "svhn32"
    latent_dim: int = 256
    width: float = 1.0
    attention_resolution: int = 64
    encoder_resolution: int = 0
    unary_heads: bool = False
    encoder_block: str = "bottleneck"
    label_classes: int = 0

    @property
    def resolution(self) -> int:
        """G's output and D's input side."""
        return ARCH_RESOLUTION[self.arch]

    @property
    def data_resolution(self) -> int:
        """The side images are read at: E's input side, which is at least G's."""
        return max(self.resolution, self.encoder_resolution)

    def validate(self) -> None:
        check_choice("model.arch", self.arch, tuple(ARCH_RESOLUTION))
        check_positive("model.latent_dim", self.latent_dim)
        check_positive("model.width", self.width)
        check_positive("model.attention_resolution", self.attention_resolution, allow_zero=True)
        check_positive("model.encoder_resolution", self.encoder_resolution, allow_zero=True)
        check_choice("model.encoder_block", self.encoder_block, ENCODER_BLOCKS)
        check_positive("model.label_classes", self.label_classes, allow_zero=True)
        if self.arch in PAPER_ARCHS:
            for key, value, default in (
                ("encoder_resolution", self.encoder_resolution, 0),
                ("unary_heads", self.unary_heads, False),
                ("encoder_block", self.encoder_block, "bottleneck"),
                ("label_classes", self.label_classes, 0),
            ):
                if value != default:
                    raise ConfigError(
                        f"model.{key}",
                        f"the paper's networks ({self.arch}) have no such option; "
                        "use model.arch=biggan128 or biggan256, or drop it",
                    )
        elif self.encoder_resolution and self.encoder_resolution < self.resolution:
            raise ConfigError(
                "model.encoder_resolution",
                f"got {self.encoder_resolution}, below G's and D's "
                f"{self.resolution}; E may see more pixels than D, not fewer (0 = the same)",
            )
