"""The ``run.snapshot_kimg`` cadence: image grids, the held-out metrics and the checkpoint.

Grids and metrics come from the moving averages of G and E when the run keeps them (``run.ema_kimg``), their BatchNorm
statistics first recomputed on ``run.ema_bn_batches`` real training batches, else from the live networks. The held-out
metrics (:func:`gali.engine.metrics.reconstruction.held_out_metrics`), over the first ``run.snapshot_images`` images of
the held-out split in its seeded order (the same every time, in batches of 100, the last one partial), are the
reconstruction MSE, E's mean σ and μ spread and, for labelled data, the identity metric with a classifier fitted once
per run on up to ``run.identity_images`` training images. With ``run.snapshot_bn_recalibrate`` = N > 0 each is measured
again (``*_bn_recal``) on copies of G and E whose BatchNorm statistics were recomputed on N training batches. Grids are
drawn from inputs fixed at the start of a run (a seeded z, the first held-out images, seeded evaluation boxes), so
successive snapshots show the same cells. ``run.snapshot_metrics`` adds FID and KID of ``run.snapshot_metric_images``
samples against at most as many held-out images (their features computed once per run), drawn as ``gali eval`` draws
them (:func:`gali.engine.metrics.fid.sample_features`), with the Inception file ``run.snapshot_inception``. The
ranks share each pass in blocks of whole batches; rank 0 combines the figures, fits the classifier and draws. The
checkpoint is written by a :class:`BackgroundWriter` from a host copy while training goes on; a stop's and the run's
last wait for it.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import torch

from gali.engine.errors import ConfigError, DataError
from gali.engine.loop.checkpoint import BackgroundWriter, Checkpoint, checkpoint_name, prune_checkpoints
from gali.engine.loop.config import Config
from gali.engine.loop.distributed import World, average_buffers
from gali.engine.loop.ema import WeightAverage
from gali.engine.loop.grids import inpainting_grid, reconstruction_grid, tile
from gali.engine.loop.ranks import rank_block, read_block
from gali.engine.loop.run_log import RunLog, SilentRunLog, format_kimg
from gali.engine.loop.ticks import Cadence
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.metrics.fid import (
    frechet_distance,
    kernel_inception_distance,
    latent_batches,
    load_inception,
    sample_features,
    to_uint8_range,
)
from gali.engine.metrics.identity import IdentityClassifier, fit_identity_classifier, pixel_features
from gali.engine.metrics.reconstruction import combine_held_out, held_out_part
from gali.engine.nets.feature_models import resize_to
from gali.engine.nets.inference import evaluation_box_params, recalibrate_batch_norm, sample_images
from gali.engine.nets.networks import Networks
from gali.pipelines import SplitBatches, make_pipeline

EVAL_BATCH = 100  # the snapshots' evaluation batch, whatever the training batch: gali eval's --batch-size default


def held_out_images(cfg: Config, device: torch.device, batch_size: int, limit: int) -> tuple[str, SplitBatches]:
    """The first ``limit`` images of the held-out split (all of them if fewer, the last batch partial), in its
    seeded order: the same images at every snapshot. The training split where the data has no held-out one
    (named in the log)."""
    kwargs = {"batch_size": batch_size, "device": device, "seed": cfg.run.seed, "limit": limit}
    try:
        return "test", SplitBatches(cfg.data, "test", **kwargs)
    except DataError:
        return "train", SplitBatches(cfg.data, "train", **kwargs)


def identity_classifier(cfg: Config, device: torch.device, batch_size: int) -> IdentityClassifier | None:
    """The identity classifier on up to ``run.identity_images`` labelled images of the training split (every one
    of them, the last batch partial); None when it is off or the data has no labels or one class."""
    if not cfg.run.identity_images:
        return None
    images = SplitBatches(
        cfg.data, "train", batch_size=batch_size, device=device, seed=cfg.run.seed, limit=cfg.run.identity_images
    )
    try:
        return fit_identity_classifier(
            ((b.x, b.labels) for b in images),
            lambda x: pixel_features(resize_to(x, cfg.model.resolution)),  # as G draws
            cfg.run.identity_images,
        )
    except DataError:  # one class: nothing to tell apart
        return None


class Snapshots:
    """Every ``run.snapshot_kimg`` (and at the end): grids, held-out metrics, then the checkpoint.

    Each rank measures its block of whole evaluation batches (:mod:`gali.engine.loop.ranks`, as ``gali eval``
    shares its passes) and rank 0 combines them into one process's figures; rank 0 alone draws and writes.
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
        self.writer = BackgroundWriter()  # rank 0's checkpoint writes, one at a time, while training goes on
        # What the grids and held-out metrics show: the moving averages of G and E when the run keeps them.
        self.shown = (ema.G, ema.E) if ema is not None else (nets.G, nets.E)
        # The averages' BatchNorm statistics, copied from the live networks, belong to other weights: they are
        # recomputed on real images before each snapshot measures, draws and saves them (run.ema_bn_batches).
        self.ema_bn_batches = cfg.run.ema_bn_batches if ema is not None else 0
        self.with_buffers = tuple(dict.fromkeys((nets.G, nets.E, nets.D, *self.shown)))  # averaged over ranks
        self.mask_fill, self.kernel_impl = cfg.method.mask_fill, cfg.compute.kernel_impl
        self.keep, self.milestone_images = cfg.run.keep_checkpoints, int(cfg.run.milestone_kimg * 1000)
        self.metric_names = cfg.run.snapshot_metric_names()
        inception_path = Path(cfg.run.snapshot_inception).expanduser()
        if self.metric_names and not inception_path.is_file():  # on every rank: all of them stop, none waits
            raise ConfigError(
                "run.snapshot_inception",
                f"{inception_path} is not a file; give the path of a local TorchScript Inception "
                "(clean-fid/StyleGAN3 inception-2015-12-05.pt, downloaded elsewhere); nothing is downloaded",
            )
        # Every rank measures its block of the held-out images (and of FID's samples); rank 0 combines.
        self.split, self.pipeline = held_out_images(cfg, device, EVAL_BATCH, cfg.run.snapshot_images)
        self.inception = load_inception(inception_path).to(device) if self.metric_names else None
        self.metric_images, self.seed, self.data = cfg.run.snapshot_metric_images, cfg.run.seed, cfg.data
        self.latent_dim, self.label_classes, self.device = cfg.model.latent_dim, cfg.model.label_classes, device
        self.real_features: torch.Tensor | None = None  # the held-out images' features, at the first snapshot
        self.recalibrate_batches = cfg.run.snapshot_bn_recalibrate
        self.classifier = identity_classifier(cfg, device, EVAL_BATCH) if world.is_main else None
        self.identity = world.broadcast(self.classifier is not None)  # whether the ranks keep its features
        if not world.is_main:
            return
        self.train_images = make_pipeline(  # BatchNorm recalibration: batches like the training step's
            cfg.data, split="train", batch_size=min(cfg.run.batch_size, EVAL_BATCH), device=device, seed=cfg.run.seed
        )
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
        """Write the grids and the checkpoint, log the snapshot's record (collective); returns the held-out figures
        (rank 0; an empty dict on the others).

        The record names each figure with the split it was measured on (``recon_mse_test``, ...).
        """
        images_seen = checkpoint.progress.images_seen
        average_buffers(self.world, self.with_buffers)
        self._recalibrate_averages()
        figures = self._measure(images_seen, run_log)
        sample_metrics = self._sample_metrics() if self.metric_names else {}
        # After the snapshot's own random draws: the checkpoint's RNG state is where training goes on from.
        self._save(checkpoint, run_log)
        if self.world.is_main:
            kimg = images_seen / 1000
            run_log.record(
                {
                    "event": "snapshot",
                    "kimg": kimg,
                    f"images_{self.split}": self.pipeline.num_images,
                    **{f"{k}_{self.split}": v for k, v in figures.items()},
                    **sample_metrics,
                }
            )
            identity = (
                f", identity {figures['identity']:.3f} (real images {figures['identity_ceiling']:.3f})"
                if "identity" in figures
                else ""
            )
            if "identity_bn_recal" in figures:
                identity += f", {figures['identity_bn_recal']:.3f} with BatchNorm statistics of real images"
            run_log.message(
                f"snapshot at {format_kimg(kimg)} kimg on the {self.split} split: reconstruction MSE "
                f"{figures['recon_mse']:.5f} (sharpness {figures['recon_sharpness']:.3f}){identity}, "
                f"E sigma {figures['e_sigma']:.3f}, "
                f"mu spread {figures['e_mu_spread']:.3f}{self._sample_metrics_text(sample_metrics)}"
            )
        return figures

    def save_checkpoint(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog) -> None:
        """A checkpoint outside the cadence (a stopped run): collective; rank 0 waits for the snapshot's write
        under way, then writes this one before returning.

        It reads no data: a stop may come with the whole job's processes being ended, data workers included.
        The averages keep the BatchNorm statistics of their last recalibration; every snapshot redoes it."""
        average_buffers(self.world, self.with_buffers)
        self.writer.wait()
        self._save(checkpoint, run_log, background=False)

    def check_writes(self) -> None:
        """Raise the error of a snapshot's checkpoint write that failed (a full disk), without waiting."""
        self.writer.check()

    def finish(self, run_log: RunLog | SilentRunLog) -> None:
        """Wait for the last snapshot's checkpoint to be written, then prune (the end of a run)."""
        self.writer.wait()
        if self.world.is_main:
            prune_checkpoints(
                run_log.run_dir, keep=self.keep, milestone_images=self.milestone_images, log=run_log.message
            )

    def _recalibrate_averages(self) -> None:
        """The averaged G's and E's BatchNorm statistics from real training images (rank 0's, on every rank)."""
        if self.ema_bn_batches:
            self._recalibrate(*self.shown, self.ema_bn_batches)

    def _recalibrate(self, G: torch.nn.Module, E: torch.nn.Module, batches: int) -> None:
        """G's and E's BatchNorm statistics from ``batches`` real training batches: rank 0 computes them from its
        batches and every rank takes them (the counters too: ranks compare them)."""
        if self.world.is_main:
            recalibrate_batch_norm(G, E, itertools.islice(((b.x, b.labels) for b in self.train_images), batches))
        for buffer in (b for net in (G, E) for b in net.buffers()):
            self.world.broadcast_tensor(buffer)

    def _save(self, checkpoint: Checkpoint, run_log: RunLog | SilentRunLog, *, background: bool = True) -> None:
        """The checkpoint (collective; rank 0 writes it, on the writer's thread unless told not to), then the old
        ones beyond ``run.keep_checkpoints`` pruned (one written in the background is pruned from the next time)."""
        run_dir = run_log.run_dir
        checkpoint.save(run_dir / checkpoint_name(checkpoint.progress.images_seen), self.writer if background else None)
        if self.world.is_main:
            prune_checkpoints(run_dir, keep=self.keep, milestone_images=self.milestone_images, log=run_log.message)

    def _sample_metrics(self) -> dict[str, Any]:
        """FID and KID (as named by ``run.snapshot_metrics``) of the shown G's samples against held-out images
        (collective: each rank computes the features of its block of both; rank 0 gets the figures).

        The real images' features are computed at the first snapshot and kept: every snapshot compares with the
        same set. ``metric_images`` records both counts (the split may hold fewer than asked for).
        """
        assert self.inception is not None
        inception, world = self.inception, self.world
        if self.real_features is None:
            real = SplitBatches(
                self.data, self.split, batch_size=EVAL_BATCH, device=self.device, seed=self.seed,
                limit=self.metric_images,
            )  # fmt: skip
            block = rank_block(real.num_images, EVAL_BATCH, world)
            features = [inception(to_uint8_range(b.x)).cpu() for _, _, b in read_block(real, block)]
            self.real_features = _joined(world.gather_to_main(features))
        block = rank_block(self.metric_images, EVAL_BATCH, world)
        latents = latent_batches(
            self.metric_images, EVAL_BATCH, latent_dim=self.latent_dim, label_classes=self.label_classes, seed=self.seed
        )
        latents = itertools.islice(latents, block.stop)
        fake = sample_features(self.shown[0], inception, latents, first=block.first, device=self.device)
        fake = _joined([[f for _, f in rank] for rank in world.gather_to_main(fake)])
        if not world.is_main:
            return {}
        found: dict[str, Any] = {
            "metric_images": {"generated": len(fake), "real": len(self.real_features), "split": self.split}
        }
        if "fid" in self.metric_names:
            found["fid"] = frechet_distance(self.real_features, fake)
        if "kid" in self.metric_names:
            found["kid"], found["kid_std"], _ = kernel_inception_distance(self.real_features, fake, seed=self.seed)
        return found

    @staticmethod
    def _sample_metrics_text(found: dict[str, Any]) -> str:
        """``', FID 12.345, KID 0.01234 ± 0.00056 (10000 generated vs 10000 test images)'``, or '' without them."""
        if not found:
            return ""
        fid = f", FID {found['fid']:.3f}" if "fid" in found else ""
        kid = f", KID {found['kid']:.5f} ± {found['kid_std']:.5f}" if "kid" in found else ""
        counts = found["metric_images"]
        return f"{fid}{kid} ({counts['generated']} generated vs {counts['real']} {counts['split']} images)"

    def _measure(self, images_seen: int, run_log: RunLog | SilentRunLog) -> dict[str, float]:
        """The held-out figures (collective; rank 0 gets them), then the grids (rank 0)."""
        G, E = self.shown
        figures = self._held_out(G, E)
        if self.recalibrate_batches:  # the same measures with BatchNorm statistics of real data, on copies
            G_real, E_real = copy.deepcopy(G), copy.deepcopy(E)
            self._recalibrate(G_real, E_real, self.recalibrate_batches)
            recalibrated = self._held_out(G_real, E_real)
            figures |= {f"{k}_bn_recal": v for k, v in recalibrated.items() if k != "identity_ceiling"}
        if self.world.is_main:
            run_log.images(self._grids(G, E), images_seen)
        return figures

    def _held_out(self, G: torch.nn.Module, E: torch.nn.Module) -> dict[str, float]:
        """:func:`held_out_metrics` of G and E over the held-out images, each rank over its block of whole evaluation
        batches; rank 0 combines them in batch order (one process's figures) and the others get an empty dict."""
        block = rank_block(self.pipeline.num_images, EVAL_BATCH, self.world)
        batches = ((b.x, b.labels) for _, _, b in read_block(self.pipeline, block))
        parts = self.world.gather_to_main(held_out_part(G, E, batches, identity=self.identity))
        return combine_held_out(parts, self.classifier) if self.world.is_main else {}

    def _grids(self, G: torch.nn.Module, E: torch.nn.Module) -> dict[str, torch.Tensor]:
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
        return grids


def _joined(ranks: list[list[torch.Tensor]]) -> torch.Tensor:
    """The rows of every rank's batches, in rank order (batch order); an empty tensor where nothing was gathered."""
    rows = [t for rank in ranks for t in rank]
    return torch.cat(rows) if rows else torch.empty(0)
