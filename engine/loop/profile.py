"""``gali profile``: a short training run with the NVTX ranges on, under torch.profiler."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gali.engine.loop.config import Config
from gali.engine.loop.train import train


def nsys_command(preset: str, overrides: Sequence[str], output: str) -> str:
    """The Nsight Systems command line that records the same run with its NVTX ranges on a GPU machine."""
    args = " ".join(shlex.quote(o) for o in (*overrides, "compute.nvtx=true"))
    return (
        f"nsys profile --trace=cuda,nvtx,osrt --sample=none --cuda-graph-trace=node --output={shlex.quote(output)} "
        f"gali train --preset {shlex.quote(preset)} {args}"
    )


def profile_training(cfg: Config, *, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg`` (a short run) with ranges on under torch.profiler; write and return ``trace.json``.

    The trace (Chrome/Perfetto format, also on CPU) lands in the run folder; open it in
    https://ui.perfetto.dev or chrome://tracing. The ``gali/*`` ranges show as labelled spans.
    """
    cfg.compute.nvtx = True
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() and cfg.run.device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        result = train(cfg, log=log)
    trace = result.run_dir / "trace.json"
    profiler.export_chrome_trace(str(trace))
    return trace
