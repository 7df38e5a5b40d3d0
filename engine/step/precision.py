"""Mixed precision for the step: which autocast dtype, and fp32 where it matters.

``compute.precision`` resolves to fp32, bf16 or fp16. Under bf16/fp16 the chains and D's trunk run in torch.autocast;
three things stay fp32 on purpose:
* spectral norm: the power iterations and σ are computed once per step before autocast is entered, and the normalised
  weights reused from ``parametrize.cached()`` (autocast would run ``torch.mv`` in bf16, and each read iterate again);
* the losses: the K-way head accumulates in fp32 and returns fp32 losses;
* the optimizer state (the parameters are fp32; autocast only casts activations).
fp16 adds one ``torch.amp.GradScaler`` per side (D, G/E); the step counts skipped updates on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from gali.engine.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: 'fp32', 'bf16' or 'fp16', for one device type."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def uses_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of the forward pass (disabled for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.name != "fp32")


def resolve_precision(name: str, device: torch.device) -> Precision:
    """'auto' -> bf16 on a CUDA device that supports it, else fp32; explicit names are checked."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return Precision("bf16" if bf16 else "fp32", device.type)
    if name not in _DTYPES:
        raise ConfigError("compute.precision", f"got {name!r}; accepted: auto, {', '.join(_DTYPES)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("compute.precision", "got 'bf16' but this GPU has no bf16 support; use fp16 or fp32")
    return Precision(name, device.type)


@contextlib.contextmanager
def fp32_spectral_norm(module: nn.Module, device_type: str) -> Iterator[None]:
    """Inside: every parametrized weight of ``module`` is computed once, in fp32, and reused.

    Entering runs each spectral-norm power iteration with autocast disabled; the cached weights
    (still differentiable) are what every later read inside the block returns.
    """
    with parametrize.cached():
        with torch.autocast(device_type, enabled=False):
            for sub in module.modules():
                if parametrize.is_parametrized(sub, "weight"):
                    sub.weight  # noqa: B018  (the read fills the cache)
        yield
