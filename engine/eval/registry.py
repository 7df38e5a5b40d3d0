"""The metrics of ``gali eval``: one module of ``gali.engine.eval`` each, defining ``METRIC`` (a
:class:`gali.engine.eval.metric.Metric`). A new metric is its module and one line here; the order is ``--help``'s."""

from __future__ import annotations

from importlib import import_module

from gali.engine.eval.metric import Metric

MODULES = (
    "pixel_mse",
    "recon_sharpness",
    "feature_mse",
    "recon_identity",
    "probe",
    "probe_logistic",
    "fid",
    "kid",
    "inpainting",
)

REGISTRY: dict[str, type[Metric]] = {
    metric.name: metric for metric in (import_module(f"gali.engine.eval.{module}").METRIC for module in MODULES)
}
