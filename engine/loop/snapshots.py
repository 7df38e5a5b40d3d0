"""The ``run.snapshot_kimg`` cadence: image grids, the held-out metrics and the checkpoint.

The held-out metrics (:func:`gali.engine.metrics.reconstruction.held_out_metrics`) are the
reconstruction MSE, E's mean σ and μ spread, and, for labelled data, the identity metric with a
classifier fitted once per run on up to ``run.identity_images`` training images.

Grids are drawn from fixed inputs chosen at the start of a run (a seeded z, the first held-out
images, seeded evaluation boxes for specs with masks), so successive snapshots show the same cells.
"""

from __future__ import annotations

import numpy as np
import torch

from gali.engine.errors import DataError
from gali.engine.loop.checkpoint import Checkpoint, checkpoint_name, prune_checkpoints
from gali.engine.loop.config import Config
from gali.engine.loop.distributed import World, average_buffers
from gali.engine.loop.grids import inpainting_grid, reconstruction_grid, tile
from gali.engine.loop.run_log import RunLog, SilentRunLog
from gali.engine.loop.ticks import Cadence
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.metrics.identity import IdentityClassifier, pixel_features
from gali.engine.metrics.reconstruction import held_out_metrics
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


def identity_classifier(cfg: Config, device: torch.device) -> IdentityClassifier | None:
    """The identity classifier on up to ``run.identity_images`` labelled training images; None: off or unlabelled."""
    if not cfg.run.identity_images:
        return None
    pipeline = make_pipeline(cfg.data, split="train", batch_size=min(cfg.run.batch_size, 100), device=device,
                             seed=cfg.run.seed)
    features, labels, count = [], [], 0
    for batch in pipeline:
        if batch.labels is None:
            return None
        features.append(pixel_features(batch.x))
        labels.append(batch.labels.cpu().numpy())
        count += len(batch.labels)
        if count >= cfg.run.identity_images:
            break
    labels_all = np.concatenate(labels)[:cfg.run.identity_images]
    if len(np.unique(labels_all)) < 2:
        return None
    return IdentityClassifier(np.concatenate(features)[:cfg.run.identity_images], labels_all)


class Snapshots:
    """Every ``run.snapshot_kimg`` (and at the end): grids, held-out metrics, then the checkpoint.

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
        self.classifier = identity_classifier(cfg, device)
        n = self.grid_size = cfg.run.grid_size
        generator = torch.Generator().manual_seed(cfg.run.seed)
        self.grid_z = torch.randn(n * n, cfg.model.latent_dim, generator=generator).to(device)
        self.grid_x = next(iter(self.pipeline)).x[:n]
        self.grid_masks = (evaluation_box_params(n, self.grid_x.shape[-1], seed=cfg.run.seed, device=device)
                           if spec.mask_indices else None)

    def due(self, images_seen: int, step_images: int, done: bool) -> bool:
        return self.cadence.due(images_seen, step_images, done)

    def take(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> dict[str, float]:
        """Write the grids and the checkpoint, log the snapshot's record; returns the held-out figures (rank 0).

        The record names each figure with the split it was measured on (``recon_mse_test``, ...).
        """
        images_seen = checkpoint.progress.images_seen
        average_buffers(self.world, (self.nets.G, self.nets.E, self.nets.D))
        figures = self._measure_and_draw(images_seen, run_log) if self.world.is_main else {}
        # After the snapshot's own random draws: the checkpoint's RNG state is where training goes on from.
        self._save(checkpoint, run_log)
        if self.world.is_main:
            kimg = images_seen / 1000
            run_log.record({"event": "snapshot", "kimg": kimg, **{f"{k}_{self.split}": v for k, v in figures.items()}})
            identity = (f", identity {figures['identity']:.3f} (real images {figures['identity_ceiling']:.3f})"
                        if "identity" in figures else "")
            run_log.message(f"snapshot at {kimg:.1f} kimg on the {self.split} split: reconstruction MSE "
                            f"{figures['recon_mse']:.5f}{identity}, E sigma {figures['e_sigma']:.3f}, "
                            f"mu spread {figures['e_mu_spread']:.3f}")
        return figures

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

    def _measure_and_draw(self, images_seen: int, run_log: RunLog | SilentRunLog) -> dict[str, float]:
        G, E = self.nets.G, self.nets.E
        figures = held_out_metrics(G, E, ((b.x, b.labels) for b in self.pipeline), self.classifier)
        grids = {"samples": tile(sample_images(G, self.grid_z), columns=self.grid_size),
                 "reconstructions": reconstruction_grid(G, E, self.grid_x)}
        if self.grid_masks is not None:
            grids["inpainting"] = inpainting_grid(G, E, self.grid_x, self.grid_masks, fill=self.mask_fill,
                                                  impl=self.kernel_impl)
        run_log.images(grids, images_seen)
        return figures
