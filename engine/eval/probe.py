"""probe: the paper's linear-SVM probe (docs/method.md §4.1) on E's features: draws of labelled training images, C
chosen on validation images, test error on the evaluation split. Each rank extracts its block's test features;
rank 0 joins them in batch order, reads the training pool and fits (libsvm, precomputed linear kernel)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import Metric, refuse_train_split
from gali.engine.metrics import linear_probe, probe_validation_size


class Probe(Metric):
    name = "probe"
    about = "linear-SVM test error (%) on the encoder's last hidden layers and output"

    @classmethod
    def check(cls, options) -> None:
        refuse_train_split(cls.name, "fits its SVMs", options)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        o = ctx.options
        self.train = ctx.batches("train", limit=o.probe_pool)  # sized before any image is read
        probe_validation_size(self.train.num_images, o.probe_labelled, o.probe_validation)
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    @torch.no_grad()
    def features(self, x: Tensor) -> np.ndarray:
        return torch.cat(self.ctx.E.features(x), dim=1).float().cpu().numpy()

    def measure(self, item: SplitItem) -> None:
        labels = item.labels(self.ctx, self.name)
        self.x.append(self.features(item.batch.x))
        self.y.append(labels.cpu().numpy())

    def local(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self.x, self.y

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        ctx, o = self.ctx, self.ctx.options
        test_x, test_y = (np.concatenate([a for part in parts for a in part[i]]) for i in range(2))
        train_x, train_y = [], []
        for batch in self.train:
            if batch.labels is None:
                raise ctx.unlabelled(self.name, "train")
            train_x.append(self.features(batch.x))
            train_y.append(batch.labels.cpu().numpy())
        ctx.log(
            f"probe: {o.probe_draws} draws of {o.probe_labelled} labelled images, features of width {test_x.shape[1]}"
        )
        result = linear_probe(
            np.concatenate(train_x),
            np.concatenate(train_y),
            test_x,
            test_y,
            labelled=o.probe_labelled,
            validation=o.probe_validation,
            draws=o.probe_draws,
            seed=o.seed,
        )
        return {
            **result.to_dict(),
            "split": o.split,
            "train_images_read": sum(len(y) for y in train_y),
            "weights": ctx.weights,
            "bn_recalibrated_images": ctx.recalibrated,
            "features": "E.features(x): [out (mu, log sigma), last three hidden layers], concatenated",
        }

    @staticmethod
    def cells(r: dict[str, Any]) -> tuple[str, str]:
        return (
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} %",
            f"{r['n']} draws of {r['labelled']} labelled, {r['validation']} validation, {r['test']} test images",
        )


METRIC = Probe
