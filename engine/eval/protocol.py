"""``gali eval``: load a checkpoint and a data split, run the selected metrics, print a table, write JSON.

The metrics are pure functions in :mod:`gali.engine.metrics`; this module feeds them from a checkpoint's networks and a
data split, following docs/method.md §4.1 (every choice is recorded in the JSON). The evaluation split is read whole,
last partial batch included, in a seeded order, in batches of ``batch_size`` (100: the paper's ± is the std over batches
of 100); E and G run in eval mode and reconstructions use z = μ_E(x). ``bn_recalibrate`` > 0 first recomputes E's and
G's BatchNorm statistics on that many training batches, in memory only. FID/KID reference features are cached in a file
keyed by the data set, split, resolution, image count, seed and the network file's SHA-256.
The config is the checkpoint's whole config with the ``data.key=value`` overrides on top (a moved ``data.root``),
as ``gali train --resume`` applies its overrides. The JSON goes next to the checkpoint (``checkpoint-N.eval.json``)
with that config; a later evaluation of other metrics is merged into it, each metric keeping the settings it was
measured with. A figure that comes out NaN or infinite is written as null (strict JSON) and listed in
``EvalReport.non_finite``; ``gali eval`` then exits 2 naming it and the checkpoint (:meth:`EvalReport.check_finite`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gali.engine.errors import DataError, GaliError
from gali.engine.files import atomic_write, file_sha256, write_text_atomic
from gali.engine.loop.checkpoint import load_networks
from gali.engine.loop.config import Config, config_from_dict
from gali.engine.loop.runtime import resolve_device
from gali.engine.loop.snapshots import sample_features
from gali.engine.metrics import (
    INCEPTION_INPUT_SIZE,
    IdentityClassifier,
    feature_mse,
    fid_implementation,
    fit_identity_classifier,
    frechet_distance,
    kernel_inception_distance,
    linear_probe,
    load_inception,
    masked_pixel_mse,
    network_features,
    pixel_features,
    pixel_mse,
    probe_validation_size,
    summarize,
    to_uint8_range,
)
from gali.engine.nets.feature_models import load_feature_model, resize_to
from gali.engine.nets.inference import (
    evaluation_box_params,
    inpaint,
    recalibrate_batch_norm,
    reconstruction_chain,
)
from gali.pipelines import SplitBatches, cache_root, default_digits_root
from gali.pipelines.config import DataConfig
from gali.pipelines.masks import EVAL_MASK_MAX, EVAL_MASK_MIN, EVAL_MASK_RESOLUTION, MaskArgs, MaskSpec

# The metrics of ``gali eval``, with what each measures.
METRICS: dict[str, str] = {
    "pixel-mse": "reconstruction pixel-MSE in [0, 1] space, z = mu_E(x), mean ± std over batches",
    "feature-mse": "reconstruction feature-MSE with the network given by --feature-model",
    "recon-identity": "accuracy of a linear classifier of real training images on the reconstructions, "
    "beside its accuracy on the real images and the nearest-own-input fraction",
    "probe": "linear-SVM test error (%) on the encoder's last hidden layers and output",
    "fid": "FID of samples G(z) against the evaluation split (needs --inception)",
    "kid": "KID of samples G(z) against the evaluation split (needs --inception)",
    "inpaint": "inpainting pixel-MSE over the masked pixels (and feature-MSE of the composite with --feature-model)",
}


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
    inception*:     the FID/KID network file (see :func:`gali.engine.metrics.fid.load_inception`) and its input size.
    fid_samples:    generated images; ``fid_reference_images``: the most real images of the split.
    kid_*:          KID subsets and subset size (capped at the smaller set).
    cache_dir:      where reference features are cached (default ``$GALI_CACHE/fid``, ``~/.cache/gali/fid``).
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
    inception: str | None = None
    inception_input_size: int = INCEPTION_INPUT_SIZE
    fid_samples: int = 10_000
    fid_reference_images: int = 50_000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache_dir: str | None = None


@dataclass
class EvalReport:
    """What one evaluation produced: the results by metric name, the table, where the JSON went, and the
    figures that came out NaN or infinite (``'pixel-mse.mean'``; null in the JSON, NaN or inf in ``results``)."""

    checkpoint: Path
    results: dict[str, dict[str, Any]]
    table: str
    json_path: Path
    non_finite: tuple[str, ...] = ()

    def check_finite(self) -> None:
        """Raise :class:`GaliError` naming the non-finite figures and the checkpoint, if there are any.

        A separate step, so the caller shows the table first and ``gali reproduce`` can still compare
        a diverged method with the others.
        """
        if self.non_finite:
            raise GaliError(
                f"checkpoint {self.checkpoint}: {', '.join(self.non_finite)} came out non-finite (NaN or inf; "
                f"written as null in {self.json_path}): its networks give NaN or inf on these images. Evaluate "
                "an earlier checkpoint of the run, or try --live or --bn-recalibrate N where only the moving "
                "averages or the BatchNorm statistics are bad"
            )


def parse_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """``'pixel-mse,probe'`` or a list of names -> the names, checked against :data:`METRICS`."""
    if isinstance(names, str):
        names = names.split(",")
    parsed = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in parsed if n not in METRICS]
    if unknown or not parsed:
        raise GaliError(
            f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'} in --metrics; "
            f"accepted (comma-separated): {', '.join(METRICS)}"
        )
    return parsed


def _check_options(metrics: tuple[str, ...], options: EvalOptions) -> None:
    """Reject contradictory or missing options before any work, naming the option."""
    for name in (
        "batch_size",
        "identity_images",
        "probe_labelled",
        "probe_draws",
        "probe_pool",
        "inception_input_size",
        "fid_samples",
        "fid_reference_images",
        "kid_subsets",
        "kid_subset_size",
    ):
        value = getattr(options, name)
        if value < 1:
            raise GaliError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if options.split not in ("train", "test"):
        raise GaliError(f"--split must be 'train' or 'test'; got {options.split!r}")
    if "feature-mse" in metrics and not options.feature_model:
        raise GaliError(
            "metric 'feature-mse' needs --feature-model PATH (a TorchScript file, or a state dict "
            "with --feature-arch); nothing is downloaded"
        )
    if {"fid", "kid"} & set(metrics) and not options.inception:
        raise GaliError(
            "metrics 'fid' and 'kid' need --inception PATH, a local TorchScript Inception "
            "(clean-fid/StyleGAN3 inception-2015-12-05.pt); nothing is downloaded"
        )
    if "probe" in metrics and options.split == "train":
        raise GaliError(
            "metric 'probe' fits its SVMs on the training split and tests on --split; "
            "use --split test (a held-out split) for it"
        )
    if options.bn_recalibrate < 0:
        raise GaliError(f"--bn-recalibrate must be >= 0 (batches of the training split); got {options.bn_recalibrate}")
    if "recon-identity" in metrics and options.split == "train":
        raise GaliError(
            "metric 'recon-identity' fits its classifier on the training split and tests on --split; "
            "use --split test (a held-out split) for it"
        )
    if options.feature_resize not in ("nearest", "bilinear"):
        raise GaliError(f"--feature-resize must be 'nearest' or 'bilinear'; got {options.feature_resize!r}")


def evaluation_config(cfg: Config, overrides: Sequence[str], *, origin: str) -> Config:
    """The checkpoint's whole config with ``data.key=value`` overrides on top, validated as a whole.

    The whole config, so the data are checked against the checkpoint's own model (its arch and resolution),
    not the default one; ``origin`` (the checkpoint's path) names it in errors.
    """
    bad = [o for o in overrides if not o.strip().startswith("data.")]
    if bad:
        raise GaliError(f"only data.* overrides apply to an evaluation; got {', '.join(bad)}")
    return config_from_dict(cfg.to_dict(), origin=origin, overrides=overrides)


def _dataset_identity(data: DataConfig) -> dict[str, Any]:
    """What names a data set in the reference cache key: its source, resolved root and backend."""
    if data.root:
        root = str(Path(data.root).expanduser().resolve())
    elif data.source == "digits":
        root = str(default_digits_root(data.resolution).resolve())
    else:
        root = None
    return {"source": data.source, "root": root, "backend": data.backend, "resolution": data.resolution}


def default_cache_dir() -> Path:
    """``$GALI_CACHE/fid`` (``~/.cache/gali/fid`` by default), beside the digits' cache."""
    return cache_root() / "fid"


@dataclass
class _SplitMeasures:
    """What one pass over the evaluation split measured: per-batch values, probe features, Inception features."""

    per_batch: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in ("pixel", "feature", "inpaint", "inpaint_feature")}
    )
    identity: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"real": [], "recon": [], "labels": []})
    probe_x: list[np.ndarray] = field(default_factory=list)
    probe_y: list[np.ndarray] = field(default_factory=list)
    reference_features: list[Tensor] = field(default_factory=list)
    boxes: Tensor | None = None  # the evaluation boxes by position in the split, or None (pipeline masks)
    coverage: list[Tensor] = field(default_factory=list)  # the inpainting masks' fraction of each image
    images: int = 0


