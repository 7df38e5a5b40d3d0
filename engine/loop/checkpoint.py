"""The checkpoint bundle: one object that names everything a run's state holds, saved and loaded alike.

A checkpoint file is one ``torch.save`` dictionary (format 1), written atomically and durably
(:func:`gali.engine.files.atomic_write`) and read with ``weights_only=True``:
    config, G, E, D             the resolved config (``Config.to_dict()``) and the networks' state dicts
    G_ema, E_ema, extra_dim     moving averages (``run.ema_kimg`` > 0); the feature model's width (None without M)
    opt_d, opt_ge               the step's optimizer state (and scaler_d, scaler_ge under fp16)
    images_seen, iteration      progress counters; epoch: the 1-based epoch of the last step; kimg
    rng, world_size, rng_ranks  rank 0's torch CPU (and CUDA) RNG state; how many ranks wrote it; each rank's RNG
:class:`Checkpoint` builds it from the live objects and restores it, a field per line; new state is a new field.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from gali.engine.errors import GaliError
from gali.engine.files import atomic_write
from gali.engine.loop.config import Config, config_from_dict
from gali.engine.loop.distributed import World, check_same_state
from gali.engine.loop.ema import AVERAGED, WeightAverage
from gali.engine.loop.runtime import derived_seed
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import NETWORK_NAMES, Networks, build_networks

FORMAT_VERSION = 1


class HasState(Protocol):
    """What holds the optimizers' (and scalers') state: the step runner."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Where a run is: images seen, steps taken, and the 1-based epoch of the last step (0 before any)."""

    images_seen: int = 0
    iteration: int = 0
    epoch: int = 0

    def advance(self, epoch: int, batch_size: int) -> None:
        """One step of ``batch_size`` images taken in (1-based) ``epoch``."""
        self.images_seen += batch_size
        self.iteration += 1
        self.epoch = epoch


@dataclass
class Checkpoint:
    """Everything a run's state holds, for :meth:`state_dict` and :meth:`load_state_dict`.

    ``step`` (the optimizers and scalers), ``progress`` and the RNG states are the training state: a
    bundle built without a step (for sampling or evaluation) saves and restores the networks only.
    Every rank holds one; :meth:`save` is collective (the ranks' states are compared and their RNG
    states gathered) and rank 0 writes.
    """

    config: Config
    nets: Networks
    step: HasState | None = None
    progress: Progress = field(default_factory=Progress)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world: World = field(default_factory=World)
    ema: WeightAverage | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's dictionary; the RNG state is read now (call it after the snapshot's draws)."""
        state: dict[str, Any] = {"config": self.config.to_dict(), "extra_dim": self.nets.extra_dim}
        state |= {name: getattr(self.nets, name).state_dict() for name in NETWORK_NAMES}
        if self.ema is not None:
            state |= self.ema.state_dict()
        if self.step is not None:
            state |= self.step.state_dict()
            rng = self.world.gather(_rng_state(self.device))
            state |= {
                "kimg": self.progress.images_seen / 1000,
                "images_seen": self.progress.images_seen,
                "iteration": self.progress.iteration,
                "epoch": self.progress.epoch,
                "rng": rng[0],
                "world_size": self.world.size,
            }
            if self.world.size > 1:
                state["rng_ranks"] = rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote into the live networks (and step, progress and RNG)."""
        for name in NETWORK_NAMES:
            getattr(self.nets, name).load_state_dict(state[name])
        if self.ema is not None:
            self.ema.load_state_dict(state)
        if self.step is not None:
            self.step.load_state_dict(state)
            self.progress = Progress(state["images_seen"], state["iteration"], state["epoch"])
            if state.get("world_size", 1) == self.world.size:
                _set_rng_state(
                    state["rng_ranks"][self.world.rank] if self.world.size > 1 else state["rng"], self.device
                )
            else:  # another world size: fresh streams from (seed, rank, step), the same on every resume
                torch.manual_seed(derived_seed(self.config.run.seed, self.world.rank, self.progress.iteration))

    def save(self, path: str | Path) -> Path | None:
        """Write :meth:`state_dict` to ``path`` atomically and durably, on rank 0; collective on every rank.

        The ranks' networks and optimizer states are compared first (a divergence stops the run,
        naming the first differing tensor). A full disk stops the run with a message; the partial
        file is removed and the checkpoints before it stay as they were.
        """
        path = Path(path)
        check_same_state(self.world, self._shared_tensors())
        state = self.state_dict()
        if not self.world.is_main:
            return None
        try:
            return save_checkpoint(path, state)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise GaliError(
                f"no space left on the device of {path.parent} while writing {path.name}: the partial "
                "file was removed and the earlier checkpoints are intact; free space there (or lower "
                f"run.keep_checkpoints), then gali train --resume {path.parent}"
            ) from exc

    def _shared_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor the ranks must agree on, by name: the networks' and the optimizers' state."""
        yield from _tensors("", {name: getattr(self.nets, name).state_dict() for name in NETWORK_NAMES})
        if self.ema is not None:
            yield from _tensors("", self.ema.state_dict())
        if self.step is not None:
            yield from _tensors("", self.step.state_dict())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint dictionary (with the format version) to ``path`` atomically and durably.

    ``torch.save`` writes to an open file, so that a full disk is an ``OSError`` (ENOSPC), not the
    zip writer's RuntimeError.
    """

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            torch.save({**state, "format_version": FORMAT_VERSION}, f)

    return atomic_write(path, write)


