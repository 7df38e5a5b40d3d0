"""inpaint: the pixel-MSE of G(μ_E(masked x)) over the masked pixels (and the feature-MSE of the composite with
``--feature-model``), mean ± std over batches, on the evaluation boxes of docs/method.md §5 item 5.

The boxes are drawn by position in the split (every rank draws all of them and takes its block's), or per sample
by the pipeline for runs trained with pipeline masks: either way an image's box does not depend on the ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gali.engine.eval.context import SplitItem
from gali.engine.eval.metric import Metric, in_batch_order
from gali.engine.metrics import masked_pixel_mse, summarize
from gali.engine.nets.inference import evaluation_box_params, inpaint
from gali.pipelines.masks import EVAL_MASK_MAX, EVAL_MASK_MIN, EVAL_MASK_RESOLUTION, MaskArgs, MaskSpec


class Inpaint(Metric):
    name = "inpaint"
    about = "inpainting pixel-MSE over the masked pixels (and feature-MSE of the composite with --feature-model)"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.boxes: Tensor | None = None  # by position in the split, or None (the pipeline's per-sample masks)
        self.values: list[tuple[int, tuple[float, float | None, Tensor]]] = []

    def masks(self) -> MaskArgs | None:
        """The evaluation boxes drawn per sample by the pipeline, for runs trained with pipeline masks."""
        if self.ctx.cfg.method.mask_source != "pipeline":
            return None
        side = self.ctx.data.resolution
        return MaskSpec(kind_weights=(0.0, 1.0, 0.0), seed=self.ctx.options.seed).args(1, side, side)

    def start(self, images: int) -> None:
        ctx = self.ctx
        if self.masks() is None:
            self.boxes = evaluation_box_params(images, ctx.data.resolution, seed=ctx.options.seed, device=ctx.device)

    def measure(self, item: SplitItem) -> None:
        ctx, batch = self.ctx, item.batch
        if batch.masks is not None:  # the pipeline's, one per sample: the same for any batch size or order
            params, kind = batch.masks[:, 0], "dense"
        else:
            params, kind = self.boxes[item.start : item.start + batch.x.shape[0]], "box"
        masked, _, composite = inpaint(
            ctx.G, ctx.E, batch.x, params, kind=kind, fill=ctx.cfg.method.mask_fill, labels=batch.labels
        )
        pixel = masked_pixel_mse(batch.x, composite, masked.mask)
        feature = ctx.feature_mse(batch.x, composite) if ctx.feature_model is not None else None
        self.values.append((item.index, (pixel, feature, masked.mask.mean((1, 2, 3)).cpu())))

    def local(self) -> list[tuple[int, tuple[float, float | None, Tensor]]]:
        return self.values

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        ctx = self.ctx
        pixel, feature, coverage = zip(*in_batch_order(parts), strict=True)
        with_features = ctx.feature_model is not None
        return {
            "pixel_mse": summarize(pixel).to_dict(),
            "feature_mse": summarize(feature).to_dict() if with_features else None,
            "mask": self._mask(torch.cat(coverage)),
            **(ctx.feature_settings() if with_features else {}),
            **ctx.common(),
        }

    def _mask(self, coverage: Tensor) -> dict[str, Any]:
        ctx = self.ctx
        mask = {
            "kind": "box",
            "sides": f"{EVAL_MASK_MIN}..{EVAL_MASK_MAX} on {EVAL_MASK_RESOLUTION}^2, "
            f"scaled to {ctx.data.resolution}^2, fully inside the image",
            "source": "drawn by position in the split"
            if self.boxes is not None
            else "drawn per sample by the pipeline (gali.pipelines.masks, kind eval_box)",
            "coverage": [round(float(coverage.min()), 4), round(float(coverage.max()), 4)],
            "seed": ctx.options.seed,
            "fill": ctx.cfg.method.mask_fill,
        }
        if self.boxes is not None:
            sides = self.boxes[:, 2:].cpu()
            mask["drawn_sides"] = [int(sides.min()), int(sides.max())]
        return mask

    @staticmethod
    def cells(r: dict[str, Any]) -> tuple[str, str]:
        pixel, feature, mask = r["pixel_mse"], r["feature_mse"], r["mask"]
        extra = f"; feature-MSE {feature['mean']:.5f} ± {feature['std']:.5f}" if feature else ""
        low, high = mask["coverage"]
        where = "per sample by the pipeline" if "drawn_sides" not in mask else "by position"
        return f"{pixel['mean']:.5f} ± {pixel['std']:.5f}", (
            f"masked pixels only; boxes drawn {where}, covering {100 * low:.0f}-{100 * high:.0f} % of an "
            f"image, seed {mask['seed']}, {r['images']} {r['split']} images{extra}"
        )


METRIC = Inpaint
