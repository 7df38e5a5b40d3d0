"""The training loop (host side): set up, restore, then one loop over steps. The step does the math.

Progress is counted in kimg (thousands of real images seen), as in StyleGAN and EDM2. Each
component owns its cadence: the tick (``run.tick_kimg``: the step statistics read once, logged and
shown), the snapshot (``run.snapshot_kimg``: grids, the held-out reconstruction error and the
checkpoint). :func:`resume` continues an interrupted run from its newest readable checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from gali.engine.errors import ConfigError, GaliError
from gali.engine.files import write_text_atomic
from gali.engine.loop.checkpoint import Checkpoint, Progress, latest_checkpoint
from gali.engine.loop.config import Config, config_from_dict, dump_config
from gali.engine.loop.distributed import World, init_world, local_batch_size
from gali.engine.loop.ema import WeightAverage
from gali.engine.loop.plan import count_sizes, peak_flops, resolve_accumulate, warn_if_batch_will_not_fit
from gali.engine.loop.run_lock import RunFolderLock, acquire_run_folder
from gali.engine.loop.run_log import RunLog, SilentRunLog, format_kimg, resolve_tensorboard
from gali.engine.loop.runtime import check_kernel_impl, create_run_dir, seed_everything
from gali.engine.loop.signals import RunStopped, StopFlag, requeue_job, run_deadline, stop_on_signals
from gali.engine.loop.snapshots import Snapshots
from gali.engine.loop.ticks import StepClock, Ticks
from gali.engine.method.noise import InstanceNoise
from gali.engine.method.tuple_spec import TupleSpec, load_spec
from gali.engine.nets.networks import build_networks
from gali.engine.ranges import annotate, ranges
from gali.engine.step.build import build_step
from gali.pipelines import Batch, Pipeline, make_pipeline


@dataclass
class ResumePoint:
    """A read checkpoint that :func:`train` continues from, in the checkpoint's run folder."""

    checkpoint: Path
    state: dict[str, Any]


@dataclass
class TrainResult:
    run_dir: Path
    kimg: float
    images_per_second: float
    recon_mse: float
    last_stats: dict[str, Any]
    held_out: dict[str, float]


def resume(path: str | Path, overrides: Sequence[str] = (), *, log: Callable[[str], None] = print) -> TrainResult:
    """Continue an interrupted run from a checkpoint, in its run folder (docs/architecture.md principle 5).

    ``path`` is a run folder (its newest readable checkpoint is taken) or one checkpoint file.
    The config is the checkpoint's, with ``overrides`` on top (``run.kimg=...`` trains longer).
    Networks, both optimizers and GradScalers, the image count, the position in the epoch's data
    order and the torch RNG state are restored, so the resumed run computes the steps the
    uninterrupted run would have: bit for bit on a CPU (tested), up to the run-to-run
    nondeterminism of some CUDA kernels on a GPU.
    """
    checkpoint, cfg, state = latest_checkpoint(path, log=log)
    if overrides:
        cfg = config_from_dict(cfg.to_dict(), origin=str(checkpoint), overrides=overrides)
    missing = [key for key in ("images_seen", "iteration", "rng") if key not in state]
    if missing:
        raise GaliError(
            f"resume: {checkpoint} has no {', '.join(missing)} (written before gali could resume); "
            "it can still be evaluated and sampled"
        )
    if state["images_seen"] >= int(cfg.run.kimg * 1000):
        raise GaliError(
            f"resume: {checkpoint} is at {state['images_seen'] / 1000:g} kimg and run.kimg is "
            f"{cfg.run.kimg:g}: nothing left to train; pass run.kimg=<more> to train longer"
        )
    return train(cfg, log=log, resume_from=ResumePoint(checkpoint, state))


def train(cfg: Config, *, log: Callable[[str], None] = print, resume_from: ResumePoint | None = None) -> TrainResult:
    """Train from ``cfg`` (or go on from ``resume_from``, see :func:`resume`); returns the run folder and figures.

    Under torchrun every rank calls this; rank 0 alone writes the run folder. ``log`` receives the lines
    meant for people; a progress bar, when drawn, goes to stdout. A stop signal ends the run with a
    checkpoint and :class:`gali.engine.loop.signals.RunStopped`.
    """
    check_kernel_impl(cfg)
    world, device = init_world(cfg.run.device)
    try:
        with stop_on_signals() as stop, contextlib.ExitStack() as held:  # held: the run folder's lock, rank 0
            return _train(cfg, world, device, stop, log if world.is_main else lambda line: None, resume_from, held)
    finally:
        world.close()


