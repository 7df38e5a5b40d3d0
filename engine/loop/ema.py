"""Exponential moving averages of G's and E's weights (``run.ema_kimg``), kept as StyleGAN2-ADA and EDM2 keep them.

After every step ``p_ema ← β·p_ema + (1 − β)·p`` with ``β = 0.5 ** (batch / half_life)``: a weight's influence halves
every ``half_life`` images, ``run.ema_kimg`` thousand, or with ``run.ema_rampup`` = r > 0 at most r × the images seen so
far. Before ``run.ema_start_kimg`` the average is the live weights (β = 0). Buffers (BatchNorm statistics) are copied,
not averaged; snapshots recompute them on real images (``run.ema_bn_batches``) before they measure, draw and save the
averages. The averaged G and E draw the snapshots' grids and held-out metrics, are what ``gali eval``, ``gali sample``
and ``gali reconstruct`` load by default, and live in the checkpoint as ``G_ema`` and ``E_ema``, resumed exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from gali.engine.nets.networks import Networks

AVERAGED = ("G", "E")  # the networks averaged, by their attribute names in Networks


class WeightAverage:
    """The averaged copies of G and E, updated after every step; ``G``/``E`` are the averaged networks."""

    def __init__(self, nets: Networks, *, ema_kimg: float, rampup: float, start_kimg: float) -> None:
        self.half_life = ema_kimg * 1000
        self.rampup = rampup
        self.start = start_kimg * 1000
        self.live = {name: getattr(nets, name) for name in AVERAGED}
        self.averaged = {name: copy.deepcopy(net).requires_grad_(False) for name, net in self.live.items()}
        # flat lists over both networks, built once, for one foreach call each per update: the step updates the live
        # networks' tensors in place (as its optimizers hold them), and load_state_dict copies into these tensors
        self._mine = [p for net in self.averaged.values() for p in net.parameters()]
        self._theirs = [p for net in self.live.values() for p in net.parameters()]
        self._mine_buffers = [b for net in self.averaged.values() for b in net.buffers()]
        self._their_buffers = [b for net in self.live.values() for b in net.buffers()]

    @property
    def G(self) -> nn.Module:
        return self.averaged["G"]

    @property
    def E(self) -> nn.Module:
        return self.averaged["E"]

    def beta(self, images_seen: int, batch_size: int) -> float:
        """The decay of the step that brought the count to ``images_seen``."""
        if images_seen <= self.start:
            return 0.0
        half_life = min(self.half_life, images_seen * self.rampup) if self.rampup else self.half_life
        return 0.5 ** (batch_size / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, images_seen: int, batch_size: int) -> None:
        """Move the averages toward the live weights and copy the buffers: one foreach lerp and one foreach copy."""
        torch._foreach_lerp_(self._mine, self._theirs, 1.0 - self.beta(images_seen, batch_size))
        if self._mine_buffers:
            torch._foreach_copy_(self._mine_buffers, self._their_buffers)

    def state_dict(self) -> dict[str, Any]:
        return {f"{name}_ema": net.state_dict() for name, net in self.averaged.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The averages a checkpoint holds; one written without them starts them from the live weights."""
        for name, net in self.averaged.items():
            net.load_state_dict(state.get(f"{name}_ema", self.live[name].state_dict()))

    def restart(self) -> None:
        """The averages become the live weights (the loop's first step, after G's output bias is set)."""
        self.load_state_dict({})
