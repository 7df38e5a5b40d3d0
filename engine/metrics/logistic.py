"""The BigBiGAN linear probe's classifier: multinomial logistic regression on standardised features, in torch.

Pure functions of tensors, on whatever device the features are. The objective is the mean cross-entropy over the
fitted rows plus ``l2 / 2 · ‖W‖²`` (the bias is not penalised): scikit-learn's ``LogisticRegression(C=1 / (l2 · n))``
on the same standardised features. Features are standardised with the fitted rows' mean and std, minibatch by
minibatch, so the caller's tensor is never copied or changed.

The optimiser is minibatch SGD with Nesterov momentum 0.9 from W = 0, its rate 1/L where L bounds the objective's
curvature (½·λ_max of the second moment of [x̃, 1], by power iteration, plus l2: softmax's Hessian is at most ½),
decayed to 0 on a cosine over ``epochs`` passes; minibatch order comes from one generator seeded by ``seed``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gali.engine.errors import DataError

# The L2 weights tried (on the mean loss); the best on the held-out rows is kept.
LOGISTIC_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LOGISTIC_EPOCHS = 30
MOMENTUM = 0.9
BATCH_MAX = 1024  # minibatch rows, fewer where that leaves fewer than STEPS_MIN steps an epoch
STEPS_MIN = 16
CHUNK = 8192  # rows standardised at once outside the minibatches (statistics, curvature, scoring)
TOP_K = 5


@dataclass
class LogisticModel:
    """Logits ``((x − mean) / std) @ weight + bias``; ``weight`` is (D, K)."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias


@dataclass
class LogisticProbeResult:
    """Top-1 and top-``top_k`` accuracy (fractions) on the test rows of the model whose L2 weight was best held out."""

    top1: float
    top5: float
    top_k: int
    chosen_l2: float
    l2_grid: tuple[float, ...]
    validation_top1: list[float]  # per L2 weight of the grid
    train: int
    validation: int
    test: int
    classes: int
    epochs: int
    batch_size: int

    def to_dict(self) -> dict[str, object]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "top_k": self.top_k,
            "chosen_l2": self.chosen_l2,
            "l2_grid": list(self.l2_grid),
            "validation_top1": self.validation_top1,
            "train": self.train,
            "validation": self.validation,
            "test": self.test,
            "classes": self.classes,
            "epochs": self.epochs,
            "fit_batch_size": self.batch_size,
            "classifier": "multinomial logistic regression on standardised features, mean cross-entropy + "
            "l2/2·|W|², minibatch SGD (Nesterov 0.9, rate 1/curvature bound, cosine decay) in torch",
        }


