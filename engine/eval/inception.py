"""The Inception features that FID and KID share: the evaluation split's (the reference, cached) and G's samples'.

Both passes are shared among the ranks in blocks of whole batches (:mod:`gali.engine.loop.ranks`); rank 0 gathers
the feature rows in batch order, so FID and KID see the rows one process computes. The samples are those of
``sample_features`` of ``latent_batches`` (the training snapshots' too), seeded by ``--seed``: each rank draws the
stream up to its block's end and renders its block's batches only.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from gali.engine.errors import GaliError
from gali.engine.eval.context import EvalContext, SplitItem
from gali.engine.eval.metric import Metric, Part, in_batch_order
from gali.engine.eval.reference_cache import ReferenceCache, dataset_identity
from gali.engine.loop.ranks import progress, rank_block
from gali.engine.metrics import fid_implementation, to_uint8_range
from gali.engine.metrics.fid import latent_batches, sample_features


class InceptionInputs(Part):
    """Reference and generated features; after ``combine`` (rank 0): ``real``, ``fake`` and ``settings``."""

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        o = ctx.options
        key = {
            "data": dataset_identity(ctx.data),
            "split": o.split,
            "images": o.fid_reference_images,
            "seed": o.seed,
            "network_sha256": ctx.inception_sha256,
            "input_size": ctx.inception.input_size,
            "format": 1,
        }
        self.cache = ReferenceCache(key, o.cache_dir, ctx.log)
        self.cached = self.cache.load() if ctx.world.is_main else None
        self.reads = ctx.world.broadcast(self.cached is None)  # one decision for every rank
        self.reference: list[tuple[int, Tensor]] = []

    @property
    def split_images(self) -> float:
        return self.ctx.options.fid_reference_images if self.reads else 0

    @torch.no_grad()
    def measure(self, item: SplitItem) -> None:
        limit = self.ctx.options.fid_reference_images
        if self.reads and item.start < limit:
            take = item.batch.x[: limit - item.start]
            self.reference.append((item.index, self.ctx.inception(to_uint8_range(take)).cpu()))

    def local(self) -> tuple[list[tuple[int, Tensor]], list[tuple[int, Tensor]]]:
        return self.reference, self.generated()

    def generated(self) -> list[tuple[int, Tensor]]:
        """(batch index, Inception features) of this rank's block of the ``--fid-samples`` samples."""
        ctx, o = self.ctx, self.ctx.options
        block = rank_block(o.fid_samples, o.batch_size, ctx.world)
        model = ctx.cfg.model
        latents = latent_batches(
            o.fid_samples, o.batch_size, latent_dim=model.latent_dim, label_classes=model.label_classes, seed=o.seed
        )
        latents = progress(itertools.islice(latents, block.stop), total=block.stop, what="samples", world=ctx.world)
        return sample_features(ctx.G, ctx.inception, latents, first=block.first, device=ctx.device)

    def combine(self, parts: list[Any]) -> None:
        ctx, o = self.ctx, self.ctx.options
        reused = self.cached is not None
        self.real = self.cached if reused else torch.cat(in_batch_order([part[0] for part in parts]))
        if not reused:
            self.cache.store(self.real)
        self.fake = torch.cat(in_batch_order([part[1] for part in parts]))
        self.settings = {
            "implementation": fid_implementation(),
            "network": str(ctx.inception.path),
            "network_sha256": ctx.inception_sha256,
            "network_input": ctx.inception.describe(),
            "num_features": ctx.inception.num_features,
            "generated": len(self.fake),
            "reference": {
                "split": o.split,
                "images": len(self.real),
                "seed": o.seed,
                "cache": str(self.cache.path),
                "cache_reused": reused,
            },
            "z_seed": o.seed,
            "weights": ctx.weights,
            "bn_recalibrated_images": ctx.recalibrated,
        }


class InceptionMetric(Metric):
    """A metric of G's samples against the split, on the :class:`InceptionInputs` that FID and KID share."""

    shares = (InceptionInputs,)
    split_images = 0  # InceptionInputs reads the split

    @classmethod
    def check(cls, options) -> None:
        if not options.inception:
            raise GaliError(
                "metrics 'fid' and 'kid' need --inception PATH, a local TorchScript Inception "
                "(clean-fid/StyleGAN3 inception-2015-12-05.pt); nothing is downloaded"
            )

    def inputs(self) -> InceptionInputs:
        return self.ctx.shared[InceptionInputs]

    @staticmethod
    def details(r: dict[str, Any]) -> str:
        """The details cell FID and KID share."""
        ref = r["reference"]
        return f"{r['generated']} generated vs {ref['images']} {ref['split']} images; {r['implementation']}"
