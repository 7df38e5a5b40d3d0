"""The evaluation metrics of GALI.md §4.1 as pure functions of tensors and arrays.

Everything here takes images, features or labels that the caller has already loaded (I/O, data
splits, caches and checkpoints live in :mod:`gali.engine.evaluate`), so each metric can be checked
against an independent computation on small synthetic inputs.

- **Pixel-MSE** (:func:`pixel_mse`): mean squared error in [0, 1] space of images given in [-1, 1],
  per batch; :func:`summarize` turns the per-batch values into the paper's mean ± std over batches.
- **Feature-MSE** (:func:`feature_mse`): the same between a frozen feature network's outputs.
- **Inpainting** (:func:`masked_pixel_mse`): squared error over the masked pixels only.
- **Linear probe** (:func:`linear_probe`): a linear SVM on encoder features, C chosen on a
  validation split, mean ± std test error over repeated random draws of the labelled set.
- **FID and KID** (:func:`frechet_distance`, :func:`kernel_inception_distance`): torchmetrics'
  ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` applied to features computed by an
  Inception network loaded from a local TorchScript file (:func:`load_inception`); nothing is
  downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.errors import DataError, GaliError

# The metrics of ``gali eval`` (run by gali.engine.evaluate), with what each measures.
METRICS: dict[str, str] = {
    "pixel-mse": "reconstruction pixel-MSE in [0, 1] space, z = mu_E(x), mean ± std over batches",
    "feature-mse": "reconstruction feature-MSE with the network given by --feature-model",
    "probe": "linear-SVM test error (%) on the encoder's last hidden layers and output",
    "fid": "FID of samples G(z) against the evaluation split (needs --inception)",
    "kid": "KID of samples G(z) against the evaluation split (needs --inception)",
    "inpaint": "inpainting pixel-MSE over the masked pixels (and feature-MSE of the composite with --feature-model)",
}
# The SVM's C grid (log-spaced); the best value on the validation split is used for each draw.
PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
INCEPTION_INPUT_SIZE = 299


@dataclass(frozen=True)
class Summary:
    """Mean ± std (population std, ``ddof=0``, as ``np.std``) of per-batch values, and their count."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(values: Sequence[float]) -> Summary:
    """The mean ± std over batches (GALI.md §4.1: the ± of the paper's tables is the std over test batches)."""
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
    rewarded for them (GALI.md §5 item 7).
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


def resize_images(x: Tensor, size: int, mode: str) -> Tensor:
    """``x`` resized to ``size``×``size`` (``F.interpolate``, 'nearest' or 'bilinear'); unchanged if 0 or equal."""
    if size == 0 or tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


@torch.no_grad()
def network_features(model: nn.Module, x: Tensor, *, input_size: int = 0, resize: str = "nearest",
                     name: str = "the feature network") -> Tensor:
    """``model``'s (B, D) features of images ``x`` in [-1, 1], resized to ``input_size`` first.

    Raises :class:`GaliError` naming ``name`` when the output is not one tensor with the batch as
    its first dimension (its other dimensions are flattened).
    """
    out = model(resize_images(x, input_size, resize))
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise GaliError(
            f"{name} must return one (B, D) or (B, ...) tensor per batch; for input {tuple(x.shape)} "
            f"(resized to {input_size or x.shape[-1]}) it returned {shape}"
        )
    return out.flatten(1).double()


