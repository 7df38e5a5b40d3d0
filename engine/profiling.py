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
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gali.engine.config import Config

_NULL = contextlib.nullcontext()
_enabled = False
_listeners: list[Callable[[str], None]] = []


def ranges_enabled() -> bool:
    return _enabled


def enable_ranges(on: bool = True) -> None:
    """Turn ranges on or off for the whole process (the training loop calls this from config)."""
    global _enabled
    if on:
        import nvtx  # noqa: F401  (fail here, at start-up, if the package is missing)
    _enabled = on


@contextlib.contextmanager
def _range(name: str) -> Iterator[None]:
    import nvtx

    for listener in _listeners:
        listener(name)
    with nvtx.annotate(name, domain="gali"), torch.profiler.record_function(name):
        yield


def annotate(name: str) -> Any:
    """A context manager marking ``name``; a shared no-op when ranges are off."""
    return _range(name) if _enabled else _NULL


@contextlib.contextmanager
def record_ranges() -> Iterator[list[str]]:
    """Test hook: turn ranges on and collect every range name entered, in order."""
    names: list[str] = []
    was_enabled = _enabled
    enable_ranges(True)
    _listeners.append(names.append)
    try:
        yield names
    finally:
        _listeners.remove(names.append)
        enable_ranges(was_enabled)


def nsys_command(preset: str, overrides: Sequence[str], output: str) -> str:
    """The Nsight Systems command line that records the same run with its NVTX ranges on a GPU machine."""
    args = " ".join(shlex.quote(o) for o in (*overrides, "compute.nvtx=true"))
    return (f"nsys profile --trace=cuda,nvtx,osrt --sample=none --cuda-graph-trace=node --output={shlex.quote(output)} "
            f"gali train --preset {shlex.quote(preset)} {args}")


def profile_training(cfg: Config, *, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg`` (a short run) with ranges on under torch.profiler; write and return ``trace.json``.

    The trace (Chrome/Perfetto format, also on CPU) lands in the run folder; open it in
    https://ui.perfetto.dev or chrome://tracing. The ``gali/*`` ranges show as labelled spans.
    """
    from gali.engine.train import train

    cfg.compute.nvtx = True
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() and cfg.run.device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        result = train(cfg, log=log)
    trace = result.run_dir / "trace.json"
    profiler.export_chrome_trace(str(trace))
    return trace
