"""feature-mse: the reconstruction's MSE in the features of a frozen network (``--feature-model``), mean ± std over
batches."""

from __future__ import annotations

from typing import Any

from gali.engine.errors import GaliError
from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import BatchMean


class FeatureMSE(BatchMean):
    name = "feature-mse"
    about = "reconstruction feature-MSE with the network given by --feature-model"

    @classmethod
    def check(cls, options) -> None:
        if not options.feature_model:
            raise GaliError(
                "metric 'feature-mse' needs --feature-model PATH (a TorchScript file, or a state dict "
                "with --feature-arch); nothing is downloaded"
            )

    def value(self, item: SplitItem) -> float:
        return self.ctx.feature_mse(*item.reconstruction(self.ctx))

    def settings(self) -> dict[str, Any]:
        return self.ctx.feature_settings()


METRIC = FeatureMSE
