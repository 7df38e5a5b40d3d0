"""The ``[method]`` section: the tuple spec and its losses, masks, instance noise and feature model."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.config import check_choice, check_positive
from gali.engine.errors import ConfigError
from gali.engine.method.losses import OBJECTIVES

LOSS_WEIGHTS = ("paper", "authors")
NOISE_SCHEDULES = ("linear", "constant")
RESIZE_MODES = ("nearest", "bilinear")


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
    instance_noise: initial std of the Gaussian noise added to every image slot fed to D.
    noise_schedule: 'linear' (the authors' code: std * (N - epoch) / N, constant within an epoch,
                   epochs counted 1..N) or 'constant'.
    mask_fill:     value written into masked pixels of the encoder's input (authors' training: -2).
    mask_min_size / mask_max_size: box side range in pixels (0 = the resolution), paper: 1..R.
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
    instance_noise: float = 0.1
    noise_schedule: str = "linear"
    mask_fill: float = -2.0
    mask_min_size: int = 1
    mask_max_size: int = 0
    feature_model: str | None = None
    feature_arch: str | None = None
    feature_input_size: int = 0
    feature_resize: str = "nearest"

    def validate(self) -> None:
        check_choice("method.loss_weights", self.loss_weights, LOSS_WEIGHTS)
        check_choice("method.objective", self.objective, OBJECTIVES)
        check_positive("method.alice_lambda", self.alice_lambda, allow_zero=True)
        check_positive("method.instance_noise", self.instance_noise, allow_zero=True)
        check_choice("method.noise_schedule", self.noise_schedule, NOISE_SCHEDULES)
        check_positive("method.mask_min_size", self.mask_min_size)
        check_positive("method.mask_max_size", self.mask_max_size, allow_zero=True)
        if self.mask_max_size and self.mask_max_size < self.mask_min_size:
            raise ConfigError(
                "method.mask_max_size",
                f"got {self.mask_max_size} < method.mask_min_size={self.mask_min_size}",
            )
        check_positive("method.feature_input_size", self.feature_input_size, allow_zero=True)
        check_choice("method.feature_resize", self.feature_resize, RESIZE_MODES)
