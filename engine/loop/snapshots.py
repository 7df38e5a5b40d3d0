"""The ``run.snapshot_kimg`` cadence: image grids, the held-out reconstruction error and the checkpoint.

Grids are drawn from fixed inputs chosen at the start of a run (a seeded z, the first held-out
images, seeded evaluation boxes for specs with masks), so successive snapshots show the same cells.
"""

from __future__ import annotations

import torch

from gali.engine.errors import DataError
from gali.engine.loop.checkpoint import Checkpoint, checkpoint_name, prune_checkpoints
from gali.engine.loop.config import Config
from gali.engine.loop.distributed import World, average_buffers
from gali.engine.loop.grids import inpainting_grid, reconstruction_grid, tile
from gali.engine.loop.run_log import RunLog, SilentRunLog
from gali.engine.loop.ticks import Cadence
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.metrics.reconstruction import reconstruction_mse
from gali.engine.nets.inference import evaluation_box_params, sample_images
from gali.engine.nets.networks import Networks
from gali.pipelines import Pipeline, make_pipeline


def held_out_images(cfg: Config, device: torch.device, batch_size: int) -> tuple[str, Pipeline]:
    """The held-out split when the data has one, else the training split (named in the log)."""
    kwargs = {"batch_size": batch_size, "device": device, "seed": cfg.run.seed,
              "channels_last": cfg.compute.channels_last}
    try:
        return "test", make_pipeline(cfg.data, split="test", **kwargs)
    except DataError:
        return "train", make_pipeline(cfg.data, split="train", **kwargs)


class Snapshots:
    """Every ``run.snapshot_kimg`` (and at the end): grids, held-out reconstruction MSE, then the checkpoint.

    Rank 0 measures, draws and writes; the other ranks take part in the checkpoint's collectives only.
    """

    def __init__(self, cfg: Config, spec: TupleSpec, nets: Networks, device: torch.device, world: World) -> None:
        self.cadence = Cadence(int(cfg.run.snapshot_kimg * 1000))
        self.nets, self.world = nets, world
        self.mask_fill, self.kernel_impl = cfg.method.mask_fill, cfg.compute.kernel_impl
        self.keep, self.milestone_images = cfg.run.keep_checkpoints, int(cfg.run.milestone_kimg * 1000)
        if not world.is_main:
            return
        self.split, self.pipeline = held_out_images(cfg, device, min(cfg.run.batch_size, 100))
        n = self.grid_size = cfg.run.grid_size
        generator = torch.Generator().manual_seed(cfg.run.seed)
        self.grid_z = torch.randn(n * n, cfg.model.latent_dim, generator=generator).to(device)
        self.grid_x = next(iter(self.pipeline)).x[:n]
        self.grid_masks = (evaluation_box_params(n, self.grid_x.shape[-1], seed=cfg.run.seed, device=device)
                           if spec.mask_indices else None)

    def due(self, images_seen: int, step_images: int, done: bool) -> bool:
        return self.cadence.due(images_seen, step_images, done)

    def take(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> float:
        """Write the grids and the checkpoint, log the snapshot's record; returns the held-out MSE (rank 0)."""
        images_seen = checkpoint.progress.images_seen
        average_buffers(self.world, (self.nets.G, self.nets.E, self.nets.D))
        mse = self._measure_and_draw(images_seen, run_log) if self.world.is_main else float("nan")
        # After the snapshot's own random draws: the checkpoint's RNG state is where training goes on from.
        self._save(checkpoint, run_log)
        if self.world.is_main:
            kimg = images_seen / 1000
            run_log.record({"event": "snapshot", "kimg": kimg, f"recon_mse_{self.split}": mse})
            run_log.message(f"snapshot at {kimg:.1f} kimg: reconstruction MSE on {self.split} split {mse:.5f}")
        return mse

    def save_checkpoint(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> None:
        """A checkpoint outside the cadence (a stopped run): collective; rank 0 writes."""
        average_buffers(self.world, (self.nets.G, self.nets.E, self.nets.D))
        self._save(checkpoint, run_log)

    def _save(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> None:
        """The checkpoint (collective; rank 0 writes), then the old ones beyond ``run.keep_checkpoints`` pruned."""
        run_dir = run_log.run_dir
        checkpoint.save(run_dir / checkpoint_name(checkpoint.progress.images_seen))
        if self.world.is_main:
            prune_checkpoints(run_dir, keep=self.keep, milestone_images=self.milestone_images,
                              log=run_log.message)

    def _measure_and_draw(self, images_seen: int, run_log: RunLog | SilentRunLog) -> float:
        G, E = self.nets.G, self.nets.E
        mse = reconstruction_mse(G, E, (b.x for b in self.pipeline))
        grids = {"samples": tile(sample_images(G, self.grid_z), columns=self.grid_size),
                 "reconstructions": reconstruction_grid(G, E, self.grid_x)}
        if self.grid_masks is not None:
            grids["inpainting"] = inpainting_grid(G, E, self.grid_x, self.grid_masks, fill=self.mask_fill,
                                                  impl=self.kernel_impl)
        run_log.images(grids, images_seen)
        return mse
