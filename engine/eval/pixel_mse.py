"""pixel-mse: the reconstruction's MSE in [0, 1] space, z = μ_E(x), mean ± std over batches (docs/method.md §4.1)."""

from __future__ import annotations

from typing import Any

from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import BatchMean
from gali.engine.metrics import pixel_mse


class PixelMSE(BatchMean):
    name = "pixel-mse"
    about = "reconstruction pixel-MSE in [0, 1] space, z = mu_E(x), mean ± std over batches"

    def value(self, item: SplitItem) -> float:
        return pixel_mse(*item.reconstruction(self.ctx))  # summed in float64 over the batch's pixels

    def settings(self) -> dict[str, Any]:
        return {"space": "[0, 1]", "z": "mu"}


METRIC = PixelMSE