def _train(
    cfg: Config,
    world: World,
    device: torch.device,
    stop: StopFlag,
    log: Callable[[str], None],
    resume_from: ResumePoint | None,
    held: contextlib.ExitStack,
) -> TrainResult:
    # Set up: seeds, data, networks and step, the snapshots, then the run folder and its log.
    tensorboard = resolve_tensorboard(cfg.run.tensorboard)  # run.tensorboard=on without the package stops here
    seed_everything(cfg.run.seed)  # the same on every rank: the networks start equal
    spec = load_spec(cfg.method.tuples)
    batch_size = cfg.run.batch_size
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if cfg.run.accumulate == "auto":  # the run plan's memory model (gali info --gpus): the same on every rank
        cfg.run.accumulate = resolve_accumulate(cfg, world.size, memory)
        log(f"run.accumulate=auto: {cfg.run.accumulate} micro-batch(es) per update")
    if memory is not None and world.is_main:  # the plan says the micro-batch will not fit: warn, do not stop
        warn_if_batch_will_not_fit(cfg, world.size, memory, log)
    pipeline = _training_pipeline(cfg, world, device, len(spec.mask_indices))
    _check_label_classes(cfg, pipeline)
    if resume_from is not None:
        _check_resume_point(resume_from, cfg, len(pipeline))
    nets = build_networks(cfg.model, cfg.method, spec, resolution=cfg.data.resolution, device=device)
    step = build_step(
        nets,
        spec,
        cfg.method,
        cfg.optim,
        cfg.model.latent_dim,
        cfg.compute,
        world_size=world.size,
        accumulate=cfg.run.accumulate,
    )
    ema = (
        WeightAverage(nets, ema_kimg=cfg.run.ema_kimg, rampup=cfg.run.ema_rampup, start_kimg=cfg.run.ema_start_kimg)
        if cfg.run.ema_kimg
        else None
    )
    snapshots = Snapshots(cfg, spec, nets, device, world, ema)
    checkpoint = Checkpoint(cfg, nets, step, device=device, world=world, ema=ema)
    run_log, lease = _open_run_log(cfg, resume_from, spec, pipeline, device, tensorboard, log, world, held)
    still_ours = lease.check if lease is not None else lambda: None  # before each log or checkpoint write (rank 0)
    world.seed_rank_streams(cfg.run.seed)  # z, ε, masks and instance noise differ across ranks

    # Restore an interrupted run's state, in one place: after every random draw of the set-up.
    if resume_from is not None:
        _restore(checkpoint, resume_from, run_log, len(pipeline))
    progress, images_at_start = checkpoint.progress, checkpoint.progress.images_seen
    iteration_at_start = progress.iteration

    stop.deadline = run_deadline(cfg.run.max_time, start=time.time())
    total_images = int(cfg.run.kimg * 1000)
    noise = InstanceNoise(cfg.method, math.ceil(total_images / (len(pipeline) * batch_size)), device)
    clock = StepClock(device)
    ticks = Ticks(
        int(cfg.run.tick_kimg * 1000), clock, progress.images_seen, world, _flops_per_peak(cfg, world, device)
    )
    batches = _batches_from(pipeline, progress)
    held_out, last = {}, {}
    with contextlib.closing(run_log), ranges(cfg.compute.nvtx), _end_status(run_log, progress):
        while progress.images_seen < total_images:
            # Fetch a batch (with its 1-based epoch).
            with annotate("gali/data"), ticks.waiting_for_data():
                epoch, batch = next(batches)

            # Step: one update, from the batch's run.accumulate micro-batches.
            if progress.iteration == 0:  # G starts at rank 0's first batch's mean image
                world.broadcast_tensor(nets.G.init_output_bias(batch.x).data)
                if ema is not None:
                    ema.restart()
            phase = step_phase(progress.iteration, cfg.optim.n_dis)
            labels = batch.labels if cfg.model.label_classes else None  # for class-conditional networks only
            ticks.add(step.step(batch.x, noise.at_epoch(epoch), phase, batch.masks, labels))
            progress.advance(epoch, batch_size)
            if ema is not None:
                ema.update(progress.images_seen, batch_size)
            done = progress.images_seen >= total_images

            # Tick: the statistics' means since the last tick (one host sync), logged and shown.
            if ticks.due(progress.images_seen, batch_size, done):
                last = ticks.record(
                    progress.images_seen, epoch=epoch, iteration=progress.iteration, noise_std=noise.value
                )
                still_ours()
                snapshots.check_writes()
                run_log.tick(last)
                ticks.stop_after_bad_ticks(cfg.run.max_bad_ticks, run_log.run_dir)

            # Snapshot: grids, held-out reconstruction error and checkpoint, outside the training time.
            if snapshots.due(progress.images_seen, batch_size, done):
                still_ours()
                with clock.paused():
                    held_out = snapshots.take(checkpoint, run_log)

            # Stop: a signal on any rank, or run.max_time before the next agreement and a checkpoint, agreed at a
            # step boundary (every run.stop_check_steps steps; every step in a world of one), ends the run with a
            # checkpoint (and, under SLURM, requeues the job).
            step_seconds = clock.seconds() / max(progress.iteration - iteration_at_start, 1)
            every = cfg.run.stop_check_steps if world.size > 1 else 1
            out_of_time = stop.out_of_time((every + 1) * step_seconds)
            if not done and world.any(out_of_time, step=progress.iteration, every=every):
                still_ours()
                snapshots.save_checkpoint(checkpoint, run_log)
                world.barrier()  # no rank tears down its process group while rank 0 still writes
                if world.is_main:
                    requeue_job(cfg.run.requeue, run_log.message)
                raise RunStopped.after(stop, progress.images_seen, run_log.run_dir)

        # Done: the last checkpoint written, the figures said in the run folder's log too.
        snapshots.finish(run_log)
        result = TrainResult(
            run_dir=run_log.run_dir,
            kimg=progress.images_seen / 1000,
            recon_mse=held_out.get("recon_mse", float("nan")),
            images_per_second=(progress.images_seen - images_at_start) / max(clock.seconds(), 1e-9),
            last_stats=last,
            held_out=held_out,
        )
        identity = (
            f"; identity of reconstructions {held_out['identity']:.3f} (real images {held_out['identity_ceiling']:.3f})"
            if "identity" in held_out
            else ""
        )
        speed = f"{result.images_per_second:.1f} img/s"
        if "mfu" in last:
            speed += f", MFU {last['mfu']:.1%}"
        if "data_wait" in last:  # the last tick's timing
            speed += f"; last tick: {last['data_wait']:.0%} waiting for data, steps {last['step_ms_p50']:.1f} ms p50"
            speed += f" / {last['step_ms_p95']:.1f} ms p95"
        if "max_memory_gib" in last:
            speed += f", {last['max_memory_gib']:.1f} GiB peak"
        run_log.message(
            f"done: {format_kimg(result.kimg)} kimg in {clock.seconds():.1f} s of training ({speed}); "
            f"reconstruction MSE {result.recon_mse:.5f}{identity}; run folder {result.run_dir}"
        )

    world.barrier()  # every rank waits for rank 0's last writes before any tears down its process group
    return result