class _Evaluation:
    """One run of :func:`evaluate`: the loaded networks, the data config and the options."""

    def __init__(
        self, checkpoint: Path, metrics: tuple[str, ...], options: EvalOptions, log: Callable[[str], None]
    ) -> None:
        self.metrics = metrics
        self.options = options
        self.log = log
        # Load every user-supplied file first, so a wrong path fails before any work.
        self.feature_model = None
        if options.feature_model:
            path = Path(options.feature_model).expanduser()
            if not path.is_file():
                raise GaliError(
                    f"--feature-model {path} does not exist; give a TorchScript file or a state dict "
                    "(with --feature-arch); nothing is downloaded"
                )
            self.feature_model = load_feature_model(path, options.feature_arch)
        self.inception = None
        if options.inception:
            self.inception = load_inception(options.inception, input_size=options.inception_input_size)
            self.inception_sha256 = file_sha256(self.inception.path)
        self.device = resolve_device(options.device)
        cfg, nets, self.weights = load_networks(checkpoint, self.device, ema=options.ema)
        self.G, self.E = nets.G.eval(), nets.E.eval()
        self.cfg = evaluation_config(cfg, options.data_overrides, origin=str(checkpoint))
        self.data = self.cfg.data
        self.probe_train = None
        if "probe" in metrics:  # size the probe's sets before reading any image
            self.probe_train = self._batches("train", limit=options.probe_pool)
            probe_validation_size(self.probe_train.num_images, options.probe_labelled, options.probe_validation)
        if self.feature_model is not None:
            self.feature_model.to(self.device)
        if self.inception is not None:
            self.inception.to(self.device)
        self.recalibrated = 0
        if options.bn_recalibrate:
            batches = self._batches("train", limit=options.bn_recalibrate * options.batch_size)
            self.recalibrated = recalibrate_batch_norm(self.G, self.E, ((b.x, b.labels) for b in batches))
            log(f"BatchNorm statistics of E and G recomputed on {self.recalibrated} training images")
        self.classifier = self._identity_classifier() if "recon-identity" in metrics else None

    def _batches(self, split: str, limit: int | None = None, masks: MaskArgs | None = None) -> SplitBatches:
        o = self.options
        return SplitBatches(
            self.data, split, batch_size=o.batch_size, device=self.device, seed=o.seed, limit=limit, masks=masks
        )

    def _pipeline_masks(self) -> MaskArgs | None:
        """The evaluation boxes drawn per sample by the pipeline, for runs trained with pipeline masks."""
        if self.cfg.method.mask_source != "pipeline":
            return None
        side = self.data.resolution
        return MaskSpec(kind_weights=(0.0, 1.0, 0.0), seed=self.options.seed).args(1, side, side)

    def _feature_mse(self, x: Tensor, y: Tensor) -> float:
        o = self.options
        return feature_mse(
            self.feature_model,
            x,
            y,
            input_size=o.feature_input_size,
            resize=o.feature_resize,
            name=f"the feature network {o.feature_model}",
        )

    @torch.no_grad()
    def _identity_features(self, x: Tensor) -> np.ndarray:
        """The identity classifier's features: pixels, or the feature network's outputs when one is given."""
        if self.feature_model is None:
            return pixel_features(x)
        o = self.options
        return (
            network_features(
                self.feature_model,
                x,
                input_size=o.feature_input_size,
                resize=o.feature_resize,
                name=f"the feature network {o.feature_model}",
            )
            .cpu()
            .numpy()
        )

    def _identity_classifier(self) -> IdentityClassifier:
        limit = self.options.identity_images
        classifier = fit_identity_classifier(
            ((b.x, b.labels) for b in self._batches("train", limit=limit)),
            lambda x: self._identity_features(resize_to(x, self.G.resolution)),
            limit,
        )
        if classifier is None:
            raise DataError(
                f"metric 'recon-identity' needs labelled images; the train split of data source "
                f"{self.data.source!r} has no labels"
            )
        return classifier

    @torch.no_grad()
    def _probe_features(self, x: Tensor) -> np.ndarray:
        return torch.cat(self.E.features(x), dim=1).float().cpu().numpy()

    @torch.no_grad()
    def run(self) -> dict[str, dict[str, Any]]:
        o, wanted = self.options, set(self.metrics)
        reference = self._cached_reference() if wanted & {"fid", "kid"} else None
        split = self._read_split(need_reference=bool(wanted & {"fid", "kid"}) and reference is None)
        if split.reference_features:
            reference = self._store_reference(torch.cat(split.reference_features))

        results: dict[str, dict[str, Any]] = {}
        common = {
            "split": o.split,
            "images": split.images,
            "batch_size": o.batch_size,
            "seed": o.seed,
            "bn_recalibrated_images": self.recalibrated,
            "weights": self.weights,
        }
        if "pixel-mse" in wanted:
            results["pixel-mse"] = {
                **summarize(split.per_batch["pixel"]).to_dict(),
                **common,
                "space": "[0, 1]",
                "z": "mu",
            }
        if "feature-mse" in wanted:
            results["feature-mse"] = {
                **summarize(split.per_batch["feature"]).to_dict(),
                **common,
                **self._feature_settings(),
            }
        if "recon-identity" in wanted:
            assert self.classifier is not None
            identity = split.identity
            result = self.classifier.score(
                np.concatenate(identity["real"]), np.concatenate(identity["recon"]), np.concatenate(identity["labels"])
            )
            features = "pixels" if self.feature_model is None else self._feature_settings()
            results["recon-identity"] = {**result.to_dict(), **common, "features": features}
        if "inpaint" in wanted:
            results["inpaint"] = {**self._inpaint_result(split), **common}
        if "probe" in wanted:
            results["probe"] = self._probe(np.concatenate(split.probe_x), np.concatenate(split.probe_y))
        if wanted & {"fid", "kid"}:
            results.update(self._fid_kid(reference))
        return results

    def _read_split(self, *, need_reference: bool) -> _SplitMeasures:
        """One pass over the evaluation split, measuring every wanted per-batch metric."""
        o, wanted = self.options, set(self.metrics)
        per_image = wanted & {"pixel-mse", "feature-mse", "recon-identity", "inpaint", "probe"}
        measured = _SplitMeasures()
        if not per_image and not need_reference:
            return measured
        pipeline_masks = self._pipeline_masks() if "inpaint" in wanted else None
        batches = self._batches(o.split, limit=None if per_image else o.fid_reference_images, masks=pipeline_masks)
        if "inpaint" in wanted and pipeline_masks is None:
            measured.boxes = evaluation_box_params(
                batches.num_images, self.data.resolution, seed=o.seed, device=self.device
            )
        for batch in batches:
            x, per_batch = batch.x, measured.per_batch
            if wanted & {"pixel-mse", "feature-mse", "recon-identity"}:
                # x_g: x at G's resolution; a class-conditional G takes x's labels
                x_g, x_hat = reconstruction_chain(self.G, self.E, x, depth=1, labels=batch.labels)
                if "pixel-mse" in wanted:
                    per_batch["pixel"].append(pixel_mse(x_g, x_hat))
                if "feature-mse" in wanted:
                    per_batch["feature"].append(self._feature_mse(x_g, x_hat))
                if "recon-identity" in wanted:
                    if batch.labels is None:
                        raise DataError(
                            f"metric 'recon-identity' needs labelled images; the {o.split} split of "
                            f"data source {self.data.source!r} has no labels"
                        )
                    measured.identity["real"].append(self._identity_features(x_g))
                    measured.identity["recon"].append(self._identity_features(x_hat))
                    measured.identity["labels"].append(batch.labels.cpu().numpy())
            if "inpaint" in wanted:
                if batch.masks is not None:  # the pipeline's, one per sample: the same for any batch size or order
                    params, kind = batch.masks[:, 0], "dense"
                else:
                    params, kind = measured.boxes[measured.images : measured.images + x.shape[0]], "box"
                masked, _, composite = inpaint(
                    self.G, self.E, x, params, kind=kind, fill=self.cfg.method.mask_fill, labels=batch.labels
                )
                per_batch["inpaint"].append(masked_pixel_mse(x, composite, masked.mask))
                measured.coverage.append(masked.mask.mean((1, 2, 3)).cpu())
                if self.feature_model is not None:
                    per_batch["inpaint_feature"].append(self._feature_mse(x, composite))
            if "probe" in wanted:
                if batch.labels is None:
                    raise DataError(
                        f"metric 'probe' needs labelled images; the {o.split} split of data source "
                        f"{self.data.source!r} has no labels"
                    )
                measured.probe_x.append(self._probe_features(x))
                measured.probe_y.append(batch.labels.cpu().numpy())
            if need_reference and measured.images < o.fid_reference_images:
                take = x[: o.fid_reference_images - measured.images]
                measured.reference_features.append(self.inception(to_uint8_range(take)).cpu())
            measured.images += x.shape[0]
        return measured

    def _inpaint_result(self, split: _SplitMeasures) -> dict[str, Any]:
        with_features = self.feature_model is not None
        coverage = torch.cat(split.coverage)
        mask = {
            "kind": "box",
            "sides": f"{EVAL_MASK_MIN}..{EVAL_MASK_MAX} on {EVAL_MASK_RESOLUTION}^2, "
            f"scaled to {self.data.resolution}^2, fully inside the image",
            "source": "drawn by position in the split"
            if split.boxes is not None
            else "drawn per sample by the pipeline (gali.pipelines.masks, kind eval_box)",
            "coverage": [round(float(coverage.min()), 4), round(float(coverage.max()), 4)],
            "seed": self.options.seed,
            "fill": self.cfg.method.mask_fill,
        }
        if split.boxes is not None:
            sides = split.boxes[:, 2:].cpu()
            mask["drawn_sides"] = [int(sides.min()), int(sides.max())]
        return {
            "pixel_mse": summarize(split.per_batch["inpaint"]).to_dict(),
            "feature_mse": summarize(split.per_batch["inpaint_feature"]).to_dict() if with_features else None,
            "mask": mask,
            **(self._feature_settings() if with_features else {}),
        }

    def _feature_settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "feature_model": str(o.feature_model),
            "feature_arch": o.feature_arch,
            "feature_input_size": o.feature_input_size or self.data.resolution,
            "feature_resize": o.feature_resize,
        }

    def _probe(self, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
        o = self.options
        train_x: list[np.ndarray] = []
        train_y: list[np.ndarray] = []
        for batch in self.probe_train:
            if batch.labels is None:
                raise DataError(
                    f"metric 'probe' needs labelled images; the train split of data source "
                    f"{self.data.source!r} has no labels"
                )
            train_x.append(self._probe_features(batch.x))
            train_y.append(batch.labels.cpu().numpy())
        self.log(
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
            "weights": self.weights,
            "bn_recalibrated_images": self.recalibrated,
            "features": "E.features(x): [out (mu, log sigma), last three hidden layers], concatenated",
        }

    # -- FID / KID -----------------------------------------------------------------------------

    def _reference_key(self) -> dict[str, Any]:
        o = self.options
        assert self.inception is not None
        return {
            "data": _dataset_identity(self.data),
            "split": o.split,
            "images": o.fid_reference_images,
            "seed": o.seed,
            "network_sha256": self.inception_sha256,
            "input_size": self.inception.input_size,
            "format": 1,
        }

    def _reference_path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else default_cache_dir()
        return folder / f"reference-{digest}.pt"

    def _cached_reference(self) -> tuple[Tensor, Path, bool] | None:
        key = self._reference_key()
        path = self._reference_path(key)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache file is rebuilt, not fatal
            self.log(f"reference cache {path} unreadable ({exc}); recomputing it")
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            self.log(f"reference cache {path} has another key; recomputing it")
            return None
        self.log(f"reference features from cache {path}")
        return stored["features"], path, True

    def _store_reference(self, features: Tensor) -> tuple[Tensor, Path, bool]:
        key = self._reference_key()
        path = self._reference_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"key": key, "features": features}, tmp))
        self.log(f"reference features of {len(features)} images cached in {path}")
        return features, path, False

    def _generated_features(self) -> Tensor:
        """Drawn as the training snapshots draw them (run.snapshot_metrics): the same samples for the same seed."""
        o = self.options
        assert self.inception is not None
        return sample_features(
            self.G,
            self.inception,
            o.fid_samples,
            latent_dim=self.cfg.model.latent_dim,
            label_classes=self.cfg.model.label_classes,
            batch_size=o.batch_size,
            seed=o.seed,
            device=self.device,
        )

    def _fid_kid(self, reference: tuple[Tensor, Path, bool]) -> dict[str, dict[str, Any]]:
        o = self.options
        assert self.inception is not None
        real, cache, reused = reference
        fake = self._generated_features()
        settings = {
            "implementation": fid_implementation(),
            "network": str(self.inception.path),
            "network_sha256": self.inception_sha256,
            "network_input": self.inception.describe(),
            "num_features": self.inception.num_features,
            "generated": len(fake),
            "reference": {
                "split": o.split,
                "images": len(real),
                "seed": o.seed,
                "cache": str(cache),
                "cache_reused": reused,
            },
            "z_seed": o.seed,
            "weights": self.weights,
            "bn_recalibrated_images": self.recalibrated,
        }
        results: dict[str, dict[str, Any]] = {}
        if "fid" in self.metrics:
            results["fid"] = {"value": frechet_distance(real, fake), **settings}
        if "kid" in self.metrics:
            mean, std, size = kernel_inception_distance(
                real, fake, subsets=o.kid_subsets, subset_size=o.kid_subset_size, seed=o.seed
            )
            results["kid"] = {"mean": mean, "std": std, "subsets": o.kid_subsets, "subset_size": size, **settings}
        return results


