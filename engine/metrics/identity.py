"""The reconstruction-identity metric: does G(μ_E(x)) keep what x is, not only roughly how it looks?

Pixel-MSE rewards a blur over a sharp digit of the wrong class, so this metric asks a classifier: a multinomial logistic
regression fitted on features of the real training images (pixels by default, or a frozen feature network's outputs the
caller gives), each feature standardised with the training set's mean and std.
- ``ceiling``: its accuracy on the real test images;
- ``accuracy``: its accuracy on those images' reconstructions against the inputs' labels (chance is 1 / classes);
- ``nearest``: the fraction of reconstructions nearer (Euclidean, in the standardised feature space) to their own input
  than to any other test image.
Everything here takes arrays the caller has computed, so each number can be checked by hand. Features that hold NaN or
inf (networks that diverged) are never handed to scikit-learn: the figures they would give are NaN, with a
``RuntimeWarning`` saying why, and the caller reports a NaN figure as such.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gali.engine.errors import DataError

# The logistic regression's inverse regularisation strength and iteration cap: on the digits'
# 32×32 pixels (1,438 training images) C = 0.01 gave the best test accuracy of 1e-3..1.
IDENTITY_C = 0.01
IDENTITY_MAX_ITER = 500


@dataclass(frozen=True)
class IdentityResult:
    """Accuracies in [0, 1] on ``images`` test images, and the classifier they came from."""

    ceiling: float
    accuracy: float
    nearest: float
    images: int
    classes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "ceiling": self.ceiling,
            "accuracy": self.accuracy,
            "nearest": self.nearest,
            "images": self.images,
            "classes": self.classes,
            "chance": 1.0 / self.classes,
            "classifier": f"sklearn LogisticRegression(C={IDENTITY_C}) on standardised features of the "
            "real training images",
        }


class IdentityClassifier:
    """A linear classifier of real training images' features, and the standardisation it was fitted in."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression  # imported here: scikit-learn takes seconds to import

        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        if len(features) != len(labels):
            raise ValueError("IdentityClassifier: features and labels must have the same number of rows")
        self.classes = len(np.unique(labels))
        if self.classes < 2:
            raise DataError(
                "the identity metric needs labelled training images of at least two classes; "
                f"the training split has {self.classes}"
            )
        with np.errstate(invalid="ignore", over="ignore"):  # inf features: NaN rows, refused below by name
            self.mean = features.mean(axis=0)
            self.std = features.std(axis=0)
        self.std[self.std == 0] = 1.0
        standardised = self.standardise(features)
        self.model = (  # None: features with NaN or inf, no classifier, every accuracy NaN
            LogisticRegression(C=IDENTITY_C, max_iter=IDENTITY_MAX_ITER).fit(standardised, labels)
            if _finite(standardised, "the training images' features")
            else None
        )

    def standardise(self, features: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite features stay non-finite, and are named
            return (np.asarray(features, dtype=np.float64) - self.mean) / self.std

    def accuracy(self, features: np.ndarray, labels: np.ndarray, what: str = "the features") -> float:
        """The accuracy on ``features``; NaN (with a warning) where they, or the training features, are not finite."""
        standardised = self.standardise(features)
        if self.model is None or not _finite(standardised, what):
            return float("nan")
        return float(np.mean(self.model.predict(standardised) == np.asarray(labels)))

    def score(self, real: np.ndarray, reconstructed: np.ndarray, labels: np.ndarray) -> IdentityResult:
        """The metric on test images ``real``, their reconstructions and the real images' labels."""
        if len(real) != len(reconstructed) or len(real) != len(labels) or len(real) < 2:
            raise ValueError(
                "IdentityClassifier.score: need at least two test images, one reconstruction and one label for each"
            )
        real_rows, reconstructed_rows = self.standardise(real), self.standardise(reconstructed)
        finite = np.isfinite(real_rows).all() and np.isfinite(reconstructed_rows).all()
        return IdentityResult(
            ceiling=self.accuracy(real, labels, "the test images' features"),
            accuracy=self.accuracy(reconstructed, labels, "the reconstructions' features"),
            nearest=nearest_own_fraction(real_rows, reconstructed_rows) if finite else float("nan"),
            images=len(labels),
            classes=self.classes,
        )


def _finite(rows: np.ndarray, what: str) -> bool:
    """Whether ``rows`` are all finite; if not, a warning naming ``what`` (scikit-learn is not given them)."""
    if np.isfinite(rows).all():
        return True
    warnings.warn(
        f"recon-identity: {what} hold NaN or inf (networks that give non-finite outputs); the figures measured on "
        "them are NaN",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def nearest_own_fraction(real: np.ndarray, reconstructed: np.ndarray, chunk: int = 1024) -> float:
    """The fraction of rows i whose ``reconstructed[i]`` is strictly nearest to ``real[i]`` among all ``real`` rows.

    Ties count as misses. Distances are Euclidean, computed ``chunk`` rows at a time.
    """
    a = torch.as_tensor(np.asarray(real, dtype=np.float64))
    b = torch.as_tensor(np.asarray(reconstructed, dtype=np.float64))
    hits = 0
    for start in range(0, len(b), chunk):
        distances = torch.cdist(b[start : start + chunk], a)  # (chunk, N)
        own = distances[torch.arange(len(distances)), torch.arange(start, start + len(distances))]
        distances[torch.arange(len(distances)), torch.arange(start, start + len(distances))] = float("inf")
        hits += int((own < distances.min(dim=1).values).sum())
    return hits / len(b)


def pixel_features(x: Tensor) -> np.ndarray:
    """Images (B, C, H, W) as (B, C·H·W) float64 rows: the identity metric's default features."""
    return x.detach().double().flatten(1).cpu().numpy()


def fit_identity_classifier(
    batches: Iterable[tuple[Tensor, Tensor | None]], features: Callable[[Tensor], np.ndarray], limit: int
) -> IdentityClassifier | None:
    """The classifier of the ``features`` of the first ``limit`` images of (images, labels) ``batches``;
    None when the images have no labels (``DataError`` for fewer than two classes)."""
    rows, labels, count = [], [], 0
    for x, y in batches:
        if y is None:
            return None
        rows.append(features(x))
        labels.append(y.cpu().numpy())
        count += len(y)
        if count >= limit:
            break
    return IdentityClassifier(np.concatenate(rows)[:limit], np.concatenate(labels)[:limit])
