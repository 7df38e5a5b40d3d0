"""The training loop (host side): clock, progress, logs, snapshots. The step does the math.

Progress is counted in kimg (thousands of real images seen), as in StyleGAN and EDM2. Step
statistics stay on the device and are read once per tick (``run.tick_kimg``); every
``run.snapshot_kimg`` the loop writes a checkpoint, sample and reconstruction grids, and the
held-out reconstruction error.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali.engine.checkpoint import load_checkpoint, save_checkpoint
from gali.engine.config import Config, dump_config
from gali.engine.errors import ConfigError, DataError
from gali.engine.feature_models import feature_dim, load_feature_model
from gali.engine.images import reconstruction_mse, sample_images, save_grid, save_reconstruction_grid
from gali.engine.models import build_models
from gali.engine.step import GaliStep, Networks, instance_noise_std
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
class TrainResult:
    run_dir: Path
    kimg: float
    images_per_second: float
    recon_mse: float
    last_stats: dict[str, Any]


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


def train(cfg: Config, *, log: Callable[[str], None] = print) -> TrainResult:
    """Train from ``cfg``; returns where the run folder is and the final figures."""
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    spec = load_spec(cfg.method.tuples)
    batch_size = cfg.run.batch_size
    pipeline = make_pipeline(cfg.data, split="train", batch_size=batch_size, device=device, seed=cfg.run.seed)
    eval_split, eval_pipeline = _eval_images(cfg, device, min(batch_size, 100))
    nets = build_networks(cfg, spec, device)
    step = GaliStep(nets, spec, cfg.method, cfg.optim, cfg.model.latent_dim)

    run_dir = create_run_dir(cfg.run.out_dir, cfg.preset)
    (run_dir / "config.toml").write_text(dump_config(cfg))
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    log(f"run folder {run_dir}  preset {cfg.preset}  tuples {spec.name} (K={spec.num_classes})  device {device}")
    log(f"data: {pipeline.num_images} training images, {len(pipeline)} batches of {batch_size} per epoch")

    grid_n = cfg.run.grid_size
    grid_z = torch.randn(grid_n * grid_n, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
    grid_z = grid_z.to(device)
    grid_x = next(iter(eval_pipeline)).x[:grid_n]

    total_images = int(cfg.run.kimg * 1000)
    images_per_epoch = len(pipeline) * batch_size
    num_epochs = math.ceil(total_images / images_per_epoch)
    noise_std = torch.zeros((), device=device)
    tick_images = int(cfg.run.tick_kimg * 1000)
    snapshot_images = int(cfg.run.snapshot_kimg * 1000)

    def snapshot(images_seen: int, epoch: int) -> float:
        kimg = images_seen / 1000
        mse = reconstruction_mse(nets.G, nets.E, (b.x for b in eval_pipeline))
        save_grid(sample_images(nets.G, grid_z), run_dir / "samples.png", columns=grid_n)
        save_reconstruction_grid(nets.G, nets.E, grid_x, run_dir / "reconstructions.png")
        save_checkpoint(run_dir / f"checkpoint-{images_seen:010d}.pt", {
            "config": cfg.to_dict(), "kimg": kimg, "epoch": epoch, "extra_dim": nets.extra_dim,
            "G": nets.G.state_dict(), "E": nets.E.state_dict(), "D": nets.D.state_dict(),
            "opt_d": step.opt_d.state_dict(), "opt_ge": step.opt_ge.state_dict(),
        })
        record = {"event": "snapshot", "kimg": kimg, f"recon_mse_{eval_split}": mse}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        log(f"snapshot at {kimg:.1f} kimg: reconstruction MSE on {eval_split} split {mse:.5f}")
        return mse

    images_seen, iteration, epoch = 0, 0, 0
    sums: dict[str, torch.Tensor] = {}
    count = 0
    train_seconds = tick_seconds = 0.0  # wall time of steps only; snapshots are not counted
    tick_images_start = 0
    next_tick, next_snapshot = tick_images, snapshot_images
    last: dict[str, Any] = {}
    mse = float("nan")
    segment_start = time.perf_counter()
    while images_seen < total_images:
        epoch += 1
        noise_std.fill_(instance_noise_std(cfg.method, epoch, num_epochs))
        pipeline.set_epoch(epoch)
        for batch in pipeline:
            if iteration == 0:
                nets.G.init_output_bias(batch.x)
            stats = step.step(batch.x, noise_std, _phase(iteration, cfg.optim.n_dis))
            for name, value in stats.items():
                sums[name] = sums[name] + value if name in sums else value.clone()
            count += 1
            iteration += 1
            images_seen += batch_size
            done = images_seen >= total_images
            if images_seen >= next_tick or done:
                means = {name: (value / count).tolist() for name, value in sums.items()}  # the one sync
                tick_seconds += time.perf_counter() - segment_start
                speed = (images_seen - tick_images_start) / tick_seconds
                train_seconds += tick_seconds
                last = {"kimg": images_seen / 1000, "epoch": epoch, "iteration": iteration,
                        "images_per_s": speed, "noise_std": float(noise_std), **means}
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                eta = (total_images - images_seen) / max(speed, 1e-9)
                p_true = "/".join(f"{p:.2f}" for p in means["p_true"])
                log(f"kimg {images_seen / 1000:7.1f}/{cfg.run.kimg:g}  epoch {epoch}  loss_d {means['loss_d']:.4f}  "
                    f"loss_ge {means['loss_ge']:.4f}  p_true {p_true}  {speed:6.1f} img/s  eta {eta:5.0f}s")
                sums, count, tick_seconds, tick_images_start = {}, 0, 0.0, images_seen
                next_tick += tick_images
                segment_start = time.perf_counter()
            if images_seen >= next_snapshot or done:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tick_seconds += time.perf_counter() - segment_start
                mse = snapshot(images_seen, epoch)
                next_snapshot += snapshot_images
                segment_start = time.perf_counter()
            if done:
                break
    metrics_file.close()
    speed = images_seen / max(train_seconds, 1e-9)
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
