"""kid: the kernel Inception distance between G's samples and the evaluation split, mean ± std over subsets."""

from __future__ import annotations

from typing import Any

from gali.engine.eval.inception import InceptionMetric
from gali.engine.metrics import kernel_inception_distance


class KID(InceptionMetric):
    name = "kid"
    about = "KID of samples G(z) against the evaluation split (needs --inception)"

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        o, inputs = self.ctx.options, self.inputs()
        mean, std, size = kernel_inception_distance(
            inputs.real, inputs.fake, subsets=o.kid_subsets, subset_size=o.kid_subset_size, seed=o.seed
        )
        return {"mean": mean, "std": std, "subsets": o.kid_subsets, "subset_size": size, **inputs.settings}

    @classmethod
    def cells(cls, r: dict[str, Any]) -> tuple[str, str]:
        return f"{r['mean']:.5f} ± {r['std']:.5f}", f"{r['subsets']} subsets of {r['subset_size']}; {cls.details(r)}"


METRIC = KID
