"""fid: the Fréchet distance between Inception features of G's samples and of the evaluation split."""

from __future__ import annotations

from typing import Any

from gali.engine.eval.inception import InceptionMetric
from gali.engine.metrics import frechet_distance


class FID(InceptionMetric):
    name = "fid"
    about = "FID of samples G(z) against the evaluation split (needs --inception)"

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        inputs = self.inputs()
        return {"value": frechet_distance(inputs.real, inputs.fake), **inputs.settings}

    @classmethod
    def cells(cls, r: dict[str, Any]) -> tuple[str, str]:
        return f"{r['value']:.3f}", cls.details(r)


METRIC = FID
