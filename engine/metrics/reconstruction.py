"""Reconstruction metrics of docs/method.md §4.1 as pure functions of tensors.

Everything here takes images the caller has already loaded (I/O, splits, caches and checkpoints live in
:mod:`gali.engine.eval.protocol`), so each metric can be checked against an independent computation on small synthetic
inputs.
- **Pixel-MSE** (:func:`pixel_mse`): mean squared error in [0, 1] space of images given in [-1, 1], per batch;
  :func:`summarize` gives the paper's mean ± std over batches; :func:`held_out_metrics` the training loop's held-out
  figures (image-weighted MSE, E's σ and μ spread, the identity metric) in one pass over a stream of batches.
- **Feature-MSE** (:func:`feature_mse`): the same between a frozen feature network's outputs.
- **Inpainting** (:func:`masked_pixel_mse`): squared error over the masked pixels only.
- **Sharpness** (:func:`sharpness`): the reconstructions' edge energy over the real images', a figure blur cannot win.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gali.engine.metrics.identity import IdentityClassifier, pixel_features
from gali.engine.nets.feature_models import FeatureModel, resize_to
from gali.engine.nets.inference import encode, encoding_stats, sample_images


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


def edge_energy(x: Tensor) -> Tensor:
    """Per image, the mean absolute difference between neighbouring pixels (horizontal and vertical, every channel),
    in float64: how much edge a batch of images in [-1, 1] carries."""
    x = x.double()
    return (x.diff(dim=-1).abs().mean(dim=(1, 2, 3)) + x.diff(dim=-2).abs().mean(dim=(1, 2, 3))) / 2


def sharpness(x: Tensor, x_hat: Tensor) -> float:
    """The reconstructions' edge energy over the real images' (:func:`edge_energy`, summed over the batch).

    1 means as much edge as the real images; a blurred reconstruction scores below 1, whatever its class or its
    pixel-MSE, so identity and pixel-MSE (which a blurred digit of the right class wins) are read beside it. It can
    only be raised by adding edges, and edges where the real image has none raise the pixel-MSE: a method cannot
    buy identity or MSE with blur and keep this figure.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"sharpness: shapes differ, {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return float(edge_energy(x_hat).sum() / edge_energy(x).sum())


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
def network_features(
    model: nn.Module, x: Tensor, *, input_size: int = 0, resize: str = "nearest", name: str = "the feature network"
) -> Tensor:
    """``model``'s (B, D) features of images ``x`` in [-1, 1], resized to ``input_size`` first.

    Raises :class:`GaliError` naming ``name`` when the output is not one tensor with the batch as
    its first dimension (its other dimensions are flattened).
    """
    return FeatureModel(model, input_size=input_size, resize=resize, name=name)(x).double()


def feature_mse(
    model: nn.Module,
    x: Tensor,
    x_hat: Tensor,
    *,
    input_size: int = 0,
    resize: str = "nearest",
    name: str = "the feature network",
) -> float:
    """MSE between ``model``'s features of two image batches in [-1, 1] (docs/method.md §4.1 feature-MSE).

    The images are resized to ``input_size`` (0 keeps them) with ``resize`` and fed in [-1, 1],
    as the authors' SVHN and CelebA feature nets take them.
    """
    a = network_features(model, x, input_size=input_size, resize=resize, name=name)
    b = network_features(model, x_hat, input_size=input_size, resize=resize, name=name)
    return float((a - b).square().mean())


@dataclass
class HeldOutPart:
    """One pass's share of :func:`held_out_metrics` (a rank's block of the images), per batch in batch order."""

    weighted_mse: list[float] = field(default_factory=list)  # each batch's pixel-MSE times its images
    weighted_sharpness: list[float] = field(default_factory=list)  # and its sharpness times its images
    images: list[int] = field(default_factory=list)
    mus: list[Tensor] = field(default_factory=list)  # on the CPU: parts travel between ranks
    log_sigmas: list[Tensor] = field(default_factory=list)
    real: list[np.ndarray] = field(default_factory=list)  # the identity classifier's features, when it scores
    reconstructed: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)


def held_out_part(
    G: nn.Module, E: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]], *, identity: bool
) -> HeldOutPart:
    """What :func:`combine_held_out` needs of a stream of ``(x, labels)`` batches; with ``identity`` (and labels),
    the pixel features of x and its reconstruction too."""
    part = HeldOutPart()
    for x, y in batches:
        mu, log_sigma = encode(E, x)
        x_hat = sample_images(G, mu, y)  # y: x's labels, for a class-conditional G
        x = resize_to(x, x_hat.shape[-1])  # compared at G's resolution
        part.weighted_mse.append(pixel_mse(x, x_hat) * x.shape[0])
        part.weighted_sharpness.append(sharpness(x, x_hat) * x.shape[0])
        part.images.append(x.shape[0])
        part.mus.append(mu.cpu())
        part.log_sigmas.append(log_sigma.cpu())
        if identity and y is not None:
            part.real.append(pixel_features(x))
            part.reconstructed.append(pixel_features(x_hat))
            part.labels.append(y.cpu().numpy())
    return part


def combine_held_out(parts: Sequence[HeldOutPart], classifier: IdentityClassifier | None = None) -> dict[str, float]:
    """The held-out figures of :func:`held_out_metrics` from ``parts`` in batch order (the ranks' blocks in rank
    order): summed batch by batch and concatenated as one pass over all the batches would, so the figures are one
    process's to the bit."""
    total, edges, count = 0.0, 0.0, 0
    for part in parts:
        for weighted, weighted_edges, images in zip(
            part.weighted_mse, part.weighted_sharpness, part.images, strict=True
        ):
            total += weighted
            edges += weighted_edges
            count += images

    def joined(name: str) -> list:
        return [a for part in parts for a in getattr(part, name)]

    stats = encoding_stats(torch.cat(joined("mus")), torch.cat(joined("log_sigmas")))
    figures = {"recon_mse": total / count, "recon_sharpness": edges / count, **{k: float(v) for k, v in stats.items()}}
    if classifier is not None and joined("labels"):
        real, reconstructed, labels = (np.concatenate(joined(n)) for n in ("real", "reconstructed", "labels"))
        result = classifier.score(real, reconstructed, labels)
        figures |= {"identity": result.accuracy, "identity_nearest": result.nearest, "identity_ceiling": result.ceiling}
    return figures


def held_out_metrics(
    G: nn.Module,
    E: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    classifier: IdentityClassifier | None = None,
) -> dict[str, float]:
    """The training loop's snapshot figures over a stream of held-out ``(x, labels)`` batches, E and G in eval mode.

    ``recon_mse``: pixel-MSE of x̂ = G(μ_E(x)) in [0, 1] space, averaged over images (docs/method.md §4.1);
    ``recon_sharpness``: :func:`sharpness` of x̂, its batches' figures averaged over images (as ``gali eval``'s
    recon-sharpness ``image_mean``);
    ``e_sigma`` / ``e_mu_spread``: :func:`gali.engine.nets.inference.encoding_stats` over all the images;
    with a ``classifier`` (and labels), ``identity`` (its accuracy on the reconstructions),
    ``identity_nearest`` and ``identity_ceiling`` (:class:`gali.engine.metrics.identity.IdentityClassifier`).
    Over ranks, each computes :func:`held_out_part` of its block and one combines them (:func:`combine_held_out`).
    """
    return combine_held_out([held_out_part(G, E, batches, identity=classifier is not None)], classifier)
