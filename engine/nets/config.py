"""The ``[model]`` section: which of the paper's networks, at what latent size and width."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.config import check_choice, check_positive

ARCH_RESOLUTION = {"svhn32": 32, "celeba64": 64}


@dataclass
class ModelConfig:
    """Networks of docs/method.md §3. ``width`` scales every hidden channel count (1.0 = the paper's)."""

    arch: str = "svhn32"
    latent_dim: int = 256
    width: float = 1.0

    def validate(self) -> None:
        check_choice("model.arch", self.arch, tuple(ARCH_RESOLUTION))
        check_positive("model.latent_dim", self.latent_dim)
        check_positive("model.width", self.width)
