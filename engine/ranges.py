"""Named, nested ranges for Nsight Systems (NVTX) and torch.profiler, off by default.

``annotate("gali/D")`` marks one phase. When on (``compute.nvtx=true`` or ``gali profile``) a range is an NVTX range
(free while no profiler is attached) and a ``torch.profiler.record_function`` label; off, ``annotate`` returns one
shared null context. Ranges are host-side: under CUDA-graph replay only those around the replay appear (the step's inner
ones show at warm-up and capture). The engine's names:

    gali/data (fetching a batch); gali/step (one step, or around a graph replay), inside it:
      gali/chains (E, G, M and mask chains; gali/mask_composite around each mask/mix launch), gali/D (D's trunk,
      all K·B rows), gali/head (the fused K-way head), gali/backward_D, gali/backward_GE, gali/optim (both optimizers)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_NULL = contextlib.nullcontext()
_enabled = False


def ranges_enabled() -> bool:
    return _enabled


def enable_ranges(on: bool = True) -> None:
    """Turn ranges on or off for the whole process (the training loop calls this from config)."""
    global _enabled
    if on:
        import nvtx  # noqa: F401  (fail here, at start-up, if the package is missing)
    _enabled = on


@contextlib.contextmanager
def ranges(on: bool) -> Iterator[None]:
    """Ranges on (or off) inside the block, and as they were after it."""
    was_enabled = _enabled
    enable_ranges(on)
    try:
        yield
    finally:
        enable_ranges(was_enabled)


@contextlib.contextmanager
def _range(name: str) -> Iterator[None]:
    import nvtx

    with nvtx.annotate(name, domain="gali"), torch.profiler.record_function(name):
        yield


def annotate(name: str) -> Any:
    """A context manager marking ``name``; a shared no-op when ranges are off."""
    return _range(name) if _enabled else _NULL
