"""The ``run.snapshot_kimg`` cadence: image grids, the held-out metrics and the checkpoint.

Grids and metrics come from the moving averages of G and E when the run keeps them (``run.ema_kimg``), their BatchNorm
statistics first recomputed on ``run.ema_bn_batches`` real training batches, else from the live networks. The held-out
metrics (:func:`gali.engine.metrics.reconstruction.held_out_metrics`) are the reconstruction MSE, E's mean σ and μ
spread and, for labelled data, the identity metric with a classifier fitted once per run on up to
``run.identity_images`` training images. With ``run.snapshot_bn_recalibrate`` = N > 0 each is measured again
(``*_bn_recal``) on copies of G and E whose BatchNorm statistics were recomputed on N training batches. Grids are drawn
from inputs fixed at the start of a run (a seeded z, the first held-out images, seeded evaluation boxes), so successive
snapshots show the same cells.
"""

from __future__ import annotations

import copy
import itertools

import torch

from gali.engine.errors import DataError
from gali.engine.loop.checkpoint import Checkpoint, checkpoint_name, prune_checkpoints
from gali.engine.loop.config import Config
from gali.engine.loop.distributed import World, average_buffers
from gali.engine.loop.ema import WeightAverage
from gali.engine.loop.grids import inpainting_grid, reconstruction_grid, tile
from gali.engine.loop.run_log import RunLog, SilentRunLog
from gali.engine.loop.ticks import Cadence
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.metrics.identity import IdentityClassifier, fit_identity_classifier, pixel_features
from gali.engine.metrics.reconstruction import held_out_metrics
from gali.engine.nets.feature_models import resize_to
from gali.engine.nets.inference import evaluation_box_params, recalibrate_batch_norm, sample_images
from gali.engine.nets.networks import Networks
from gali.pipelines import Pipeline, make_pipeline


def held_out_images(cfg: Config, device: torch.device, batch_size: int) -> tuple[str, Pipeline]:
    """The held-out split when the data has one, else the training split (named in the log)."""
    kwargs = {
        "batch_size": batch_size,
        "device": device,
        "seed": cfg.run.seed,
        "channels_last": cfg.compute.channels_last,
    }
    try:
        return "test", make_pipeline(cfg.data, split="test", **kwargs)
    except DataError:
        return "train", make_pipeline(cfg.data, split="train", **kwargs)


def identity_classifier(cfg: Config, pipeline: Pipeline) -> IdentityClassifier | None:
    """The identity classifier on up to ``run.identity_images`` labelled images of the training split's
    ``pipeline``; None when it is off or the data has no labels or one class."""
    if not cfg.run.identity_images:
        return None
    try:
        return fit_identity_classifier(
            ((b.x, b.labels) for b in pipeline),
            lambda x: pixel_features(resize_to(x, cfg.model.resolution)),  # as G draws
            cfg.run.identity_images,
        )
    except DataError:  # one class: nothing to tell apart
        return None


