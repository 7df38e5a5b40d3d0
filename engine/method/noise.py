"""The instance-noise schedule: the std of the Gaussian noise on every image slot D sees."""

from __future__ import annotations

from gali.engine.method.config import MethodConfig


def instance_noise_std(method: MethodConfig, epoch: int, num_epochs: int) -> float:
    """σ for a 1-based ``epoch`` of ``num_epochs``: the authors' linear decay or a constant."""
    if method.noise_schedule == "constant":
        return method.instance_noise
    return method.instance_noise * max(num_epochs - epoch, 0) / num_epochs