def feature_mse(model: nn.Module, x: Tensor, x_hat: Tensor, *, input_size: int = 0, resize: str = "nearest",
                name: str = "the feature network") -> float:
    """MSE between ``model``'s features of two image batches in [-1, 1] (GALI.md §4.1 feature-MSE).

    The images are resized to ``input_size`` (0 keeps them) with ``resize`` and fed in [-1, 1],
    as the authors' SVHN and CelebA feature nets take them.
    """
    a = network_features(model, x, input_size=input_size, resize=resize, name=name)
    b = network_features(model, x_hat, input_size=input_size, resize=resize, name=name)
    return float((a - b).square().mean())


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Test misclassification of the linear probe over ``len(errors)`` random labelled sets.

    ``errors`` and ``chosen_c`` are per draw; ``mean``/``std`` (population std) are fractions in [0, 1].
    """

    mean: float
    std: float
    errors: list[float]
    chosen_c: list[float]
    labelled: int
    validation: int
    test: int
    c_grid: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": self.mean, "std": self.std, "n": len(self.errors), "errors": self.errors,
            "chosen_c": self.chosen_c, "labelled": self.labelled, "validation": self.validation,
            "test": self.test, "c_grid": list(self.c_grid),
            "classifier": "sklearn.svm.SVC(kernel='precomputed') on the linear kernel of standardised features "
                          "(a linear SVM, hinge loss, one-vs-one)",
        }


def probe_validation_size(n: int, labelled: int, validation: int | None = None) -> int:
    """The probe's validation set size for ``n`` training images (default ``min(10000, (n − labelled) // 2)``).

    Raises :class:`DataError` saying what to change when ``n`` cannot hold ``labelled`` images plus
    a validation set of at least one.
    """
    if validation is None:
        validation = min(10_000, (n - labelled) // 2)
    if validation < 1 or n < labelled + validation:
        raise DataError(
            f"the linear probe needs {labelled} labelled training images plus a validation set of at least "
            f"one (asked: {validation}); the training split holds {n}. Lower the number of labelled "
            "images (--probe-labelled) or the validation size (--probe-validation), or use a larger split"
        )
    return validation


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    labelled: int = 1000,
    validation: int | None = None,
    draws: int = 100,
    c_grid: Sequence[float] = PROBE_C_GRID,
    seed: int = 0,
) -> ProbeResult:
    """Linear-SVM probe of representations (GALI.md §4.1, following ALI): mean ± std test error.

    The training rows are split once (seeded) into a validation set of ``validation`` rows
    (default ``min(10000, (N - labelled) // 2)``; ALI used 10,000) and a pool. Each of ``draws``
    draws takes ``labelled`` random rows of the pool, standardises the features with their mean
    and std, fits one linear SVM per C in ``c_grid``, keeps the C with the lowest validation error
    (the smallest on ties, for a grid in ascending order) and records its test error.

    The SVM is libsvm's (``sklearn.svm.SVC``) on the precomputed linear kernel X·Xᵀ: exactly a
    linear SVM, with the hinge loss and one-vs-one multi-class voting. ALI used an L2-SVM
    (squared hinge); liblinear's ``LinearSVC`` solves that but took seconds per fit on 1,000
    examples of a few thousand features here, against milliseconds for the kernel form, and a
    probe fits ``draws × len(c_grid)`` SVMs.

    Raises :class:`DataError` when there are too few training rows for ``labelled`` plus a
    validation set, or fewer than two classes.
    """
    from sklearn.svm import SVC  # imported here: scikit-learn takes seconds to import

    # float32 kernels: half the time of float64 for SVHN-sized test sets, ample precision for an SVM
    train_features = np.asarray(train_features, dtype=np.float32)
    test_features = np.asarray(test_features, dtype=np.float32)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    n = len(train_features)
    if len(train_labels) != n or len(test_labels) != len(test_features):
        raise ValueError("linear_probe: features and labels must have the same number of rows")
    if labelled < 2 or draws < 1 or not c_grid:
        raise ValueError(f"linear_probe: need labelled >= 2, draws >= 1 and a C grid; got {labelled}, {draws}")
    validation = probe_validation_size(n, labelled, validation)
    if len(np.unique(train_labels)) < 2:
        raise DataError("the linear probe needs labels of at least two classes in the training split; it has one")

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    val_rows, pool = order[:validation], order[validation:]
    val_x, val_y = train_features[val_rows], train_labels[val_rows]
    errors: list[float] = []
    chosen: list[float] = []
    for _ in range(draws):
        rows = rng.choice(pool, size=labelled, replace=False)
        x, y = train_features[rows], train_labels[rows]
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std == 0] = 1.0
        x = (x - mean) / std
        kernel = x @ x.T
        val_kernel = ((val_x - mean) / std) @ x.T
        fits = []
        for c in c_grid:
            svm = SVC(C=c, kernel="precomputed").fit(kernel, y)
            fits.append((float(np.mean(svm.predict(val_kernel) != val_y)), c, svm))
        _, c, svm = min(fits, key=lambda fit: fit[0])  # the first (smallest C) of equal validation errors
        test_kernel = ((test_features - mean) / std) @ x.T
        errors.append(float(np.mean(svm.predict(test_kernel) != test_labels)))
        chosen.append(c)
    array = np.asarray(errors)
    return ProbeResult(mean=float(array.mean()), std=float(array.std()), errors=errors, chosen_c=chosen,
                       labelled=labelled, validation=validation, test=len(test_labels), c_grid=tuple(c_grid))


# ------------------------------------------------------------------------------------------------
# FID and KID
# ------------------------------------------------------------------------------------------------


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
        return (f"{call} on RGB float NCHW in [0, 255] (uint8-rounded), resized to {self.input_size}x"
                f"{self.input_size} bilinear (align_corners=False)")


def load_inception(path: str | Path, *, input_size: int = INCEPTION_INPUT_SIZE) -> InceptionFeatures:
    """The FID/KID feature network at ``path`` (see :class:`InceptionFeatures`), frozen, in eval mode, on the CPU.

    Never downloads: a missing or unreadable file raises :class:`DataError` naming the path and where
    to get the weights.
    """
    path = Path(path).expanduser()
    remedy = ("download inception-2015-12-05.pt (the clean-fid/StyleGAN3 TorchScript Inception-v3) on a "
              "machine with internet access, copy it here and pass its path with --inception; nothing is "
              "downloaded at run time")
    if not path.is_file():
        raise DataError(f"Inception weights {path} do not exist; {remedy}")
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot load {path} as a TorchScript file ({exc}); {remedy}") from exc
    network.eval()
    arguments = [a.name for a in network.forward.schema.arguments]
    return InceptionFeatures(network, path=path, input_size=input_size,
                             return_features="return_features" in arguments)


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
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float, int]:
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
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def fid_implementation() -> str:
    """The FID/KID implementation and version, for reports."""
    import torchmetrics

    return (f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance and KernelInceptionDistance "
            "(degree 3, gamma 1/D, coef 1) on precomputed features")
