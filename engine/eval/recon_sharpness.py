"""recon-sharpness: the reconstructions' edge energy over the real images', z = μ_E(x), mean ± std over batches.

1 is as sharp as the real images, below 1 blurred (:func:`gali.engine.metrics.reconstruction.sharpness`): read beside
pixel-MSE and recon-identity, which a blurred reconstruction of the right class can win.
"""

from __future__ import annotations

from typing import Any

from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import BatchMean
from gali.engine.metrics import sharpness


class ReconSharpness(BatchMean):
    name = "recon-sharpness"
    about = "edge energy of the reconstructions over the real images' (1: as sharp; below 1: blurred)"

    def value(self, item: SplitItem) -> float:
        return sharpness(*item.reconstruction(self.ctx))

    def settings(self) -> dict[str, Any]:
        return {"z": "mu", "edges": "mean |difference| of neighbouring pixels, horizontal and vertical"}


METRIC = ReconSharpness
