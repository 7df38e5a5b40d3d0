"""The linear probe of docs/method.md §4.1: a linear SVM on encoder features, mean ± std test error."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gali.engine.errors import DataError

# The SVM's C grid (log-spaced); the best value on the validation split is used for each draw.
PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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
            "mean": self.mean,
            "std": self.std,
            "n": len(self.errors),
            "errors": self.errors,
            "chosen_c": self.chosen_c,
            "labelled": self.labelled,
            "validation": self.validation,
            "test": self.test,
            "c_grid": list(self.c_grid),
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
    """Linear-SVM probe of representations (docs/method.md §4.1, following ALI): mean ± std test error.

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
    validation set, or fewer than two classes. Features that hold NaN or inf (an encoder that
    diverged) are not handed to scikit-learn: the result's mean and std are NaN, with no draws, and
    a ``RuntimeWarning`` says why.
    """
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

    for what, rows in (("training", train_features), ("test", test_features)):
        if not np.isfinite(rows).all():
            warnings.warn(
                f"probe: the {what} images' features hold NaN or inf (an encoder that gives non-finite outputs); "
                "the probe's error is NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            nan = float("nan")
            return ProbeResult(nan, nan, [], [], labelled, validation, len(test_labels), tuple(c_grid))

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    val_rows, pool = order[:validation], order[validation:]
    val_x, val_y = train_features[val_rows], train_labels[val_rows]
    errors: list[float] = []
    chosen: list[float] = []
    for _ in range(draws):
        rows = rng.choice(pool, size=labelled, replace=False)
        error, c = _fit_one_draw(
            train_features[rows], train_labels[rows], (val_x, val_y), (test_features, test_labels), c_grid
        )
        errors.append(error)
        chosen.append(c)
    array = np.asarray(errors)
    return ProbeResult(
        mean=float(array.mean()),
        std=float(array.std()),
        errors=errors,
        chosen_c=chosen,
        labelled=labelled,
        validation=validation,
        test=len(test_labels),
        c_grid=tuple(c_grid),
    )


def _fit_one_draw(
    x: np.ndarray,
    y: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float],
) -> tuple[float, float]:
    """One labelled set's probe: (test error, chosen C) of the SVM whose C is best on the validation set.

    Features are standardised with the labelled set's mean and std; the SVM is fitted on the linear
    kernel of the standardised labelled features.
    """
    from sklearn.svm import SVC  # imported here: scikit-learn takes seconds to import

    (val_x, val_y), (test_x, test_y) = validation, test
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
    test_kernel = ((test_x - mean) / std) @ x.T
    return float(np.mean(svm.predict(test_kernel) != test_y)), c
