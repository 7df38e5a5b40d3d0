"""The ``[method]`` section: the tuple spec and its losses, masks, instance noise and feature model."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.config import check_choice, check_positive
from gali.engine.errors import ConfigError
from gali.engine.method.losses import OBJECTIVES
from gali.pipelines.masks import KINDS, MaskArgs, MaskSpec

LOSS_WEIGHTS = ("paper", "authors")
NOISE_SCHEDULES = ("linear", "constant")
RESIZE_MODES = ("nearest", "bilinear")
MASK_SOURCES = ("step", "pipeline")


@dataclass
class MethodConfig:
    """The tuple spec and its losses (docs/method.md §1-2).

    tuples:        a tuple spec name (ali, alice, gali4, gali8, gali-mix, gali-pt) or a TOML path.
    loss_weights:  'paper' (2/K on the D sum, 2/(K(K-1)) on the G/E sum) or 'authors' (the
                   operator-precedence bug of the GALI-4 scripts, docs/method.md §5 item 1).
    objective:     the G/E loss: 'product' (the paper's Product of Terms, Eq. 4), or one the paper
                   rejects (§1.4): 'minimax' (L_GE = −L_D) or 'misclassification' (maximise
                   Σ_k log(1 − D_k(t_k))); see gali.engine.method.losses.
    alice_lambda:  weight of the pixel MSE for specs that name a reconstruction (ALICE).
    cycle_lambda:  weight of the pair head's K-way losses for specs that name cycle_classes, on both
                   D's and G/E's loss (the adversarial cycle family, docs/method.md §2.6).
    instance_noise: initial std of the Gaussian noise added to every image slot fed to D.
    noise_schedule: 'linear' (the authors' code: std * (N - epoch) / N, constant within an epoch,
                   epochs counted 1..N) or 'constant'.
    mask_fill:     value written into masked pixels of the encoder's input (authors' training: -2).
    mask_min_size / mask_max_size: box side range in pixels (0 = the resolution), paper: 1..R.
    mask_source:   where the masks of mask<n>/mix<n> come from: 'step' (boxes drawn on the device each
                   step, the paper's) or 'pipeline' (per-sample masks drawn by the data pipeline from
                   (run.seed, sample index, n): the DALI plugin of pipelines/native, or its Python
                   reference in the torch backend; see gali.pipelines.masks).
    mask_kinds:    what the pipeline draws: one of box, eval_box, stroke, or a mixture
                   'box:0.5,stroke:0.5' (weights normalised); 'step' draws boxes only.
    mask_strokes / mask_max_thickness: segments per stroke mask and their thickness 1..T pixels
                   (0 = R // 8).
    mask_min_coverage / mask_max_coverage: fraction of the image a pipeline mask may cover (redrawn
                   up to 8 times, then a band of the minimum coverage).
    feature_model: path to the frozen model M of M(...) slots (TorchScript, or a state dict whose
                   architecture is named by feature_arch); never downloaded.
    feature_input_size / feature_resize: resize images before M (0 = no resize).

    The kernels' path is a compute concern: ``compute.kernel_impl`` (``method.kernel_impl`` is its
    deprecated alias).
    """

    tuples: str = "gali4"
    loss_weights: str = "paper"
    objective: str = "product"
    alice_lambda: float = 1.0
    cycle_lambda: float = 1.0
    instance_noise: float = 0.1
    noise_schedule: str = "linear"
    mask_fill: float = -2.0
    mask_min_size: int = 1
    mask_max_size: int = 0
    mask_source: str = "step"
    mask_kinds: str = "box"
    mask_strokes: int = 4
    mask_max_thickness: int = 0
    mask_min_coverage: float = 0.0
    mask_max_coverage: float = 1.0
    feature_model: str | None = None
    feature_arch: str | None = None
    feature_input_size: int = 0
    feature_resize: str = "nearest"

    def validate(self) -> None:
        check_choice("method.loss_weights", self.loss_weights, LOSS_WEIGHTS)
        check_choice("method.objective", self.objective, OBJECTIVES)
        check_positive("method.alice_lambda", self.alice_lambda, allow_zero=True)
        check_positive("method.cycle_lambda", self.cycle_lambda, allow_zero=True)
        check_positive("method.instance_noise", self.instance_noise, allow_zero=True)
        check_choice("method.noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        check_positive("method.mask_min_size", self.mask_min_size)
        check_positive("method.mask_max_size", self.mask_max_size, allow_zero=True)
        if self.mask_max_size and self.mask_max_size < self.mask_min_size:
            raise ConfigError(
                "method.mask_max_size",
                f"got {self.mask_max_size} < method.mask_min_size={self.mask_min_size}",
            )
        check_choice("method.mask_source", self.mask_source, MASK_SOURCES)
        weights = self.mask_kind_weights()
        if self.mask_source == "step" and weights[1:] != (0.0, 0.0):
            raise ConfigError(
                "method.mask_kinds",
                f"got {self.mask_kinds!r}: the step draws boxes only; "
                "set method.mask_source=pipeline for eval_box or stroke masks",
            )
        check_positive("method.feature_input_size", self.feature_input_size, allow_zero=True)
        check_choice("method.feature_resize", self.feature_resize, RESIZE_MODES)

    def mask_kind_weights(self) -> tuple[float, float, float]:
        """``mask_kinds`` as weights of (box, eval_box, stroke); ``ConfigError`` naming a bad entry."""
        weights = dict.fromkeys(KINDS, 0.0)
        for entry in self.mask_kinds.split(","):
            kind, _, weight = entry.strip().partition(":")
            if kind not in KINDS:
                raise ConfigError(
                    "method.mask_kinds",
                    f"unknown kind {kind!r} in {self.mask_kinds!r}; accepted: "
                    f"{', '.join(KINDS)}, or a mixture like 'box:0.5,stroke:0.5'",
                )
            try:
                weights[kind] += float(weight) if weight else 1.0
            except ValueError:
                raise ConfigError("method.mask_kinds", f"weight {weight!r} of {kind!r} is not a number") from None
        if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ConfigError("method.mask_kinds", f"got {self.mask_kinds!r}; weights must be >= 0, not all 0")
        return tuple(weights.values())

    def pipeline_masks(self, num_masks: int, resolution: int, seed: int) -> MaskArgs | None:
        """What a pipeline draws for ``num_masks`` mask slots at ``resolution`` (None with ``mask_source='step'``)."""
        if self.mask_source != "pipeline":
            return None
        return self.mask_spec(seed).args(num_masks, resolution, resolution)

    def mask_spec(self, seed: int) -> MaskSpec:
        """The pipeline's masks (``mask_source = 'pipeline'``), seeded by the run's ``seed``."""
        return MaskSpec(
            kind_weights=self.mask_kind_weights(),
            box_min=self.mask_min_size,
            box_max=self.mask_max_size,
            num_strokes=self.mask_strokes,
            max_thickness=self.mask_max_thickness,
            min_coverage=self.mask_min_coverage,
            max_coverage=self.mask_max_coverage,
            seed=seed,
        )
