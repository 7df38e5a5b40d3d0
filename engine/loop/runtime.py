"""Where a run executes and writes: its device, its seeds, its run folder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gali.engine.errors import ConfigError, GaliError

if TYPE_CHECKING:
    from gali.engine.loop.config import Config


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
    """``out_dir/NNNNN-name`` with the next free number (StyleGAN's convention).

    Runs that start together (a job array) race for that number: the losers of a ``mkdir`` look again and take
    the next one, so each run gets a folder of its own.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tries = 1000
    number = -1
    for _ in range(tries):
        taken = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.name.split("-", 1)[0].isdigit()]
        number = max([number, *taken]) + 1
        run_dir = out / f"{number:05d}-{Path(name).stem}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise GaliError(
        f"no new run folder in {out}: {tries} numbers in a row were taken by runs starting at the same time; "
        "start again"
    )


def check_kernel_impl(cfg: Config) -> None:
    """compute.kernel_impl=triton where Triton cannot run: refused before any work (no run folder is made), for a new
    run, a resume and a restart alike."""
    if cfg.compute.kernel_impl != "triton":
        return
    from gali.kernels import _launch

    device = resolve_device(cfg.run.device)
    if _launch.triton is None:
        raise ConfigError(
            "compute.kernel_impl",
            "'triton' needs the triton package (pip install 'gali[triton]'); or set compute.kernel_impl=auto or ref",
        )
    if device.type == "cuda":
        return
    from gali.kernels import kway_head  # Triton decides interpreted-or-compiled when it is first imported

    if not _launch.interpreted(kway_head._kway_head_fwd_kernel):
        raise ConfigError(
            "compute.kernel_impl",
            f"'triton' runs the fused kernels on CUDA, and this run is on the {device.type.upper()} "
            f"(run.device={cfg.run.device!r}); set compute.kernel_impl=auto (Triton on CUDA, the reference "
            "elsewhere) or ref, or TRITON_INTERPRET=1 to run them in Triton's (slow) interpreter",
        )