class Snapshots:
    """Every ``run.snapshot_kimg`` (and at the end): grids, held-out metrics, then the checkpoint.

    Rank 0 measures, draws and writes; the other ranks take part in the checkpoint's collectives only.
    """

    def __init__(
        self,
        cfg: Config,
        spec: TupleSpec,
        nets: Networks,
        device: torch.device,
        world: World,
        ema: WeightAverage | None = None,
    ) -> None:
        self.cadence = Cadence(int(cfg.run.snapshot_kimg * 1000))
        self.nets, self.world = nets, world
        # What the grids and held-out metrics show: the moving averages of G and E when the run keeps them.
        self.shown = (ema.G, ema.E) if ema is not None else (nets.G, nets.E)
        # The averages' BatchNorm statistics, copied from the live networks, belong to other weights: they are
        # recomputed on real images before each snapshot measures, draws and saves them (run.ema_bn_batches).
        self.ema_bn_batches = cfg.run.ema_bn_batches if ema is not None else 0
        self.with_buffers = tuple(dict.fromkeys((nets.G, nets.E, nets.D, *self.shown)))  # averaged over ranks
        self.mask_fill, self.kernel_impl = cfg.method.mask_fill, cfg.compute.kernel_impl
        self.keep, self.milestone_images = cfg.run.keep_checkpoints, int(cfg.run.milestone_kimg * 1000)
        if not world.is_main:
            return
        self.split, self.pipeline = held_out_images(cfg, device, min(cfg.run.batch_size, 100))
        self.train_images = make_pipeline(
            cfg.data, split="train", batch_size=min(cfg.run.batch_size, 100), device=device, seed=cfg.run.seed
        )
        self.classifier = identity_classifier(cfg, self.train_images)
        self.recalibrate_batches = cfg.run.snapshot_bn_recalibrate
        n = self.grid_size = cfg.run.grid_size
        generator = torch.Generator().manual_seed(cfg.run.seed)
        self.grid_z = torch.randn(n * n, cfg.model.latent_dim, generator=generator).to(device)
        # a class-conditional G draws class i % C in row i; the reconstructions take the images' own labels
        classes = cfg.model.label_classes
        self.grid_labels = (torch.arange(n * n, device=device) // n % classes) if classes else None
        first = next(iter(self.pipeline))
        self.grid_x = first.x[:n]
        self.grid_x_labels = first.labels[:n] if classes else None
        self.grid_masks = (
            evaluation_box_params(n, self.grid_x.shape[-1], seed=cfg.run.seed, device=device)
            if spec.mask_indices
            else None
        )

    def due(self, images_seen: int, step_images: int, done: bool) -> bool:
        return self.cadence.due(images_seen, step_images, done)

    def take(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> dict[str, float]:
        """Write the grids and the checkpoint, log the snapshot's record; returns the held-out figures (rank 0).

        The record names each figure with the split it was measured on (``recon_mse_test``, ...).
        """
        images_seen = checkpoint.progress.images_seen
        average_buffers(self.world, self.with_buffers)
        self._recalibrate_averages()
        figures = self._measure_and_draw(images_seen, run_log) if self.world.is_main else {}
        # After the snapshot's own random draws: the checkpoint's RNG state is where training goes on from.
        self._save(checkpoint, run_log)
        if self.world.is_main:
            kimg = images_seen / 1000
            run_log.record({"event": "snapshot", "kimg": kimg, **{f"{k}_{self.split}": v for k, v in figures.items()}})
            identity = (
                f", identity {figures['identity']:.3f} (real images {figures['identity_ceiling']:.3f})"
                if "identity" in figures
                else ""
            )
            if "identity_bn_recal" in figures:
                identity += f", {figures['identity_bn_recal']:.3f} with BatchNorm statistics of real images"
            run_log.message(
                f"snapshot at {kimg:.1f} kimg on the {self.split} split: reconstruction MSE "
                f"{figures['recon_mse']:.5f}{identity}, E sigma {figures['e_sigma']:.3f}, "
                f"mu spread {figures['e_mu_spread']:.3f}"
            )
        return figures

    def save_checkpoint(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> None:
        """A checkpoint outside the cadence (a stopped run): collective; rank 0 writes.

        It reads no data: a stop may come with the whole job's processes being ended, data workers included.
        The averages keep the BatchNorm statistics of their last recalibration; every snapshot redoes it."""
        average_buffers(self.world, self.with_buffers)
        self._save(checkpoint, run_log)

    def _recalibrate_averages(self) -> None:
        """The averaged G's and E's BatchNorm statistics from real training images (rank 0's, on every rank)."""
        if not self.ema_bn_batches:
            return
        G, E = self.shown
        if self.world.is_main:
            recalibrate_batch_norm(
                G, E, itertools.islice(((b.x, b.labels) for b in self.train_images), self.ema_bn_batches)
            )
        for buffer in (b for net in (G, E) for b in net.buffers()):  # the counters too: ranks compare them
            self.world.broadcast_tensor(buffer)

    def _save(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> None:
        """The checkpoint (collective; rank 0 writes), then the old ones beyond ``run.keep_checkpoints`` pruned."""
        run_dir = run_log.run_dir
        checkpoint.save(run_dir / checkpoint_name(checkpoint.progress.images_seen))
        if self.world.is_main:
            prune_checkpoints(run_dir, keep=self.keep, milestone_images=self.milestone_images, log=run_log.message)

    def _measure_and_draw(self, images_seen: int, run_log: RunLog | SilentRunLog) -> dict[str, float]:
        G, E = self.shown
        figures = held_out_metrics(G, E, ((b.x, b.labels) for b in self.pipeline), self.classifier)
        if self.recalibrate_batches:  # the same measures with BatchNorm statistics of real data, on copies
            G_real, E_real = copy.deepcopy(G), copy.deepcopy(E)
            recalibrate_batch_norm(
                G_real, E_real, itertools.islice(((b.x, b.labels) for b in self.train_images), self.recalibrate_batches)
            )
            recalibrated = held_out_metrics(G_real, E_real, ((b.x, b.labels) for b in self.pipeline), self.classifier)
            figures |= {f"{k}_bn_recal": v for k, v in recalibrated.items() if k != "identity_ceiling"}
        grids = {
            "samples": tile(sample_images(G, self.grid_z, self.grid_labels), columns=self.grid_size),
            "reconstructions": reconstruction_grid(G, E, self.grid_x, self.grid_x_labels),
        }
        if self.grid_masks is not None:
            grids["inpainting"] = inpainting_grid(
                G,
                E,
                self.grid_x,
                self.grid_masks,
                fill=self.mask_fill,
                impl=self.kernel_impl,
                labels=self.grid_x_labels,
            )
        run_log.images(grids, images_seen)
        return figures
