"""gali.engine.metrics: the evaluation metrics of docs/method.md §4.1 as pure functions.

Reconstruction pixel- and feature-MSE and the inpainting MSE (``reconstruction``), the linear probe
(``probe``), the reconstructions' identity (``identity``), FID and KID on Inception features (``fid``).
They sit below the training loop, whose snapshots measure the held-out figures; the evaluation
protocol that feeds them from checkpoints and data splits is ``gali.engine.eval``.
"""

from gali.engine.metrics.fid import (
    INCEPTION_INPUT_SIZE,
    InceptionFeatures,
    fid_implementation,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
    to_uint8_range,
)
from gali.engine.metrics.identity import (
    IdentityClassifier,
    IdentityResult,
    fit_identity_classifier,
    nearest_own_fraction,
    pixel_features,
)
from gali.engine.metrics.probe import PROBE_C_GRID, ProbeResult, linear_probe, probe_validation_size
from gali.engine.metrics.reconstruction import (
    Summary,
    feature_mse,
    held_out_metrics,
    masked_pixel_mse,
    network_features,
    pixel_mse,
    sharpness,
    summarize,
)

__all__ = [
    "INCEPTION_INPUT_SIZE",
    "PROBE_C_GRID",
    "IdentityClassifier",
    "IdentityResult",
    "InceptionFeatures",
    "ProbeResult",
    "Summary",
    "feature_mse",
    "fid_implementation",
    "fit_identity_classifier",
    "frechet_distance",
    "held_out_metrics",
    "kernel_inception_distance",
    "linear_probe",
    "load_inception",
    "masked_pixel_mse",
    "nearest_own_fraction",
    "network_features",
    "pixel_features",
    "pixel_mse",
    "probe_validation_size",
    "sharpness",
    "summarize",
    "to_uint8_range",
]
