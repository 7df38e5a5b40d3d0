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

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from gali.engine.errors import GaliError
from gali.engine.files import atomic_write, free_bytes, out_of_space
from gali.engine.loop.config import Config, config_from_dict
from gali.engine.loop.distributed import World, check_same_state
from gali.engine.loop.ema import AVERAGED, WeightAverage
from gali.engine.loop.runtime import derived_seed
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import NETWORK_NAMES, Networks, build_networks

FORMAT_VERSION = 1
MARGIN = 16 << 20  # free space a checkpoint write needs beyond its own bytes: at least this, else 10 % more


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

    def save(self, path: str | Path, writer: BackgroundWriter | None = None) -> None:
        """Write :meth:`state_dict` to ``path`` atomically and durably, on rank 0; collective on every rank.

        The ranks' networks and optimizer states are checked first (:func:`check_same_state`): a
        non-finite tensor, or one that differs between ranks, stops the run naming it, and nothing is
        written. A full disk stops the run with a message (:func:`save_checkpoint`). With a ``writer`` the
        state is copied to host memory and written on the writer's thread while training goes on (after the
        write before it has ended); without one, here.
        """
        check_same_state(self.world, self._shared_tensors())
        state = self.state_dict()
        if not self.world.is_main:
            return
        if writer is None:
            save_checkpoint(path, state)
        else:
            writer.submit(Path(path), _host_copy(state))

    def _shared_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor the ranks must agree on, by name: the networks' and the optimizers' state."""
        yield from _tensors("", {name: getattr(self.nets, name).state_dict() for name in NETWORK_NAMES})
        if self.ema is not None:
            yield from _tensors("", self.ema.state_dict())
        if self.step is not None:
            yield from _tensors("", self.step.state_dict())


class BackgroundWriter:
    """Writes one checkpoint at a time on a thread of its own, so that a snapshot does not stall the step.

    A thread running :func:`save_checkpoint`, rather than ``torch.distributed.checkpoint``'s async save: DCP
    writes a folder of shards in its own format, where a gali checkpoint is one file (read by ``gali eval``,
    ``sample`` and resume alike) whose write is atomic and fsynced and checked for free space first; the thread
    keeps all of that. A submit waits for the write under way first; :meth:`wait` waits and raises what the
    write raised (a full disk's message), :meth:`check` raises it without waiting. The thread is not a daemon: a
    process that ends mid-write (an exception, a second signal's exit) finishes the file first; SIGKILL leaves
    only the temporary file, which the next resume removes.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, state: dict[str, Any]) -> None:
        self.wait()

        def write() -> None:
            try:
                save_checkpoint(path, state)
            except BaseException as exc:  # raised on the main thread, at the next check or wait
                self._error = exc

        self._thread = threading.Thread(target=write, name=f"gali-{path.name}")
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write under way; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise the error of a write that has ended with one (without waiting for one under way)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _host_copy(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every tensor copied to host memory (pinned, from CUDA: one wait for all the copies), so that
    training may change the originals while the copy is written."""
    from_cuda = False

    def copy(value: Any) -> Any:
        nonlocal from_cuda
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(copy(item) for item in value)
        if not isinstance(value, Tensor):
            return value
        if value.device.type != "cuda":
            return value.detach().clone()
        from_cuda = True
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return host.copy_(value.detach(), non_blocking=True)

    copied = copy(state)
    if from_cuda:
        torch.cuda.synchronize()
    return copied


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint dictionary (with the format version) to ``path`` atomically and durably.

    Too little free space is refused before writing: the state's tensor bytes plus 10 % (at least
    :data:`MARGIN`). A write that runs out of room anyway (:func:`gali.engine.files.out_of_space`: a full
    disk, a quota, the file size limit, whatever error torch's zip writer turns it into) is the same
    message. Either way the folder is left as it was: no partial file, the earlier checkpoints intact.
    """
    path = Path(path)
    needed = _tensor_bytes(state)
    margin = max(needed // 10, MARGIN)
    free = free_bytes(path.parent)
    if free < needed + margin:
        raise _no_space(
            path,
            f"for {path.name}: nothing was written",
            f"{free / 2**20:.1f} MiB free; {needed / 2**20:.1f} MiB of tensors plus a {margin / 2**20:.0f} MiB "
            "margin needed",
        )

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            torch.save({**state, "format_version": FORMAT_VERSION}, f)

    try:
        return atomic_write(path, write)
    except (OSError, RuntimeError) as exc:
        reason = out_of_space(exc, path.parent, needed)
        if reason is None:
            raise
        raise _no_space(
            path, f"while writing {path.name}: the partial file was removed", f"the system said: {reason.strerror}"
        ) from exc


def _no_space(path: Path, happened: str, detail: str) -> GaliError:
    """The one message for a checkpoint the disk cannot hold (before or during the write)."""
    return GaliError(
        f"no space left on the device of {path.parent} {happened} and the earlier checkpoints are intact; "
        f"free space there (or lower run.keep_checkpoints), then gali train --resume {path.parent} ({detail})"
    )


def _tensor_bytes(state: dict[str, Any]) -> int:
    """The bytes of the storages behind ``state``'s tensors, each storage once: what ``torch.save`` writes."""
    storages = {}
    for _, tensor in _tensors("", state):
        storage = tensor.untyped_storage()
        storages[tensor.device, storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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
            milestones.setdefault(checkpoint_images(path) // milestone_images, path)
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


def checkpoint_images(path: Path) -> int:
    """The images seen at the checkpoint named ``path`` (:func:`checkpoint_name`)."""
    return int(path.stem.removeprefix("checkpoint-"))


def _tensors(prefix: str, value: Any) -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a nested state dictionary, with its dotted name (``opt_d.state.3.exp_avg``)."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(f"{prefix}.{key}" if prefix else str(key), item)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Config, dict[str, Any]]:
    """Read a checkpoint; returns its config and the raw state.

    A file that is not a whole gali checkpoint (unreadable, not format 1, a key missing, a value of the
    wrong type: :func:`_check_fields`) or that holds a NaN or inf in any floating tensor (weights, moving
    averages, BatchNorm statistics, optimizer moments: :func:`_first_non_finite`) is a GaliError naming
    the file and what is wrong (the tensor), so that the commands refuse it (exit 2) and resume skips it.
    """
    path = Path(path)
    if not path.is_file():
        raise GaliError(f"checkpoint {path} does not exist; pass a checkpoint-*.pt file from a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GaliError(f"checkpoint {path} could not be read ({exc}); it may be truncated") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        what = f"format_version {state.get('format_version')!r}" if isinstance(state, dict) else _kind(state)
        raise GaliError(f"checkpoint {path} is not a gali checkpoint (format {FORMAT_VERSION}): it holds {what}")
    problem = _check_fields(state)
    if problem:
        raise GaliError(f"checkpoint {path} is not a whole gali checkpoint: {problem}")
    bad = _first_non_finite(state)
    if bad is not None:
        raise GaliError(
            f"checkpoint {path} is damaged: {bad} holds non-finite values (NaN or inf), so what is computed "
            "from it would be NaN; it was cut or corrupted, or written before gali refused non-finite "
            "checkpoints. Take an earlier checkpoint of the run (gali train --resume RUN_DIR skips this one)"
        )
    try:
        return config_from_dict(state["config"], origin=str(path)), state
    except (GaliError, TypeError, ValueError) as exc:
        raise GaliError(f"checkpoint {path} holds a config gali cannot take: {exc}") from exc


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_optimizer(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(value.get("param_groups"), list)
    )


def _is_rng(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("torch"), Tensor)


# What each field of a checkpoint must be (checked where present), as (test, what it should be).
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "a dictionary (the resolved config)"),
    "extra_dim": (lambda v: v is None or _is_count(v), "None or a count"),
    **dict.fromkeys(("G", "E", "D", "G_ema", "E_ema"), (_is_state, "a state dictionary of tensors")),
    **dict.fromkeys(("opt_d", "opt_ge"), (_is_optimizer, "an optimizer state dictionary (state, param_groups)")),
    **dict.fromkeys(("scaler_d", "scaler_ge"), (lambda v: isinstance(v, dict), "a GradScaler state dictionary")),
    **dict.fromkeys(("images_seen", "iteration", "epoch", "world_size"), (_is_count, "a count")),
    "kimg": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "rng": (_is_rng, "an RNG state dictionary"),
    "rng_ranks": (lambda v: isinstance(v, list) and all(map(_is_rng, v)), "a list of RNG state dictionaries"),
}
_REQUIRED = ("config", "extra_dim", "G", "E", "D")  # a bundle of the networks, for sampling and evaluation
_TRAINING = ("opt_d", "opt_ge", "images_seen", "iteration", "epoch", "rng")  # all of them where 'iteration' is


def _check_fields(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint dictionary's fields (None if nothing is), for a message.

    Every checkpoint holds the :data:`_REQUIRED` fields; one a run can resume from (it has 'iteration')
    holds the :data:`_TRAINING` fields too, and each rank's RNG state when written by several ranks.
    """
    for key, (test, should_be) in _FIELDS.items():
        if key in state and not test(state[key]):
            return f"its {key!r} is not {should_be}: it is {_kind(state[key])}"
    required = [*_REQUIRED, *(_TRAINING if "iteration" in state else ())]
    if state.get("world_size", 1) != 1 and "iteration" in state:
        required.append("rng_ranks")
    missing = [key for key in required if key not in state]
    if missing:
        return f"it has no {', '.join(repr(key) for key in missing)}"
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) != state.get("world_size", 1):
        return f"its 'rng_ranks' holds {len(ranks)} RNG states for a world_size of {state.get('world_size', 1)}"
    return None


def _first_non_finite(state: dict[str, Any]) -> str | None:
    """The dotted name of the first floating tensor of ``state`` holding a NaN or inf, or None if there is none.

    Every floating tensor is read: the networks' weights and BatchNorm statistics, the moving averages,
    the optimizers' moments. One pass where the tensors lie (the device of ``map_location``): a flag per
    tensor, stacked, one host sync (a second one, to find which, only when one is not finite).
    """
    named = [(name, t) for name, t in _tensors("", state) if t.is_floating_point() or t.is_complex()]
    if not named:
        return None
    flags = [torch.isfinite(tensor).all() for _, tensor in named]
    finite = torch.stack([flag.to(flags[0].device) for flag in flags])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def _kind(value: Any) -> str:
    """A value's type for a message: 'None', 'a list', 'a dict of int, Tensor' (the types of its values)."""
    if value is None:
        return "None"
    name = type(value).__name__
    kind = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if isinstance(value, dict) and value:
        kind += " of " + ", ".join(sorted({type(item).__name__ for item in value.values()}))
    return kind


def latest_checkpoint(path: str | Path, *, log: Callable[[str], None] = print) -> tuple[Path, Config, dict[str, Any]]:
    """The checkpoint a resumed run continues from, read: ``path`` itself, or a run folder's newest readable one.

    In a folder, ``checkpoint-<images>.pt`` files are tried newest first; one that cannot be read
    (cut short by a full disk, say: the atomic write makes a crash mid-write leave only a ``.tmp``)
    or that holds a non-finite tensor (:func:`load_checkpoint`) is named through ``log`` with the
    reason, and the one before it is taken.
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
    ('ema'), else the live weights ('live'), for sampling and evaluation. The checkpoint is read on
    ``device`` and checked whole there (:func:`load_checkpoint`): a non-finite tensor anywhere in it is
    refused by name, the weights not used (``ema`` or not) included.
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