def _flops_per_peak(cfg: Config, world: World, device: torch.device) -> float | None:
    """Model FLOPs per real image (gali info's count) over the ranks' summed peak FLOP/s, for each tick's ``mfu``;
    None where run.mfu leaves it off ('auto': on CUDA) or the GPU is not in the plan's table."""
    if cfg.run.mfu == "off" or (cfg.run.mfu == "auto" and device.type != "cuda"):
        return None
    peak = peak_flops(device)
    return None if peak is None else count_sizes(cfg).cost.flops_per_image / (peak * world.size)


@contextlib.contextmanager
def _end_status(run_log: RunLog | SilentRunLog, progress: Progress) -> Iterator[None]:
    """The run folder says how the run ended (:meth:`RunLog.end`): done, stopped (resumable) or failed."""
    try:
        yield
    except RunStopped:
        run_log.end("stopped", progress.images_seen, resumable=True)
        raise
    except BaseException:
        with contextlib.suppress(OSError):  # the failure may be the disk itself: its own error comes first
            resumable = any(run_log.run_dir.glob("checkpoint-*.pt"))
            run_log.end("failed", progress.images_seen, resumable=resumable)
        raise
    run_log.end("done", progress.images_seen, resumable=False)


def step_phase(iteration: int, n_dis: int) -> str:
    """'both' (simultaneous update) for n_dis = 1; else n_dis 'd' steps, then one 'ge' step."""
    if n_dis == 1:
        return "both"
    return "ge" if (iteration + 1) % (n_dis + 1) == 0 else "d"


def _batches_from(pipeline: Pipeline, progress: Progress) -> Iterator[tuple[int, Batch]]:
    """Every batch from the run's position on, with its 1-based epoch; each epoch in its own seeded order."""
    epoch, start_batch = divmod(progress.iteration, len(pipeline))  # epochs finished, batches into the next
    while True:
        epoch += 1
        pipeline.set_epoch(epoch, start_batch)
        start_batch = 0
        for batch in pipeline:
            yield epoch, batch


