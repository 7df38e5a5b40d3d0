"""Named, nested ranges for Nsight Systems (NVTX) and torch.profiler, off by default.

``annotate("gali/D")`` marks one phase of a step. When ranges are on (``compute.nvtx=true`` or
``gali profile``) each range is pushed as an NVTX range (the ``nvtx`` package; it costs nothing
when no profiler is attached) and as a ``torch.profiler.record_function`` label, so the same names
appear in an ``nsys`` timeline and in a torch.profiler trace. When ranges are off, ``annotate``
returns one shared null context: no allocation, no call into NVTX.

Ranges are host-side: under CUDA-graph replay only the ranges around the replay appear (the step
range sits outside it); the ranges inside the step are seen at warm-up and capture.

The names used by the engine, outermost first:

    gali/data                 the loop fetching the next batch
    gali/step                 one training step (eager, or around a graph replay)
      gali/chains             E, G, M and mask chains of the tuple spec
        gali/mask_composite   each mask/mix kernel launch
      gali/D                  D's feature trunk on all K·B rows (one call)
      gali/head               the fused K-way head kernel launch
      gali/backward_D         ∂L_D/∂θ_D
      gali/backward_GE        ∂L_GE/∂θ_GE
      gali/optim              both optimizer steps (and the GradScaler updates under fp16)
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
