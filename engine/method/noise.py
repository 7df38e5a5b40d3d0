"""The instance-noise schedule: the std of the Gaussian noise on every image slot D sees."""

from __future__ import annotations

import torch
from torch import Tensor

from gali.engine.method.config import MethodConfig


def instance_noise_std(method: MethodConfig, epoch: int, num_epochs: int) -> float:
    """σ for a 1-based ``epoch`` of ``num_epochs``: the authors' linear decay or a constant."""
    if method.noise_schedule == "constant":
        return method.instance_noise
    return method.instance_noise * max(num_epochs - epoch, 0) / num_epochs


class InstanceNoise:
    """The schedule's σ for the current epoch: ``std`` a 0-d device tensor the step reads, ``value`` for the log.

    :meth:`at_epoch` changes both when a new epoch begins, so a CUDA graph that captured ``std`` sees the
    new σ on its next replay.
    """

    def __init__(self, method: MethodConfig, num_epochs: int, device: torch.device) -> None:
        self.method, self.num_epochs = method, num_epochs
        self.std = torch.zeros((), device=device)
        self.epoch, self.value = 0, 0.0

    def at_epoch(self, epoch: int) -> Tensor:
        """``std`` for a 1-based ``epoch`` (filled only when the epoch changes: no work per step)."""
        if epoch != self.epoch:
            self.epoch, self.value = epoch, instance_noise_std(self.method, epoch, self.num_epochs)
            self.std.fill_(self.value)
        return self.std