def _training_pipeline(cfg: Config, world: World, device: torch.device, num_masks: int) -> Pipeline:
    """This rank's shard of the training split, in batches of its share of ``run.batch_size`` (with the
    spec's ``num_masks`` masks per image where ``method.mask_source`` is 'pipeline'): one batch per update, which
    the step splits into ``run.accumulate`` micro-batches."""
    return make_pipeline(
        cfg.data,
        split="train",
        batch_size=local_batch_size(cfg.run.batch_size, world, cfg.run.accumulate),
        device=device,
        seed=cfg.run.seed,
        rank=world.rank,
        world_size=world.size,
        channels_last=cfg.compute.channels_last,
        masks=cfg.method.pipeline_masks(num_masks, cfg.data.resolution, cfg.run.seed),
    )


def _check_label_classes(cfg: Config, pipeline: Pipeline) -> None:
    """Class-conditional networks need labels of exactly ``model.label_classes`` classes."""
    classes = len(pipeline.class_names)
    if cfg.model.label_classes and classes != cfg.model.label_classes:
        found = f"{classes} classes" if classes else "no labels"
        raise ConfigError(
            "model.label_classes",
            f"got {cfg.model.label_classes}, but the training data has {found}; set model.label_classes={classes}",
        )


def _open_run_log(
    cfg: Config,
    resume_from: ResumePoint | None,
    spec: TupleSpec,
    pipeline: Pipeline,
    device: torch.device,
    tensorboard: bool,
    log: Callable[[str], None],
    world: World,
    held: contextlib.ExitStack,
) -> tuple[RunLog | SilentRunLog, RunFolderLock | None]:
    """The run folder (a new one, or the resumed run's), locked for this run (rank 0 holds the lock until ``held``
    closes), with the resolved config.toml, and its log."""
    if not world.is_main:
        run_dir = world.broadcast(None)
        if run_dir is None:
            raise GaliError("rank 0 cannot write the run folder; its message says why")
        return SilentRunLog(run_dir), None
    run_dir = Path(cfg.run.dir or cfg.run.out_dir) if resume_from is None else resume_from.checkpoint.parent
    try:
        if resume_from is None and cfg.run.dir:  # the folder named: the same for every launch of the run
            run_dir.mkdir(parents=True, exist_ok=True)
        elif resume_from is None:
            run_dir = create_run_dir(run_dir, cfg.preset)
        lease = held.enter_context(acquire_run_folder(run_dir, log=log))  # before anything is written there
        partial = sorted(run_dir.glob("*.tmp"))  # files a killed run was writing: never complete, never read
        for path in partial:
            path.unlink()
        write_text_atomic(run_dir / "config.toml", dump_config(cfg))
        resume_images = None if resume_from is None else resume_from.state["images_seen"]
        run_log = RunLog(
            run_dir,
            total_kimg=cfg.run.kimg,
            progress=cfg.run.progress,
            tensorboard=tensorboard,
            log=log,
            resume_images=resume_images,
        )
    except (OSError, GaliError) as exc:
        world.broadcast(None)  # the other ranks stop too, instead of waiting for a folder
        if isinstance(exc, GaliError):  # the folder is another run's
            raise
        raise _run_folder_error(run_dir, exc) from exc
    world.broadcast(run_dir)
    run_log.message(
        f"run folder {run_dir}  preset {cfg.preset}  tuples {spec.name} (K={spec.num_classes})  "
        f"device {device}  tensorboard {'on' if tensorboard else 'off'}"
    )
    if partial:
        run_log.message(
            f"removed {len(partial)} partial file(s) a stopped run left: {', '.join(p.name for p in partial)}"
        )
    ranks = f" over {world.size} ranks" if world.size > 1 else ""
    ranks += f" in {cfg.run.accumulate} micro-batches" if cfg.run.accumulate > 1 else ""
    run_log.message(
        f"data: {pipeline.num_images} training images, {len(pipeline)} batches of {cfg.run.batch_size}{ranks} per epoch"
    )
    return run_log, lease


