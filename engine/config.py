"""Typed config, split by owner, loaded from a preset TOML plus ``section.key=value`` overrides.

Each section is a dataclass owned by the subsystem that reads it (``data`` by gali.pipelines,
``model`` by the models, ``method`` by the tuple spec and losses, ``optim`` and ``compute`` by the step, ``run`` by
the training loop). Every value is validated before any work starts; an unknown key or an invalid
value raises :class:`ConfigError` naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gali.engine.errors import ConfigError
from gali.pipelines.config import DataConfig

ARCH_RESOLUTION = {"svhn32": 32, "celeba64": 64}
LOSS_WEIGHTS = ("paper", "authors")
NOISE_SCHEDULES = ("linear", "constant")
RESIZE_MODES = ("nearest", "bilinear")
IMPLS = ("auto", "triton", "ref")
DEVICES = ("auto", "cpu", "cuda")
TENSORBOARD_MODES = ("auto", "on", "off")
PROGRESS_MODES = ("auto", "bar", "lines")


def _choice(key: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(key, f"got {value!r}; accepted: {', '.join(accepted)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"got {value}; must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    """Networks of GALI.md §3. ``width`` scales every hidden channel count (1.0 = the paper's)."""

    arch: str = "svhn32"
    latent_dim: int = 256
    width: float = 1.0

    def validate(self) -> None:
        _choice("model.arch", self.arch, tuple(ARCH_RESOLUTION))
        _positive("model.latent_dim", self.latent_dim)
        _positive("model.width", self.width)


@dataclass
class MethodConfig:
    """The tuple spec and its losses (GALI.md §1-2).

    tuples:        a tuple spec name (ali, alice, gali4, gali8, gali-mix, gali-pt) or a TOML path.
    loss_weights:  'paper' (2/K on the D sum, 2/(K(K-1)) on the G/E sum) or 'authors' (the
                   operator-precedence bug of the GALI-4 scripts, GALI.md §5 item 1).
    alice_lambda:  weight of the pixel MSE for specs that name a reconstruction (ALICE).
    instance_noise: initial std of the Gaussian noise added to every image slot fed to D.
    noise_schedule: 'linear' (the authors' code: std * (N - epoch) / N, constant within an epoch,
                   epochs counted 1..N) or 'constant'.
    mask_fill:     value written into masked pixels of the encoder's input (authors' training: -2).
    mask_min_size / mask_max_size: box side range in pixels (0 = the resolution), paper: 1..R.
    feature_model: path to the frozen model M of M(...) slots (TorchScript, or a state dict whose
                   architecture is named by feature_arch); never downloaded.
    feature_input_size / feature_resize: resize images before M (0 = no resize).
    kernel_impl:   'auto' | 'triton' | 'ref' for the fused kernels (K-way head, mask composite).
    """

    tuples: str = "gali4"
    loss_weights: str = "paper"
    alice_lambda: float = 1.0
    instance_noise: float = 0.1
    noise_schedule: str = "linear"
    mask_fill: float = -2.0
    mask_min_size: int = 1
    mask_max_size: int = 0
    feature_model: str | None = None
    feature_arch: str | None = None
    feature_input_size: int = 0
    feature_resize: str = "nearest"
    kernel_impl: str = "auto"

    def validate(self) -> None:
        _choice("method.loss_weights", self.loss_weights, LOSS_WEIGHTS)
        _positive("method.alice_lambda", self.alice_lambda, allow_zero=True)
        _positive("method.instance_noise", self.instance_noise, allow_zero=True)
        _choice("method.noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        _positive("method.mask_min_size", self.mask_min_size)
        _positive("method.mask_max_size", self.mask_max_size, allow_zero=True)
        if self.mask_max_size and self.mask_max_size < self.mask_min_size:
            raise ConfigError(
                "method.mask_max_size",
                f"got {self.mask_max_size} < method.mask_min_size={self.mask_min_size}",
            )
        _positive("method.feature_input_size", self.feature_input_size, allow_zero=True)
        _choice("method.feature_resize", self.feature_resize, RESIZE_MODES)
        _choice("method.kernel_impl", self.kernel_impl, IMPLS)


@dataclass
class OptimConfig:
    """Adam for D and for E+G (GALI.md §3.1); n_dis D steps per E/G step (1 = simultaneous)."""

    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_dis: int = 1

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        for key, beta in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(key, f"got {beta}; must be in [0, 1)")
        _positive("optim.n_dis", self.n_dis)


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

    def validate(self) -> None:
        _choice("run.device", self.device, DEVICES)
        _positive("run.batch_size", self.batch_size)
        _positive("run.kimg", self.kimg)
        _positive("run.tick_kimg", self.tick_kimg)
        _positive("run.snapshot_kimg", self.snapshot_kimg)
        _positive("run.grid_size", self.grid_size)
        _choice("run.tensorboard", self.tensorboard, TENSORBOARD_MODES)
        _choice("run.progress", self.progress, PROGRESS_MODES)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ComputeConfig:
    """How the step runs (owned by the step): precision, CUDA graphs, torch.compile, layout, NVTX.

    precision:     'auto' (bf16 autocast on a CUDA device that supports it, else fp32), 'fp32',
                   'bf16' (autocast) or 'fp16' (autocast with one GradScaler per side, D and G/E).
                   Spectral-norm power iterations, the losses and the optimizer state stay fp32.
    cuda_graph:    capture the whole step in a CUDA graph after warm-up and replay it; on a CPU
                   device the eager twin runs instead (the same function, not captured).
    compile:       torch.compile G, E and D's feature trunk (the kernels stay opaque custom ops);
                   slower than eager on CPU, see ``engine.step.compile_networks``.
    channels_last: keep G, E, D and the step's input in channels-last memory format (default on:
                   1.1–1.3× faster per step than NCHW on the CPU benchmark, and the layout PyTorch
                   recommends for convolutions under autocast on NVIDIA GPUs).
    nvtx:          named NVTX ranges (gali/step, gali/chains, gali/D, ...) for Nsight Systems.
    """

    precision: str = "auto"
    cuda_graph: bool = False
    compile: bool = False
    channels_last: bool = True
    nvtx: bool = False

    def validate(self) -> None:
        _choice("compute.precision", self.precision, PRECISIONS)


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
        for name in SECTIONS:
            getattr(self, name).validate()
        expected = ARCH_RESOLUTION[self.model.arch]
        if self.data.resolution != expected:
            raise ConfigError(
                "data.resolution",
                f"got {self.data.resolution}, but model.arch={self.model.arch!r} takes {expected}x{expected} "
                f"images; set data.resolution={expected} or pick another model.arch",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "compute": ComputeConfig,
}


def preset_names() -> list[str]:
    """Names of the presets shipped as package data."""
    folder = resources.files("gali.engine") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_preset(preset: str) -> tuple[str, dict[str, Any]]:
    path = Path(preset)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError("preset", f"file {path} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        resource = resources.files("gali.engine") / "presets" / f"{preset}.toml"
        if not resource.is_file():
            raise ConfigError("preset", f"got {preset!r}; accepted: {', '.join(preset_names())} or a .toml path")
        text, origin = resource.read_text(), preset
    try:
        return origin, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("preset", f"{origin} is not valid TOML: {exc}") from exc


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(key, "must be set (no 'none' here)")
    for kind in allowed:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and type(value) is kind:
            return value
    names = " or ".join("none" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(key, f"got {value!r} ({type(value).__name__}); expected {names}")


def _apply(cfg: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS or not name:
        raise ConfigError(key, f"unknown key; keys look like <section>.<name> with section in {', '.join(SECTIONS)}")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        accepted = ", ".join(f"{section_name}.{f.name}" for f in dataclasses.fields(section))
        raise ConfigError(key, f"unknown key; accepted: {accepted}")
    setattr(section, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=4e-5'`` -> ``('optim.lr', 4e-5)``: TOML literals, else a bare string; 'none' -> None."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "overrides look like section.key=value, e.g. optim.lr=4e-5")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def config_from_dict(table: dict[str, Any], *, origin: str = "dict", overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a config from ``{section: {key: value}}`` (a preset or a checkpoint's copy)."""
    cfg = Config(preset=str(table.get("preset", origin)))
    for section_name, values in table.items():
        if section_name == "preset":
            continue
        if not isinstance(values, dict):
            raise ConfigError(section_name, f"in {origin}: expected a [{section_name}] table")
        for name, value in values.items():
            _apply(cfg, f"{section_name}.{name}", value)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    cfg.validate()
    return cfg


def load_config(preset: str = "demo", overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a config from a preset (name or .toml path) and ``key=value`` overrides."""
    origin, table = _read_preset(preset)
    return config_from_dict({"preset": origin, **table}, origin=origin, overrides=overrides)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML that :func:`load_config` reads back (None values are omitted)."""
    lines = [f"# resolved gali config (started from preset {cfg.preset!r})"]
    for section_name in SECTIONS:
        lines.append(f"\n[{section_name}]")
        for name, value in dataclasses.asdict(getattr(cfg, section_name)).items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
