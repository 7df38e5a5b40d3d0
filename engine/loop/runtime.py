"""Where a run executes and writes: its device, its seeds, its run folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from gali.engine.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", "got 'cuda' but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on ``keys`` alone (numpy's SeedSequence): (seed, rank), (seed, rank, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def create_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/NNNNN-name`` with the next free number (StyleGAN's convention)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.name.split("-", 1)[0].isdigit()]
    run_dir = out / f"{max(numbers, default=-1) + 1:05d}-{Path(name).stem}"
    run_dir.mkdir()
    return run_dir
