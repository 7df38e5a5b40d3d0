"""Reconstruction metrics of docs/method.md §4.1 as pure functions of tensors.

Everything here takes images that the caller has already loaded (I/O, data splits, caches and
checkpoints live in :mod:`gali.engine.eval.protocol`), so each metric can be checked against an
independent computation on small synthetic inputs.

- **Pixel-MSE** (:func:`pixel_mse`): mean squared error in [0, 1] space of images given in [-1, 1],
  per batch; :func:`summarize` turns the per-batch values into the paper's mean ± std over batches;
  :func:`reconstruction_mse` is the image-weighted mean over a stream of batches (the training loop's
  held-out figure).
- **Feature-MSE** (:func:`feature_mse`): the same between a frozen feature network's outputs.
- **Inpainting** (:func:`masked_pixel_mse`): squared error over the masked pixels only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gali.engine.nets.feature_models import FeatureModel
from gali.engine.nets.inference import reconstruction_chain


@dataclass(frozen=True)
class Summary:
    """Mean ± std (population std, ``ddof=0``, as ``np.std``) of per-batch values, and their count."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(values: Sequence[float]) -> Summary:
    """The mean ± std over batches (docs/method.md §4.1: the ± of the paper's tables is the std over test batches)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    return Summary(mean=float(array.mean()), std=float(array.std()), n=len(values))


def pixel_mse(x: Tensor, x_hat: Tensor) -> float:
    """MSE between two batches of images given in [-1, 1], measured in [0, 1] space.

    ``nn.MSELoss`` on (1 + x)/2 and (1 + x̂)/2: the mean over B×C×H×W of the squared difference,
    i.e. a quarter of the MSE in [-1, 1] space.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"pixel_mse: shapes differ, {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return float(((x.double() - x_hat.double()) / 2).square().mean())


def masked_pixel_mse(x: Tensor, y: Tensor, mask: Tensor) -> float:
    """MSE in [0, 1] space (images given in [-1, 1]) over the masked pixels of a batch only.

    ``mask`` is (B, 1, H, W) with 1 where a pixel is masked. The squared differences of every
    channel of every masked pixel in the batch are pooled: their sum divided by (masked pixels × C).
    Pixels outside the mask do not enter, so an inpainting that leaves them unchanged is not
    rewarded for them (docs/method.md §5 item 7).
    """
    if x.shape != y.shape or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"masked_pixel_mse: need x, y of one shape (B, C, H, W) and mask (B, 1, H, W); got "
            f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(mask.shape)}"
        )
    weight = mask.double()
    count = float(weight.sum()) * x.shape[1]
    if count == 0:
        raise ValueError("masked_pixel_mse: the mask covers no pixel")
    return float((((x.double() - y.double()) / 2).square() * weight).sum()) / count


@torch.no_grad()
def network_features(model: nn.Module, x: Tensor, *, input_size: int = 0, resize: str = "nearest",
                     name: str = "the feature network") -> Tensor:
    """``model``'s (B, D) features of images ``x`` in [-1, 1], resized to ``input_size`` first.

    Raises :class:`GaliError` naming ``name`` when the output is not one tensor with the batch as
    its first dimension (its other dimensions are flattened).
    """
    return FeatureModel(model, input_size=input_size, resize=resize, name=name)(x).double()


def feature_mse(model: nn.Module, x: Tensor, x_hat: Tensor, *, input_size: int = 0, resize: str = "nearest",
                name: str = "the feature network") -> float:
    """MSE between ``model``'s features of two image batches in [-1, 1] (docs/method.md §4.1 feature-MSE).

    The images are resized to ``input_size`` (0 keeps them) with ``resize`` and fed in [-1, 1],
    as the authors' SVHN and CelebA feature nets take them.
    """
    a = network_features(model, x, input_size=input_size, resize=resize, name=name)
    b = network_features(model, x_hat, input_size=input_size, resize=resize, name=name)
    return float((a - b).square().mean())


def reconstruction_mse(G: nn.Module, E: nn.Module, batches: Iterable[Tensor]) -> float:
    """Pixel MSE of x̂ = G(μ_E(x)) in [0, 1] space, averaged over images (docs/method.md §4.1)."""
    total, count = 0.0, 0
    for x in batches:
        x_hat = reconstruction_chain(G, E, x, depth=1)[1]
        total += pixel_mse(x, x_hat) * x.shape[0]  # the batch's mean, weighted by its images
        count += x.shape[0]
    return total / count
