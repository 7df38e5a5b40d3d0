"""The run's whole config: the ``[run]`` section (the loop's) and every owner's section, from a preset.

:class:`Config` gathers the sections where the code that reads each one defines it (``data`` in
gali.pipelines, ``model`` in engine.nets, ``method`` in engine.method, ``optim`` and ``compute`` in
engine.step, ``run`` here), so the one place that knows them all is the loop that hands them out.
It is loaded from a preset TOML plus ``section.key=value`` overrides through the machinery of
:mod:`gali.engine.config`; every value is validated before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from gali.engine.config import (
    check_choice,
    check_positive,
    dump_sections,
    fill_sections,
    packaged_names,
    read_toml,
    section_names,
)
from gali.engine.errors import ConfigError
from gali.engine.loop.signals import parse_duration
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import PAPER_ARCHS, ModelConfig
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.pipelines.config import DataConfig

DEVICES = ("auto", "cpu", "cuda")
TENSORBOARD_MODES = ("auto", "on", "off")
MFU_MODES = ("auto", "on", "off")
PROGRESS_MODES = ("auto", "bar", "lines")
REQUEUE_MODES = ("auto", "on", "off")
# The metrics of `gali eval` (gali.engine.eval.protocol.METRICS) a snapshot can run: those of generated samples.
SNAPSHOT_METRICS = ("fid", "kid")
# Deprecated keys and the keys that replaced them; reading one warns and sets the new key.
ALIASES = {"method.kernel_impl": "compute.kernel_impl", "data.channels_last": "compute.channels_last"}


@dataclass
class RunConfig:
    """The training loop: duration in kimg (thousands of real images seen), intervals, output.

    tick_kimg:     how often the step statistics are read (one host sync), logged and shown.
    snapshot_kimg: how often a checkpoint, the PNG grids and the held-out metrics are written.
    grid_size:     the sample grid is grid_size x grid_size; reconstruction and inpainting grids
                   have grid_size columns.
    tensorboard:   'auto' (write TensorBoard events when the tensorboard package is installed),
                   'on' (require it: pip install 'gali[tensorboard]') or 'off'.
    progress:      'auto' (a one-line bar on a terminal, plain lines otherwise), 'bar' or 'lines'.
    max_bad_ticks: stop the run after this many consecutive ticks with skipped (non-finite) steps,
                   keeping the last checkpoint written before them (0 = never stop).
    keep_checkpoints: keep the newest N checkpoints of the run folder (0 = keep every one) ...
    milestone_kimg: ... and, every this many kimg, the first checkpoint at or after it, forever (0 = none).
    snapshot_bn_recalibrate: N > 0 measures each snapshot's held-out figures a second time with E's and G's
                   BatchNorm statistics recomputed on N training batches (on copies: training is untouched).
    ema_kimg:      half-life in kimg of the exponential moving average of G's and E's weights that the
                   snapshots, gali eval, sample and reconstruct use (0 = no average: the live weights);
    ema_rampup:    ... at most this fraction of the images seen so far (0 = no ramp-up);
    ema_start_kimg: ... and the live weights themselves until this many kimg (gali.engine.loop.ema).
    ema_bn_batches: the averages' BatchNorm statistics are recomputed on this many training batches
                   before each snapshot (E on x, G on mu_E(x)) and saved so; 0 keeps the live networks'.
    identity_images: the snapshots' identity metric fits its classifier on at most this many labelled
                   training images (pixels; gali.engine.metrics.identity); 0 turns it off. Unlabelled
                   data skips it.
    snapshot_images: the snapshots' held-out figures are measured on this many images of the held-out split
                   (all of it if smaller; the same images at every snapshot, as ``gali eval --images``
                   reads them); the whole split is for ``gali eval``.
    dir:           the run folder itself ('' = a new numbered folder in out_dir). If it holds a checkpoint,
                   ``gali train`` resumes from its newest readable one with the command line's overrides on
                   top, so one command line starts the run and every restart or requeue of it.
    max_time:      stop (checkpoint, exit 75) before the next step would pass this much wall-clock time
                   since the start: '23h30m', '90s', '1d' ('' = no limit); 'auto' = 5 min before the SLURM
                   job's end (SLURM_JOB_END_TIME), no limit outside SLURM.
    stop_check_steps: with several ranks, they agree on a stop (a signal, or max_time) every this many steps
                   (one blocking CPU all-reduce each time, not every step); a single process checks every step.
    requeue:       after a stop, rank 0 requeues the SLURM job (``scontrol requeue $SLURM_JOB_ID``): 'auto'
                   (when SLURM_JOB_ID is set), 'on' or 'off' (the batch script decides).
    accumulate:    gradient accumulation: each update takes the mean gradient of this many micro-batches of
                   batch_size / (world size x accumulate) images (one all-reduce per side per update);
                   'auto': the fewest micro-batches that fit the GPU by the run plan's memory model (gali info
                   --gpus N --gpu ...), 1 on a CPU; the run's config.toml records the number chosen.
    snapshot_metrics: metrics of ``gali eval`` each snapshot runs on the weights it shows, comma-separated:
                   'fid', 'kid' or 'fid,kid' ('' = none), as StyleGAN3's --metrics; ...
    snapshot_inception: ... with this local TorchScript Inception file (nothing is downloaded) ...
    snapshot_metric_images: ... on this many generated and at most this many held-out real images.
    mfu:           each tick's model FLOPs utilisation: gali info's count of the step's FLOPs per real image
                   (counted once at start-up, a few seconds) times img/s, over the devices' peak (the run
                   plan's table for a GPU; on a CPU, its fp32 matmul rate measured at start-up): 'auto' (on
                   CUDA), 'on' or 'off'.
    """

    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    batch_size: int = 100
    kimg: float = 10.0
    tick_kimg: float = 1.0
    snapshot_kimg: float = 5.0
    grid_size: int = 8
    tensorboard: str = "auto"
    progress: str = "auto"
    max_bad_ticks: int = 3
    keep_checkpoints: int = 10
    milestone_kimg: float = 0.0
    snapshot_bn_recalibrate: int = 0
    ema_kimg: float = 0.0
    ema_rampup: float = 0.05
    ema_start_kimg: float = 0.0
    ema_bn_batches: int = 10
    identity_images: int = 5000
    snapshot_images: int = 1000
    dir: str = ""
    max_time: str = ""
    stop_check_steps: int = 10
    requeue: str = "auto"
    accumulate: int | str = 1
    snapshot_metrics: str = ""
    snapshot_inception: str = ""
    snapshot_metric_images: int = 10_000
    mfu: str = "auto"

    def validate(self) -> None:
        check_choice("run.device", self.device, DEVICES)
        check_choice("run.requeue", self.requeue, REQUEUE_MODES)
        if self.max_time not in ("", "auto"):
            parse_duration(self.max_time, key="run.max_time")
        check_positive("run.stop_check_steps", self.stop_check_steps)
        check_positive("run.batch_size", self.batch_size)
        if self.accumulate != "auto":
            if isinstance(self.accumulate, str):
                raise ConfigError("run.accumulate", f"got {self.accumulate!r}; a number of micro-batches, or 'auto'")
            check_positive("run.accumulate", self.accumulate)
        check_positive("run.kimg", self.kimg)
        for key, kimg in (("run.tick_kimg", self.tick_kimg), ("run.snapshot_kimg", self.snapshot_kimg)):
            check_positive(key, kimg)
            if kimg < 0.001:
                raise ConfigError(key, f"got {kimg}; the interval is counted in images, so it must be >= 0.001 kimg")
        check_positive("run.grid_size", self.grid_size)
        check_choice("run.tensorboard", self.tensorboard, TENSORBOARD_MODES)
        check_choice("run.progress", self.progress, PROGRESS_MODES)
        check_choice("run.mfu", self.mfu, MFU_MODES)
        check_positive("run.max_bad_ticks", self.max_bad_ticks, allow_zero=True)
        check_positive("run.keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        check_positive("run.milestone_kimg", self.milestone_kimg, allow_zero=True)
        check_positive("run.identity_images", self.identity_images, allow_zero=True)
        check_positive("run.snapshot_images", self.snapshot_images)
        check_positive("run.snapshot_bn_recalibrate", self.snapshot_bn_recalibrate, allow_zero=True)
        check_positive("run.ema_bn_batches", self.ema_bn_batches, allow_zero=True)
        for key in ("ema_kimg", "ema_rampup", "ema_start_kimg"):
            check_positive(f"run.{key}", getattr(self, key), allow_zero=True)
        self._check_snapshot_metrics()

    def snapshot_metric_names(self) -> tuple[str, ...]:
        """``run.snapshot_metrics`` as names, each once, in the order given."""
        return tuple(dict.fromkeys(n.strip() for n in self.snapshot_metrics.split(",") if n.strip()))

    def _check_snapshot_metrics(self) -> None:
        """The names, the image count and that an Inception file is named; the file itself is checked when
        training starts (Snapshots), so that ``gali eval`` of a checkpoint still loads on another machine."""
        unknown = [n for n in self.snapshot_metric_names() if n not in SNAPSHOT_METRICS]
        if unknown:
            raise ConfigError(
                "run.snapshot_metrics",
                f"got {', '.join(map(repr, unknown))}; accepted (comma-separated, e.g. run.snapshot_metrics=fid,kid): "
                f"{', '.join(SNAPSHOT_METRICS)}. The other metrics of gali eval run on a checkpoint with gali eval",
            )
        if self.snapshot_metric_images < 2:
            raise ConfigError(
                "run.snapshot_metric_images", f"got {self.snapshot_metric_images}; FID and KID need >= 2 images"
            )
        if self.snapshot_metric_names() and not self.snapshot_inception:
            raise ConfigError(
                "run.snapshot_inception",
                f"run.snapshot_metrics={self.snapshot_metrics!r} needs the path of a local TorchScript Inception "
                "(clean-fid/StyleGAN3 inception-2015-12-05.pt); nothing is downloaded",
            )


@dataclass
class Config:
    """The whole resolved config; ``preset`` records where it started from."""

    preset: str = "demo"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> None:
        for name in section_names(self):
            getattr(self, name).validate()
        if self.compute.activation_checkpointing and self.model.arch in PAPER_ARCHS:
            raise ConfigError(
                "compute.activation_checkpointing",
                f"the paper's networks ({self.model.arch}) have no "
                "residual blocks to recompute; use model.arch=biggan128 or biggan256, or turn it off",
            )
        if self.method.objective == "misclassification" and self.compute.kernel_impl == "triton":
            raise ConfigError(
                "compute.kernel_impl",
                "the fused K-way head has no form of method.objective="
                "'misclassification' (it is not a sum of cross-entropies); set compute.kernel_impl=ref "
                "(the deprecated method.kernel_impl=ref too) or auto",
            )
        expected = self.model.data_resolution
        if self.data.resolution != expected:
            encoder = (
                f" and model.encoder_resolution={self.model.encoder_resolution}"
                if self.model.encoder_resolution
                else ""
            )
            raise ConfigError(
                "data.resolution",
                f"got {self.data.resolution}, but model.arch={self.model.arch!r}{encoder} takes {expected}x{expected} "
                f"images; set data.resolution={expected} or pick another model.arch",
            )
        masks = load_spec(self.method.tuples).mask_indices
        if self.model.data_resolution != self.model.resolution and masks:
            raise ConfigError(
                "model.encoder_resolution",
                f"tuple spec {self.method.tuples!r} masks and mixes images, "
                "which needs one resolution for E, G and D; set model.encoder_resolution=0",
            )
        if self.method.mask_source == "pipeline":
            self._check_pipeline_masks(len(masks))

    def _check_pipeline_masks(self, num_masks: int) -> None:
        """``method.mask_source=pipeline`` needs a spec with masks and a pipeline that knows each sample's index."""
        if not num_masks:
            raise ConfigError(
                "method.mask_source",
                f"tuple spec {self.method.tuples!r} has no mask<n>/mix<n> slot; "
                "set method.mask_source=step (or a spec with masks, e.g. gali-mix)",
            )
        if self.data.backend == "synthetic" or self.data.source == "webdataset":
            what = "data.backend" if self.data.backend == "synthetic" else "data.source"
            raise ConfigError(
                what,
                f"{getattr(self.data, what.split('.')[1])!r} has no per-sample index to seed "
                "pipeline masks from; use image folders, a file list or the digits, or set "
                "method.mask_source=step",
            )
        self.method.pipeline_masks(num_masks, self.data.resolution, self.run.seed)  # its ranges fit the images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    return packaged_names("gali.engine.config", "presets")