def _table_cells(name: str, r: dict[str, Any]) -> tuple[str, str]:
    """(value, details) cells of one metric's table row."""
    if name in ("pixel-mse", "feature-mse"):
        return f"{r['mean']:.5f} ± {r['std']:.5f}", f"{r['n']} batches, {r['images']} {r['split']} images"
    if name == "inpaint":
        pixel = r["pixel_mse"]
        cell = f"{pixel['mean']:.5f} ± {pixel['std']:.5f}"
        feature = r["feature_mse"]
        extra = f"; feature-MSE {feature['mean']:.5f} ± {feature['std']:.5f}" if feature else ""
        mask = r["mask"]
        low, high = mask["coverage"]
        where = "per sample by the pipeline" if "drawn_sides" not in mask else "by position"
        return cell, (
            f"masked pixels only; boxes drawn {where}, covering {100 * low:.0f}-{100 * high:.0f} % of an "
            f"image, seed {mask['seed']}, {r['images']} {r['split']} images{extra}"
        )
    if name == "recon-identity":
        return (
            f"{r['accuracy']:.3f}",
            f"real images {r['ceiling']:.3f}, chance {r['chance']:.3f}; nearest own "
            f"input {r['nearest']:.3f}; {r['images']} {r['split']} images",
        )
    if name == "probe":
        return (
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} %",
            f"{r['n']} draws of {r['labelled']} labelled, {r['validation']} validation, {r['test']} test images",
        )
    ref = r["reference"]
    details = f"{r['generated']} generated vs {ref['images']} {ref['split']} images; {r['implementation']}"
    if name == "fid":
        return f"{r['value']:.3f}", details
    return f"{r['mean']:.5f} ± {r['std']:.5f}", f"{r['subsets']} subsets of {r['subset_size']}; {details}"


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, one row per metric: name, value (mean ± std where there is one), details."""
    rows = [("metric", "value", "details")] + [(name, *_table_cells(name, r)) for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)


def _finite_or_null(value: Any, path: str, found: list[str]) -> Any:
    """``value`` with each NaN or infinite float made None (null in strict JSON); their dotted paths go to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item, f"{path}.{key}", found) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item, f"{path}[{i}]", found) for i, item in enumerate(value)]
    return value


