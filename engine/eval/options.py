"""The settings of one evaluation (``gali eval``'s options), apart so that the metrics' modules can name them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gali.engine.metrics import INCEPTION_INPUT_SIZE
from gali.engine.metrics.logistic import LOGISTIC_EPOCHS


@dataclass
class EvalOptions:
    """Settings of one evaluation (the CLI's options; defaults follow docs/method.md §4.1).

    data_overrides: ``data.key=value`` strings applied on top of the checkpoint's config (e.g. a
                    moved ``data.root``); keys of other sections are rejected.
    feature_*:      the frozen feature network of feature-MSE (TorchScript, or a state dict with
                    ``feature_arch``), its input size (0 = the data resolution) and resize mode.
                    'nearest' matches the authors' SVHN evaluation code, the paper says bilinear
                    (docs/method.md §5 item 4).
    identity_images: the most training images the recon-identity classifier is fitted on.
    ema:            G and E are the checkpoint's moving averages where it has them (False: the live weights).
    bn_recalibrate: batches of the training split to recompute E's and G's BatchNorm statistics on
                    before measuring (0 = the checkpoint's statistics).
    probe_*:        labelled images per draw, validation images (None = min(10000, (N − labelled)/2)),
                    number of draws, and the most training images read for the probe.
    probe_logistic_*: probe-logistic's training images (None = the whole split), held-out images for choosing
                    its L2 weight (None = min(10000, N / 10)) and SGD epochs per fit.
    inception*:     the FID/KID network file (see :func:`gali.engine.metrics.fid.load_inception`) and its input size.
    fid_samples:    generated images; ``fid_reference_images``: the most real images of the split.
    kid_*:          KID subsets and subset size (capped at the smaller set).
    cache_dir:      where reference features (FID/KID's, probe-logistic's training features) are cached
                    (default ``$GALI_CACHE/fid``, ``~/.cache/gali/fid``).
    """

    split: str = "test"
    batch_size: int = 100
    seed: int = 0
    device: str = "auto"
    data_overrides: Sequence[str] = ()
    feature_model: str | None = None
    feature_arch: str | None = None
    feature_input_size: int = 0
    feature_resize: str = "nearest"
    identity_images: int = 20_000
    bn_recalibrate: int = 0
    ema: bool = True
    probe_labelled: int = 1000
    probe_validation: int | None = None
    probe_draws: int = 100
    probe_pool: int = 20_000
    probe_logistic_images: int | None = None
    probe_logistic_validation: int | None = None
    probe_logistic_epochs: int = LOGISTIC_EPOCHS
    inception: str | None = None
    inception_input_size: int = INCEPTION_INPUT_SIZE
    fid_samples: int = 10_000
    fid_reference_images: int = 50_000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache_dir: str | None = None