def _filled(table: dict[str, Any], origin: str, overrides: typing.Sequence[str]) -> Config:
    cfg = Config(preset=str(table.get("preset", origin)))
    fill_sections(cfg, table, origin=origin, overrides=overrides, skip=("preset",), aliases=ALIASES)
    return cfg


def config_from_dict(table: dict[str, Any], *, origin: str = "dict", overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a config from ``{section: {key: value}}`` (a preset or a checkpoint's copy)."""
    cfg = _filled(table, origin, overrides)
    cfg.validate()
    return cfg


def _read_preset(preset: str) -> tuple[str, dict[str, Any]]:
    """A preset's origin and table; a saved config.toml names its own preset (``preset = ...``), so a run
    started from it keeps that name (its folder is ``NNNNN-demo``, not ``NNNNN-config``)."""
    origin, table = read_toml(preset, package="gali.engine.config", folder="presets", key="preset")
    return origin, {"preset": origin, **table}


def load_config(preset: str = "demo", overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a config from a preset (name or .toml path) and ``key=value`` overrides."""
    origin, table = _read_preset(preset)
    return config_from_dict(table, origin=origin, overrides=overrides)


def load_draft_config(preset: str = "demo", overrides: typing.Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """As :func:`load_config`, but a required key left unset (``data.root`` of a preset for image folders, say) is
    not refused: it comes back in ``{key: message}``, for ``gali train --dry-run`` to mark. Any other error raises.
    """
    origin, table = _read_preset(preset)
    cfg = _filled(table, origin, overrides)
    missing: dict[str, str] = {}
    unset: dict[str, Any] = {}
    while True:
        try:
            cfg.validate()
            break
        except ConfigError as exc:
            section_name, _, name = exc.key.partition(".")
            section = getattr(cfg, section_name) if section_name in section_names(cfg) else None
            if exc.key in missing or not hasattr(section, name) or getattr(section, name) not in (None, ""):
                raise
            missing[exc.key] = str(exc)
            unset[exc.key] = getattr(section, name)
            setattr(section, name, f"<{exc.key}>")  # a stand-in, so that the keys after it are checked too
    for key, value in unset.items():
        section_name, _, name = key.partition(".")
        setattr(getattr(cfg, section_name), name, value)
    return cfg, missing


def dump_config(cfg: Config, missing: typing.Mapping[str, str] = {}) -> str:
    """The resolved config as TOML that :func:`load_config` reads back (None values are omitted), with its
    preset's name; each key of ``missing`` ({key: why}, :func:`load_draft_config`) is marked in its section."""
    header = f"# resolved gali config (started from preset {cfg.preset!r})\npreset = {json.dumps(cfg.preset)}"
    lines = dump_sections(cfg, header).splitlines()
    for key, why in missing.items():
        section_name, _, name = key.partition(".")
        at = lines.index(f"[{section_name}]") + 1
        lines.insert(at, f"# {name} = ...  <- MISSING, required: {why}")
    return "\n".join(lines) + "\n"