def _run_folder_error(run_dir: Path, exc: OSError) -> GaliError:
    """The refusal for a run folder that cannot be written: full, read-only, or not ours to write."""
    if exc.errno == errno.ENOSPC:
        return GaliError(
            f"no space left on the device of {run_dir} for the run's logs; free space there "
            "(or lower run.keep_checkpoints), then start again"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return GaliError(
            f"cannot write in the run folder {run_dir} ({exc.strerror}: {exc.filename}); make it writable "
            "(permissions, an immutable flag, a read-only mount) or choose another run.out_dir, then start again"
        )
    return GaliError(f"cannot write in the run folder {run_dir}: {exc}")


def _check_resume_point(resume_from: ResumePoint, cfg: Config, batches_per_epoch: int) -> None:
    """Refuse a resume that would train other networks, by another method or in another data order, naming the keys.

    The rule: a resumed run goes on with the checkpoint's training, so what decides what is trained stays.
    - Every key of the ``[model]`` and ``[method]`` sections (the networks; the tuple spec, the objective and its
      weights, the masks, the instance noise, the feature model), walked from the sections' dataclass fields: a
      key added to either section is kept with no change here. A key the checkpoint's config lacks (written
      before the key existed) counts as its default, as the resumed config got it.
    - ``run.seed`` when the checkpoint was written mid-epoch: an epoch's order depends on (seed, epoch, world
      size), so the rest of that epoch would come from another order. At an epoch boundary no epoch is split,
      and the seed may change: the following epochs, and the snapshots' fixed z and boxes, follow the new one.
    - The epoch layout: data and ``run.batch_size`` that put the checkpoint elsewhere in the epoch's order
      (:func:`_check_epoch_layout`).
    Every other key may change on resume: ``run.kimg`` and the run's cadences, outputs and limits,
    ``optim.*`` (a lower learning rate after a divergence), ``compute.*``, ``data.root``, ``data.workers``
    and the other data keys that keep the layout; the world size too (the order is the new one's from there).
    """
    saved = resume_from.state["config"]
    changed: dict[str, tuple[Any, Any]] = {}
    for section in ("model", "method"):
        values, written = getattr(cfg, section), saved.get(section, {})
        for spec in fields(values):
            default = spec.default_factory() if spec.default is MISSING else spec.default
            was, now = written.get(spec.name, default), getattr(values, spec.name)
            if was != now:
                changed[f"{section}.{spec.name}"] = was, now
    if changed:
        told = "; ".join(f"{key}: {was!r} in the checkpoint, {now!r} asked" for key, (was, now) in changed.items())
        raise GaliError(
            f"resume: {resume_from.checkpoint} holds networks for other values of {', '.join(changed)}; a resumed "
            f"run keeps every model.* and method.* key it was trained with ({told}). Drop those overrides, or "
            "start a new run"
        )
    _check_epoch_layout(resume_from, batches_per_epoch, cfg.run.batch_size)
    state, seed = resume_from.state, saved.get("run", {}).get("seed", cfg.run.seed)
    epoch, start_batch = divmod(state["iteration"], batches_per_epoch)
    if start_batch and seed != cfg.run.seed:
        raise GaliError(
            f"resume: {resume_from.checkpoint} was written mid-epoch (batch {start_batch} of {batches_per_epoch} "
            f"of epoch {epoch + 1}) by a run with run.seed={seed}; run.seed={cfg.run.seed} would take the rest of "
            "that epoch from another order (an epoch's order depends on (seed, epoch, world size)). Drop the "
            "run.seed override, or resume from a checkpoint written at an epoch boundary"
        )


def _check_epoch_layout(resume_from: ResumePoint, batches_per_epoch: int, batch_size: int) -> None:
    """Refuse a resume whose data or batch size would put the checkpoint elsewhere in the epoch order."""
    state = resume_from.state
    epoch, start_batch = divmod(state["iteration"], batches_per_epoch)
    if state["images_seen"] != state["iteration"] * batch_size or state["epoch"] != epoch + (start_batch > 0):
        raise GaliError(
            f"resume: {resume_from.checkpoint} was written {state['iteration']} steps into epoch "
            f"{state['epoch']} of its run, which this config's data and run.batch_size "
            f"({batches_per_epoch} batches of {batch_size} per epoch) do not give; resume with the "
            "data and batch size the run was trained with"
        )


def _restore(
    checkpoint: Checkpoint, resume_from: ResumePoint, run_log: RunLog | SilentRunLog, batches_per_epoch: int
) -> None:
    """The checkpoint's state into the run's live objects, and a record and a line saying where it goes on."""
    checkpoint.load_state_dict(resume_from.state)
    progress = checkpoint.progress
    epoch, start_batch = divmod(progress.iteration, batches_per_epoch)
    run_log.record({"event": "resume", "kimg": progress.images_seen / 1000, "checkpoint": resume_from.checkpoint.name})
    run_log.message(
        f"resumed from {resume_from.checkpoint.name} at {progress.images_seen / 1000:g} kimg "
        f"(epoch {epoch + 1}, batch {start_batch})"
    )
