"""The training loop (host side): clock, progress, logs, snapshots. The step does the math.

Progress is counted in kimg (thousands of real images seen), as in StyleGAN and EDM2. Step
statistics stay on the device and are read once per tick (``run.tick_kimg``), then handed to the
run's :class:`RunLog` (metrics.jsonl, TensorBoard, the progress bar or lines); every
``run.snapshot_kimg`` the loop writes a checkpoint, sample, reconstruction and (for specs with
masks) inpainting grids, and the held-out reconstruction error. :func:`resume` continues an
interrupted run from its newest readable checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gali.engine.config import Config, config_from_dict, dump_config
from gali.engine.errors import ConfigError, DataError, GaliError
from gali.engine.feature_models import feature_dim, load_feature_model
from gali.engine.images import (
    evaluation_box_params,
    inpainting_grid,
    reconstruction_grid,
    reconstruction_mse,
    sample_images,
    tile,
)
from gali.engine.models import build_models
from gali.engine.profiling import annotate, enable_ranges, ranges_enabled
from gali.engine.run_log import RunLog, resolve_tensorboard
from gali.engine.step import Networks, build_step, instance_noise_std
from gali.engine.tuples import TupleSpec, load_spec
from gali.pipelines import Pipeline, make_pipeline


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", "got 'cuda' but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_networks(cfg: Config, spec: TupleSpec, device: torch.device, extra_dim: int | None = None) -> Networks:
    """G, E, D for ``spec`` (and M when the spec uses M(...)), on ``device``.

    ``extra_dim`` (the width of M's features) is measured from M when M is loaded; pass it when
    rebuilding from a checkpoint without M.
    """
    feature_model = None
    if spec.uses_feature_model and extra_dim is None:
        if not cfg.method.feature_model:
            raise ConfigError("method.feature_model", f"tuple spec '{spec.name}' uses M(...); "
                              "give method.feature_model=/path/to/model.pt (TorchScript or state dict)")
        feature_model = load_feature_model(cfg.method.feature_model, cfg.method.feature_arch).to(device)
        size = cfg.method.feature_input_size or cfg.data.resolution
        extra_dim = feature_dim(feature_model, size)
    G, E, D = build_models(cfg.model, slot_kinds=spec.slot_kinds, num_classes=spec.num_classes, extra_dim=extra_dim)
    return Networks(G=G.to(device), E=E.to(device), D=D.to(device), M=feature_model, extra_dim=extra_dim)


def create_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/NNNNN-name`` with the next free number (StyleGAN's convention)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.name.split("-", 1)[0].isdigit()]
    run_dir = out / f"{max(numbers, default=-1) + 1:05d}-{Path(name).stem}"
    run_dir.mkdir()
    return run_dir


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


class TickStats:
    """The step's device statistics summed since the last tick; read back with one host sync.

    Each statistic keeps its own count (under n_dis > 1 a side's gradient norm exists only in the
    phases that update it). Summing clones the step's tensors first, so a CUDA graph's static
    outputs can be overwritten by the next replay.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def read_means(self) -> dict[str, float | list[float]]:
        """Means since the last call (scalars as floats, vectors as lists), then reset."""
        if not self.sums:
            return {}
        means = [(value / self.counts[name]).float().reshape(-1) for name, value in self.sums.items()]
        flat = torch.cat(means).tolist()  # one device-to-host copy for every statistic
        out: dict[str, float | list[float]] = {}
        offset = 0
        for (name, value), mean in zip(self.sums.items(), means, strict=True):
            out[name] = flat[offset] if value.dim() == 0 else flat[offset:offset + mean.numel()]
            offset += mean.numel()
        self.sums, self.counts = {}, {}
        return out


def _phase(iteration: int, n_dis: int) -> str:
    if n_dis == 1:
        return "both"
    return "ge" if (iteration + 1) % (n_dis + 1) == 0 else "d"


def _eval_images(cfg: Config, device: torch.device, batch_size: int) -> tuple[str, Pipeline]:
    """The held-out split when the data has one, else the training split (named in the log)."""
    try:
        return "test", make_pipeline(cfg.data, split="test", batch_size=batch_size, device=device, seed=cfg.run.seed)
    except DataError:
        return "train", make_pipeline(cfg.data, split="train", batch_size=batch_size, device=device, seed=cfg.run.seed)


def resume(path: str | Path, overrides: Sequence[str] = (), *, log: Callable[[str], None] = print) -> TrainResult:
    """Continue an interrupted run from a checkpoint, in its run folder (DESIGN.md principle 5).

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
        raise GaliError(f"resume: {checkpoint} has no {', '.join(missing)} (written before gali could resume); "
                        "it can still be evaluated and sampled")
    if state["images_seen"] >= int(cfg.run.kimg * 1000):
        raise GaliError(f"resume: {checkpoint} is at {state['images_seen'] / 1000:g} kimg and run.kimg is "
                        f"{cfg.run.kimg:g}: nothing left to train; pass run.kimg=<more> to train longer")
    return train(cfg, log=log, resume_from=ResumePoint(checkpoint, state))


def train(cfg: Config, *, log: Callable[[str], None] = print, resume_from: ResumePoint | None = None) -> TrainResult:
    """Train from ``cfg``; returns where the run folder is and the final figures.

    ``log`` receives the lines meant for people; a progress bar, when drawn, goes to stdout.
    ``resume_from`` continues a run (see :func:`resume`) instead of starting a new run folder.
    """
    device = resolve_device(cfg.run.device)
    tensorboard = resolve_tensorboard(cfg.run.tensorboard)  # run.tensorboard=on without the package stops here
    seed_everything(cfg.run.seed)
    spec = load_spec(cfg.method.tuples)
    batch_size = cfg.run.batch_size
    pipeline = make_pipeline(cfg.data, split="train", batch_size=batch_size, device=device, seed=cfg.run.seed)
    eval_split, eval_pipeline = _eval_images(cfg, device, min(batch_size, 100))
    nets = build_networks(cfg, spec, device)
    step = build_step(nets, spec, cfg.method, cfg.optim, cfg.model.latent_dim, cfg.compute)
    images_seen = iteration = epoch = start_batch = 0
    if resume_from is None:
        run_dir = create_run_dir(cfg.run.out_dir, cfg.preset)
    else:
        run_dir, state = resume_from.checkpoint.parent, resume_from.state
        images_seen, iteration = state["images_seen"], state["iteration"]
        epoch, start_batch = divmod(iteration, len(pipeline))  # epochs finished, batches into the next
        if images_seen != iteration * batch_size or state["epoch"] != epoch + (start_batch > 0):
            raise GaliError(f"resume: {resume_from.checkpoint} was written {iteration} steps into epoch "
                            f"{state['epoch']} of its run, which this config's data and run.batch_size "
                            f"({len(pipeline)} batches of {batch_size} per epoch) do not give; resume with the "
                            "data and batch size the run was trained with")
        for name in ("G", "E", "D"):
            getattr(nets, name).load_state_dict(state[name])
        step.load_state_dict(state)
    (run_dir / "config.toml").write_text(dump_config(cfg))
    run_log = RunLog(run_dir, total_kimg=cfg.run.kimg, progress=cfg.run.progress, tensorboard=tensorboard, log=log)
    run_log.message(f"run folder {run_dir}  preset {cfg.preset}  tuples {spec.name} (K={spec.num_classes})  "
                    f"device {device}  tensorboard {'on' if tensorboard else 'off'}")
    run_log.message(f"data: {pipeline.num_images} training images, {len(pipeline)} batches of {batch_size} per epoch")
    if resume_from is not None:
        run_log.record({"event": "resume", "kimg": images_seen / 1000, "checkpoint": resume_from.checkpoint.name})
        run_log.message(f"resumed from {resume_from.checkpoint.name} at {images_seen / 1000:g} kimg "
                        f"(epoch {epoch + 1}, batch {start_batch})")

    grid_n = cfg.run.grid_size
    grid_z = torch.randn(grid_n * grid_n, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
    grid_z = grid_z.to(device)
    grid_x = next(iter(eval_pipeline)).x[:grid_n]
    grid_masks = (evaluation_box_params(grid_x.shape[0], grid_x.shape[-1], seed=cfg.run.seed, device=device)
                  if spec.mask_indices else None)

    total_images = int(cfg.run.kimg * 1000)
    images_per_epoch = len(pipeline) * batch_size
    num_epochs = math.ceil(total_images / images_per_epoch)
    noise_std = torch.zeros((), device=device)
    tick_images = int(cfg.run.tick_kimg * 1000)
    snapshot_images = int(cfg.run.snapshot_kimg * 1000)

    def snapshot(images_seen: int, epoch: int, iteration: int) -> float:
        kimg = images_seen / 1000
        mse = reconstruction_mse(nets.G, nets.E, (b.x for b in eval_pipeline))
        grids = {"samples": tile(sample_images(nets.G, grid_z), columns=grid_n),
                 "reconstructions": reconstruction_grid(nets.G, nets.E, grid_x)}
        if grid_masks is not None:
            grids["inpainting"] = inpainting_grid(nets.G, nets.E, grid_x, grid_masks, fill=cfg.method.mask_fill,
                                                  impl=cfg.method.kernel_impl)
        run_log.images(grids, images_seen)
        rng = {"torch": torch.get_rng_state()}  # after the snapshot's own draws: where training goes on from
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(run_dir / f"checkpoint-{images_seen:010d}.pt", {
            "config": cfg.to_dict(), "kimg": kimg, "images_seen": images_seen, "epoch": epoch,
            "iteration": iteration, "extra_dim": nets.extra_dim, "rng": rng,
            "G": nets.G.state_dict(), "E": nets.E.state_dict(), "D": nets.D.state_dict(),
            **step.state_dict(),
        })
        run_log.record({"event": "snapshot", "kimg": kimg, f"recon_mse_{eval_split}": mse})
        run_log.message(f"snapshot at {kimg:.1f} kimg: reconstruction MSE on {eval_split} split {mse:.5f}")
        return mse

    if resume_from is not None:
        torch.set_rng_state(resume_from.state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in resume_from.state["rng"]:
            torch.cuda.set_rng_state(resume_from.state["rng"]["cuda"], device)
    images_at_start = images_seen
    ranges_were_on = ranges_enabled()
    enable_ranges(cfg.compute.nvtx)
    try:
        tick_stats = TickStats()
        train_seconds = tick_seconds = 0.0  # wall time of steps only; snapshots are not counted
        tick_images_start = images_seen
        next_tick = (images_seen // tick_images + 1) * tick_images
        next_snapshot = (images_seen // snapshot_images + 1) * snapshot_images
        last: dict[str, Any] = {}
        mse = float("nan")
        segment_start = time.perf_counter()
        while images_seen < total_images:
            epoch += 1
            noise_value = instance_noise_std(cfg.method, epoch, num_epochs)  # kept on the host for the log
            noise_std.fill_(noise_value)
            pipeline.set_epoch(epoch, start_batch)
            start_batch = 0
            batches = iter(pipeline)
            while True:
                with annotate("gali/data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                if iteration == 0:
                    nets.G.init_output_bias(batch.x)
                tick_stats.add(step.step(batch.x, noise_std, _phase(iteration, cfg.optim.n_dis)))
                iteration += 1
                images_seen += batch_size
                done = images_seen >= total_images
                if images_seen >= next_tick or done:
                    means = tick_stats.read_means()  # the one host sync of the tick
                    tick_seconds += time.perf_counter() - segment_start
                    speed = (images_seen - tick_images_start) / tick_seconds
                    train_seconds += tick_seconds
                    last = {"kimg": images_seen / 1000, "epoch": epoch, "iteration": iteration,
                            "images_per_s": speed, "noise_std": noise_value, **means}
                    run_log.tick(last)
                    tick_seconds, tick_images_start = 0.0, images_seen
                    next_tick += tick_images
                    segment_start = time.perf_counter()
                if images_seen >= next_snapshot or done:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    tick_seconds += time.perf_counter() - segment_start
                    mse = snapshot(images_seen, epoch, iteration)
                    next_snapshot += snapshot_images
                    segment_start = time.perf_counter()
                if done:
                    break
    finally:
        run_log.close()
        enable_ranges(ranges_were_on)
    speed = (images_seen - images_at_start) / max(train_seconds, 1e-9)
    log(f"done: {images_seen / 1000:.1f} kimg in {train_seconds:.1f} s of training ({speed:.1f} img/s); "
        f"reconstruction MSE {mse:.5f}; run folder {run_dir}")
    return TrainResult(run_dir=run_dir, kimg=images_seen / 1000, images_per_second=speed, recon_mse=mse,
                       last_stats=last)


def load_generator_encoder(path: str | Path, device: torch.device) -> tuple[Config, Networks]:
    """G and E (and D) from a checkpoint, for sampling and reconstruction."""
    cfg, state = load_checkpoint(path, map_location=device)
    spec = load_spec(cfg.method.tuples)
    nets = build_networks(cfg, spec, device, extra_dim=state["extra_dim"])
    for name in ("G", "E", "D"):
        getattr(nets, name).load_state_dict(state[name])
    return cfg, nets