def logistic_validation_size(n: int, validation: int | None = None) -> int:
    """Held-out rows of ``n`` training rows (default ``min(10000, n // 10)``, BigBiGAN's 10,000 at ImageNet's size).

    Raises :class:`DataError` saying what to change when fewer than two rows would be left to fit, or none held out.
    """
    if validation is None:
        validation = min(10_000, n // 10)
    if validation < 1 or n - validation < 2:
        raise DataError(
            f"probe-logistic holds out {validation} of the {n} training images to choose its L2 weight and needs at "
            "least one held out and two to fit; read more training images (--probe-logistic-images) or set "
            "--probe-logistic-validation"
        )
    return validation


def standardisation(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and (population) std of ``x[rows]`` per column, summed in float64; a constant column's std is 1."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for chunk in rows.split(CHUNK):
        part = x[chunk].double()
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean = total / len(rows)
    std = (squares / len(rows) - mean * mean).clamp_min(0).sqrt()
    std[std == 0] = 1.0
    return mean.to(x.dtype), std.to(x.dtype)


def curvature_bound(x: Tensor, rows: Tensor, mean: Tensor, std: Tensor, l2: float, seed: int) -> float:
    """L, the objective's largest possible curvature ½·λ_max(E[x̃x̃ᵀ]) + ``l2`` for x̃ = [standardised x, 1], λ_max
    estimated by 50 power iterations over the first ``CHUNK`` of ``rows`` (softmax's Hessian is at most ½)."""
    sample = (x[rows[:CHUNK]] - mean) / std
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape[1] + 1, generator=generator, dtype=x.dtype).to(x.device)
    top = 1.0
    for _ in range(50):
        u = sample @ v[:-1] + v[-1]
        w = torch.cat((sample.T @ u, u.sum().reshape(1))) / len(sample)
        top = float(w.norm())
        v = w / top
    return 0.5 * top + l2


def default_batch(n: int) -> int:
    """Minibatch rows for ``n`` fitted rows: ``BATCH_MAX``, fewer where that gives fewer than ``STEPS_MIN`` steps."""
    return max(1, min(BATCH_MAX, n // STEPS_MIN))


def fit_logistic(
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    *,
    classes: int,
    l2: float,
    epochs: int = LOGISTIC_EPOCHS,
    seed: int = 0,
    batch_size: int | None = None,
) -> LogisticModel:
    """The multinomial logistic regression of ``y[rows]`` on ``x[rows]`` (see the module's docstring)."""
    mean, std = standardisation(x, rows)
    n, batch = len(rows), batch_size or default_batch(len(rows))
    rate = 1.0 / curvature_bound(x, rows, mean, std, l2, seed)
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, device=x.device)
    bias = torch.zeros(classes, dtype=x.dtype, device=x.device)
    velocity = (torch.zeros_like(weight), torch.zeros_like(bias))
    generator = torch.Generator().manual_seed(seed)
    per_epoch = -(-n // batch)
    steps, step = epochs * per_epoch, 0
    for _ in range(epochs):
        order = rows[torch.randperm(n, generator=generator).to(rows.device)]
        for chunk in order.tensor_split(per_epoch):  # of equal sizes within one row: no small last minibatch
            xb = (x[chunk] - mean) / std
            residual = torch.softmax(xb @ weight + bias, dim=1)
            residual[torch.arange(len(chunk), device=x.device), y[chunk]] -= 1.0
            residual /= len(chunk)
            grads = (xb.T @ residual + l2 * weight, residual.sum(0))
            decayed = rate * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            for param, vel, grad in zip((weight, bias), velocity, grads, strict=True):
                vel.mul_(MOMENTUM).add_(grad)
                param.sub_(decayed * (grad + MOMENTUM * vel))
            step += 1
    return LogisticModel(weight, bias, mean, std)


def top_k_correct(model: LogisticModel, x: Tensor, y: Tensor, ks: Sequence[int]) -> list[int]:
    """How many rows of ``x`` have their label among the model's ``k`` largest logits, for each ``k``."""
    correct = [0] * len(ks)
    for start in range(0, len(x), CHUNK):
        logits, labels = model.logits(x[start : start + CHUNK]), y[start : start + CHUNK]
        ranked = logits.topk(max(ks), dim=1).indices
        for i, k in enumerate(ks):
            correct[i] += int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
    return correct


def logistic_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    validation: int | None = None,
    l2_grid: Sequence[float] = LOGISTIC_L2_GRID,
    epochs: int = LOGISTIC_EPOCHS,
    seed: int = 0,
) -> LogisticProbeResult:
    """BigBiGAN's linear evaluation: fit on the training rows, choose the L2 weight held out, test top-1 and top-5.

    A seeded permutation holds out ``validation`` training rows (:func:`logistic_validation_size`); one model per
    weight of ``l2_grid`` is fitted on the others (:func:`fit_logistic`); the model with the best held-out top-1
    (the larger weight on ties) is kept, not refitted, and scored on the test rows. Labels are integers from 0;
    the classes are the largest label + 1. Raises :class:`DataError` for fewer than two classes among the fitted
    rows; features holding NaN or inf (an encoder that diverged) give NaN accuracies with a ``RuntimeWarning``.
    """
    n, grid = len(train_x), tuple(sorted(l2_grid))
    if len(train_y) != n or len(test_y) != len(test_x) or train_x.shape[1:] != test_x.shape[1:] or not grid:
        raise ValueError("logistic_probe: features and labels need matching rows and widths, and an L2 grid")
    validation = logistic_validation_size(n, validation)
    classes = int(max(train_y.max(), test_y.max())) + 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    held, fitted = order[:validation], order[validation:]
    if len(torch.unique(train_y[fitted])) < 2:
        raise DataError("probe-logistic needs labels of at least two classes among the training images; it has one")
    result = LogisticProbeResult(
        top1=math.nan,
        top5=math.nan,
        top_k=min(TOP_K, classes),
        chosen_l2=math.nan,
        l2_grid=grid,
        validation_top1=[],
        train=len(fitted),
        validation=validation,
        test=len(test_y),
        classes=classes,
        epochs=epochs,
        batch_size=default_batch(len(fitted)),
    )
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        warnings.warn(
            "probe-logistic: the features hold NaN or inf (an encoder that gives non-finite outputs); its accuracy "
            "is NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return result
    models = [fit_logistic(train_x, train_y, fitted, classes=classes, l2=l2, epochs=epochs, seed=seed) for l2 in grid]
    result.validation_top1 = [top_k_correct(m, train_x[held], train_y[held], (1,))[0] / validation for m in models]
    best = max(range(len(grid)), key=lambda i: (result.validation_top1[i], grid[i]))  # the larger weight on ties
    result.chosen_l2 = grid[best]
    top1, top5 = top_k_correct(models[best], test_x, test_y, (1, result.top_k))
    result.top1, result.top5 = top1 / len(test_y), top5 / len(test_y)
    return result
