"""recon-identity: a linear classifier of real training images applied to the reconstructions of the evaluation split.

Each rank keeps its block's classifier features (pixels, or ``--feature-model``'s) of x and G(μ_E(x)) with the
labels; rank 0 joins them in batch order, fits the classifier on the training split and scores: the same
arrays as one process, so the accuracies are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import Metric, refuse_train_split
from gali.engine.metrics import IdentityClassifier, fit_identity_classifier
from gali.engine.nets.feature_models import resize_to


class ReconIdentity(Metric):
    name = "recon-identity"
    about = (
        "accuracy of a linear classifier of real training images on the reconstructions, "
        "beside its accuracy on the real images and the nearest-own-input fraction"
    )

    @classmethod
    def check(cls, options) -> None:
        refuse_train_split(cls.name, "fits its classifier", options)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.real: list[np.ndarray] = []
        self.recon: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def measure(self, item: SplitItem) -> None:
        labels = item.labels(self.ctx, self.name)
        x_g, x_hat = item.reconstruction(self.ctx)
        self.real.append(self.ctx.identity_features(x_g))
        self.recon.append(self.ctx.identity_features(x_hat))
        self.labels.append(labels.cpu().numpy())

    def local(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        return self.real, self.recon, self.labels

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        real, recon, labels = (np.concatenate([a for part in parts for a in part[i]]) for i in range(3))
        result = self._classifier().score(real, recon, labels)
        ctx = self.ctx
        features = "pixels" if ctx.feature_model is None else ctx.feature_settings()
        return {**result.to_dict(), **ctx.common(), "features": features}

    def _classifier(self) -> IdentityClassifier:
        ctx, limit = self.ctx, self.ctx.options.identity_images
        classifier = fit_identity_classifier(
            ((b.x, b.labels) for b in ctx.batches("train", limit=limit)),
            lambda x: ctx.identity_features(resize_to(x, ctx.G.resolution)),
            limit,
        )
        if classifier is None:
            raise ctx.unlabelled(self.name, "train")
        return classifier

    @staticmethod
    def cells(r: dict[str, Any]) -> tuple[str, str]:
        return (
            f"{r['accuracy']:.3f}",
            f"real images {r['ceiling']:.3f}, chance {r['chance']:.3f}; nearest own "
            f"input {r['nearest']:.3f}; {r['images']} {r['split']} images",
        )


METRIC = ReconIdentity
