"""What every metric of ``gali eval`` reads: the checkpoint's networks, the data config, the options, the rank.

:class:`EvalContext` loads the user's files first (a wrong path fails before any work), then the checkpoint; the
metrics take their networks, batches and shared helpers from it. :class:`SplitItem` is one evaluation batch of this
rank's block, with the reconstruction that pixel-MSE, feature-MSE and recon-identity share computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gali.engine.errors import DataError, GaliError
from gali.engine.files import file_sha256
from gali.engine.loop.checkpoint import load_networks
from gali.engine.loop.config import Config, config_from_dict
from gali.engine.loop.distributed import World
from gali.engine.metrics import feature_mse, load_inception, network_features, pixel_features
from gali.engine.nets.feature_models import load_feature_model
from gali.engine.nets.inference import recalibrate_batch_norm, reconstruction_chain
from gali.pipelines import Batch, SplitBatches
from gali.pipelines.masks import MaskArgs

if TYPE_CHECKING:
    from gali.engine.eval.options import EvalOptions


def evaluation_config(cfg: Config, overrides: tuple[str, ...] | list[str], *, origin: str) -> Config:
    """The checkpoint's whole config with ``data.key=value`` overrides on top, validated as a whole.

    The whole config, so the data are checked against the checkpoint's own model (its arch and resolution),
    not the default one; ``origin`` (the checkpoint's path) names it in errors.
    """
    bad = [o for o in overrides if not o.strip().startswith("data.")]
    if bad:
        raise GaliError(f"only data.* overrides apply to an evaluation; got {', '.join(bad)}")
    return config_from_dict(cfg.to_dict(), origin=origin, overrides=overrides)


@dataclass
class SplitItem:
    """Evaluation batch ``index`` of the split (its first image is image ``start``), as this rank read it."""

    index: int
    start: int
    batch: Batch
    _reconstruction: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def reconstruction(self, ctx: EvalContext) -> tuple[Tensor, Tensor]:
        """(x at G's resolution, G(μ_E(x))); a class-conditional G takes x's labels. Computed once per batch."""
        if self._reconstruction is None:
            x_g, x_hat = reconstruction_chain(ctx.G, ctx.E, self.batch.x, depth=1, labels=self.batch.labels)
            self._reconstruction = (x_g, x_hat)
        return self._reconstruction

    def labels(self, ctx: EvalContext, metric: str) -> Tensor:
        """The batch's labels; ``DataError`` naming ``metric`` when the split has none."""
        if self.batch.labels is None:
            raise ctx.unlabelled(metric, ctx.options.split)
        return self.batch.labels


class EvalContext:
    """One evaluation's networks (eval mode), config, options, world and log (rank 0's; silent on the others)."""

    def __init__(
        self, checkpoint: Path, options: EvalOptions, world: World, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.options, self.world, self.device = options, world, device
        self.log = log if world.is_main else lambda line: None
        self.feature_model = None
        if options.feature_model:
            path = Path(options.feature_model).expanduser()
            if not path.is_file():
                raise GaliError(
                    f"--feature-model {path} does not exist; give a TorchScript file or a state dict "
                    "(with --feature-arch); nothing is downloaded"
                )
            self.feature_model = load_feature_model(path, options.feature_arch)
        self.inception = None
        if options.inception:
            self.inception = load_inception(options.inception, input_size=options.inception_input_size)
            self.inception_sha256 = file_sha256(self.inception.path)
        cfg, nets, self.weights = load_networks(checkpoint, device, ema=options.ema)
        self.G, self.E = nets.G.eval(), nets.E.eval()
        self.cfg = evaluation_config(cfg, tuple(options.data_overrides), origin=str(checkpoint))
        self.data = self.cfg.data
        for network in (self.feature_model, self.inception):
            if network is not None:
                network.to(device)
        self.recalibrated = 0
        self.images = 0  # images of the evaluation split's pass (all ranks), once known
        self.shared: dict[type, Any] = {}  # the Parts that several metrics share, by class (gali.engine.eval.metric)

    def batches(self, split: str, limit: int | None = None, masks: MaskArgs | None = None) -> SplitBatches:
        o = self.options
        return SplitBatches(
            self.data, split, batch_size=o.batch_size, device=self.device, seed=o.seed, limit=limit, masks=masks
        )

    def recalibrate(self) -> None:
        """``--bn-recalibrate N``: every rank recomputes the same statistics from the same N training batches."""
        o = self.options
        if o.bn_recalibrate:
            batches = self.batches("train", limit=o.bn_recalibrate * o.batch_size)
            self.recalibrated = recalibrate_batch_norm(self.G, self.E, ((b.x, b.labels) for b in batches))
            self.log(f"BatchNorm statistics of E and G recomputed on {self.recalibrated} training images")

    def unlabelled(self, metric: str, split: str) -> DataError:
        return DataError(
            f"metric {metric!r} needs labelled images; the {split} split of data source "
            f"{self.data.source!r} has no labels"
        )

    def common(self) -> dict[str, Any]:
        """The settings every per-image metric records."""
        o = self.options
        return {
            "split": o.split,
            "images": self.images,
            "batch_size": o.batch_size,
            "seed": o.seed,
            "bn_recalibrated_images": self.recalibrated,
            "weights": self.weights,
        }

    def feature_settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "feature_model": str(o.feature_model),
            "feature_arch": o.feature_arch,
            "feature_input_size": o.feature_input_size or self.data.resolution,
            "feature_resize": o.feature_resize,
        }

    def feature_mse(self, x: Tensor, y: Tensor) -> float:
        o = self.options
        return feature_mse(
            self.feature_model,
            x,
            y,
            input_size=o.feature_input_size,
            resize=o.feature_resize,
            name=f"the feature network {o.feature_model}",
        )

    @torch.no_grad()
    def identity_features(self, x: Tensor) -> np.ndarray:
        """The identity classifier's features: pixels, or the feature network's outputs when one is given."""
        if self.feature_model is None:
            return pixel_features(x)
        o = self.options
        features = network_features(
            self.feature_model,
            x,
            input_size=o.feature_input_size,
            resize=o.feature_resize,
            name=f"the feature network {o.feature_model}",
        )
        return features.cpu().numpy()