def _write_json(path: Path, checkpoint: Path, config: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Merge ``results`` into the JSON at ``path`` (same checkpoint), written atomically."""
    previous: dict[str, Any] = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("metrics", {})
        except ValueError:
            previous = {}
    document = {"checkpoint": str(checkpoint), "config": config, "metrics": {**previous, **results}}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def evaluate(
    checkpoint: str | Path,
    metrics: str | Sequence[str] = ("pixel-mse",),
    options: EvalOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> EvalReport:
    """Run ``metrics`` on ``checkpoint``; print nothing but ``log`` lines, return the results and table.

    The JSON is written next to the checkpoint as ``<checkpoint stem>.eval.json``. Raises
    :class:`GaliError` (or a subclass) naming the path, option or value for every bad input:
    a missing checkpoint, feature network or Inception file, an unknown metric, a feature network
    with the wrong output shape, too few labelled images for the probe. A figure that comes out
    non-finite does not raise: it is null in the JSON and named in ``non_finite`` (see
    :meth:`EvalReport.check_finite`).
    """
    options = options or EvalOptions()
    names = parse_metrics(metrics)
    _check_options(names, options)
    checkpoint = Path(checkpoint)
    evaluation = _Evaluation(checkpoint, names, options, log)
    results = evaluation.run()
    results = {name: results[name] for name in names}
    json_path = checkpoint.with_name(checkpoint.name.removesuffix(".pt") + ".eval.json")
    non_finite: list[str] = []
    stored = {name: _finite_or_null(result, name, non_finite) for name, result in results.items()}
    _write_json(json_path, checkpoint, evaluation.cfg.to_dict(), stored)
    return EvalReport(
        checkpoint=checkpoint,
        results=results,
        table=metrics_table(results),
        json_path=json_path,
        non_finite=tuple(non_finite),
    )
