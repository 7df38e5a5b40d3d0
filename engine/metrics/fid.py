"""FID and KID (docs/method.md §4.1): torchmetrics' implementations on features of a local Inception.

``FrechetInceptionDistance`` and ``KernelInceptionDistance`` are applied to features computed by an
Inception network loaded from a local TorchScript file (:func:`load_inception`); nothing is downloaded.
Features are computed (and a reference set's cached, by the evaluation protocol) outside the metric,
so one pass of the network serves both FID and KID.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from gali.engine.errors import DataError, GaliError
from gali.engine.nets.feature_models import resize_images
from gali.engine.nets.inference import sample_images

INCEPTION_INPUT_SIZE = 299


def to_uint8_range(x: Tensor) -> Tensor:
    """Images in [-1, 1] as float32 on the 0..255 grid: (x + 1)·127.5, clamped and rounded.

    The rounding is what writing the samples to PNG would do, so FID sees the same pixels as an
    implementation that reads image files.
    """
    return x.float().clamp(-1, 1).add(1).mul(127.5).round()


class InceptionFeatures(nn.Module):
    """An image feature network for FID/KID, loaded from a local TorchScript file.

    Two forms are accepted (:func:`load_inception` tells them apart by the forward's signature):

    - the clean-fid / StyleGAN2-ADA / StyleGAN3 Inception-v3 (``inception-2015-12-05.pt``), whose
      ``forward(img, return_features=False, ...)`` takes RGB NCHW floats in [0, 255] and returns,
      with ``return_features=True``, the 2048-d pool features; it is called that way;
    - any TorchScript module whose ``forward(x)`` takes the same input and returns (N, D) features.

    ``forward`` takes (N, 3, H, W) images in [0, 255] (uint8 or float), resizes them to
    ``input_size``×``input_size`` (bilinear, ``align_corners=False``; these images are smaller than
    299², so this is an upsampling) and returns float64 (N, D) features. ``num_features`` is D,
    measured once at load time (torchmetrics reads it instead of running its own dummy batch).
    """

    def __init__(self, network: nn.Module, *, path: Path, input_size: int, return_features: bool) -> None:
        super().__init__()
        self.network = network
        self.path = path
        self.input_size = input_size
        self.return_features = return_features
        self.num_features = int(self._features(torch.zeros(2, 3, input_size, input_size)).shape[1])

    def _features(self, x: Tensor) -> Tensor:
        out = self.network(x, return_features=True) if self.return_features else self.network(x)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise GaliError(
                f"the Inception network {self.path} must return (N, D) features for (N, 3, {self.input_size}, "
                f"{self.input_size}) images in [0, 255]; it returned {shape}. Give a clean-fid/StyleGAN "
                "inception-2015-12-05.pt file or a TorchScript module whose forward(x) returns (N, D)"
            )
        return out

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = resize_images(images.float(), self.input_size, "bilinear")
        return self._features(x).double()

    def describe(self) -> str:
        call = "model(x, return_features=True)" if self.return_features else "model(x)"
        return (
            f"{call} on RGB float NCHW in [0, 255] (uint8-rounded), resized to {self.input_size}x"
            f"{self.input_size} bilinear (align_corners=False)"
        )


def load_inception(path: str | Path, *, input_size: int = INCEPTION_INPUT_SIZE) -> InceptionFeatures:
    """The FID/KID feature network at ``path`` (see :class:`InceptionFeatures`), frozen, in eval mode, on the CPU.

    Never downloads: a missing or unreadable file raises :class:`DataError` naming the path and where
    to get the weights.
    """
    path = Path(path).expanduser()
    remedy = (
        "download inception-2015-12-05.pt (the clean-fid/StyleGAN3 TorchScript Inception-v3) on a "
        "machine with internet access, copy it here and pass its path with --inception; nothing is "
        "downloaded at run time"
    )
    if not path.is_file():
        raise DataError(f"Inception weights {path} do not exist; {remedy}")
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot load {path} as a TorchScript file ({exc}); {remedy}") from exc
    network.eval()
    arguments = [a.name for a in network.forward.schema.arguments]
    return InceptionFeatures(network, path=path, input_size=input_size, return_features="return_features" in arguments)


class _Precomputed(nn.Module):
    """The identity 'network' handed to torchmetrics: its ``update`` then takes features, not images.

    Features are computed (and the reference set's cached) outside the metric, so that one pass of
    the Inception network serves both FID and KID.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check_features(real: Tensor, fake: Tensor, what: str, minimum: int) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}: need (N, D) and (M, D) features; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < minimum:
        raise DataError(f"{what} needs at least {minimum} images in each set; got {len(real)} real and {len(fake)}")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets: torchmetrics' ``FrechetInceptionDistance`` in float64.

    ||μ_r − μ_f||² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½), with unbiased (N − 1) covariances.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # imported here: torchmetrics takes seconds to import

    _check_features(real, fake, "FID", 2)
    # sync_on_compute=False: the features are whole already; under torchrun torchmetrics would otherwise gather its
    # state over the default process group, a collective the other ranks never join (a hang)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, int]:
    """KID between two feature sets: torchmetrics' ``KernelInceptionDistance``.

    The unbiased MMD² with the polynomial kernel (xᵀy/D + 1)³, averaged over ``subsets`` random
    subsets of ``min(subset_size, N, M)`` images of each set (drawn from a generator seeded by
    ``seed``, so the value is reproducible). Returns (mean, std over subsets, the subset size used).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake, "KID", 2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # KID keeps every feature; these are already in memory here
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )  # whole features: no gather over the ranks (frechet_distance)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def fid_implementation() -> str:
    """The FID/KID implementation and version, for reports."""
    import torchmetrics

    return (
        f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance and KernelInceptionDistance "
        "(degree 3, gamma 1/D, coef 1) on precomputed features"
    )


def latent_batches(
    count: int, batch_size: int, *, latent_dim: int, label_classes: int, seed: int
) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """(batch index, z, labels) of the batches of ``count`` samples, on the CPU.

    Per batch, z and then (a class-conditional G) labels uniform over the classes come from one generator seeded by
    ``seed``: the snapshots and ``gali eval``, on any number of ranks, draw the same images from the same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    for index, start in enumerate(range(0, count, batch_size)):
        n = min(batch_size, count - start)
        z = torch.randn(n, latent_dim, generator=generator)
        yield index, z, torch.randint(label_classes, (n,), generator=generator) if label_classes else None


@torch.no_grad()
def sample_features(
    G: nn.Module,
    inception: InceptionFeatures,
    latents: Iterable[tuple[int, Tensor, Tensor | None]],
    *,
    first: int,
    device: torch.device,
) -> list[tuple[int, Tensor]]:
    """(batch index, Inception features on the CPU) of G's samples (eval mode) of the :func:`latent_batches` from
    batch ``first`` on: a rank draws the stream up to its block's end and renders its own batches only."""
    return [
        (index, inception(to_uint8_range(sample_images(G, z.to(device), None if y is None else y.to(device)))).cpu())
        for index, z, y in latents
        if index >= first
    ]