def prune_checkpoints(run_dir: Path, *, keep: int, milestone_images: int, log: Callable[[str], None]) -> list[Path]:
    """Delete the run folder's checkpoints beyond the newest ``keep`` (0 = keep all); returns those deleted.

    Kept as well, forever: every milestone, the first checkpoint at or after each multiple of
    ``milestone_images`` (0 = none). The newest checkpoint is always kept. A delete that fails is
    named through ``log`` and the run goes on.
    """
    checkpoints = sorted(run_dir.glob("checkpoint-*.pt"))  # zero-padded image counts sort in time order
    if not keep or len(checkpoints) <= keep:
        return []
    milestones: dict[int, Path] = {}
    if milestone_images:
        for path in checkpoints:
            milestones.setdefault(_images_of(path) // milestone_images, path)
    keep_set = set(checkpoints[-keep:]) | set(milestones.values())
    deleted = []
    for path in checkpoints:
        if path in keep_set:
            continue
        try:
            path.unlink()
            deleted.append(path)
        except OSError as exc:
            log(f"could not delete old checkpoint {path} ({exc}); it stays")
    return deleted


def _images_of(path: Path) -> int:
    return int(path.stem.removeprefix("checkpoint-"))


def _tensors(prefix: str, value: Any) -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a nested state dictionary, with its dotted name (``opt_d.state.3.exp_avg``)."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(f"{prefix}.{key}" if prefix else str(key), item)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Config, dict[str, Any]]:
    """Read a checkpoint; returns its config and the raw state. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise GaliError(f"checkpoint {path} does not exist; pass a checkpoint-*.pt file from a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GaliError(f"checkpoint {path} could not be read ({exc}); it may be truncated") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise GaliError(f"checkpoint {path} is not a gali checkpoint (format {FORMAT_VERSION})")
    return config_from_dict(state["config"], origin=str(path)), state


def latest_checkpoint(path: str | Path, *, log: Callable[[str], None] = print) -> tuple[Path, Config, dict[str, Any]]:
    """The checkpoint a resumed run continues from, read: ``path`` itself, or a run folder's newest readable one.

    In a folder, ``checkpoint-<images>.pt`` files are tried newest first; one that cannot be read
    (cut short by a full disk, say: the atomic write makes a crash mid-write leave only a ``.tmp``)
    is named through ``log`` and the one before it is taken.
    """
    path = Path(path)
    if path.is_file():
        return path, *load_checkpoint(path)
    if not path.is_dir():
        raise GaliError(f"resume: {path} does not exist; pass a run folder or one of its checkpoint-*.pt files")
    candidates = sorted(path.glob("checkpoint-*.pt"), reverse=True)  # zero-padded image counts sort in time order
    for candidate in candidates:
        try:
            return candidate, *load_checkpoint(candidate)
        except GaliError as exc:
            log(f"resume: skipping {candidate.name}: {exc}")
    what = "no readable checkpoint-*.pt" if candidates else "no checkpoint-*.pt"
    raise GaliError(f"resume: run folder {path} holds {what}; a run writes one every run.snapshot_kimg")


def load_networks(path: str | Path, device: torch.device, *, ema: bool = True) -> tuple[Config, Networks, str]:
    """The config, the trained networks G, E and D of a checkpoint, and which weights G and E hold.

    With ``ema`` (the default) G and E are the checkpoint's moving averages where it has them
    ('ema'), else the live weights ('live'), for sampling and evaluation.
    """
    cfg, state = load_checkpoint(path, map_location=device)
    spec = load_spec(cfg.method.tuples)
    nets = build_networks(
        cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=device, extra_dim=state["extra_dim"]
    )
    Checkpoint(cfg, nets).load_state_dict(state)
    weights = "ema" if ema and all(f"{name}_ema" in state for name in AVERAGED) else "live"
    if weights == "ema":
        for name in AVERAGED:
            getattr(nets, name).load_state_dict(state[f"{name}_ema"])
    return cfg, nets, weights


def checkpoint_name(images_seen: int) -> str:
    """``checkpoint-<images_seen:010d>.pt``: zero-padded, so names sort in training order."""
    return f"checkpoint-{images_seen:010d}.pt"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
