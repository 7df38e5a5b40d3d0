"""Each metric of gali.engine.metrics against an independent computation on small synthetic cases."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from gali.engine import metrics
from gali.engine.errors import DataError, GaliError


def test_pixel_mse_is_measured_in_unit_space():
    x = torch.full((2, 3, 4, 4), -1.0)  # black in [-1, 1], 0 in [0, 1]
    x_hat = torch.zeros_like(x)  # grey, 0.5 in [0, 1]
    assert metrics.pixel_mse(x, x_hat) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    expected = np.mean((((a.numpy() + 1) / 2) - ((b.numpy() + 1) / 2)) ** 2)
    assert metrics.pixel_mse(a, b) == pytest.approx(float(expected), rel=1e-6)


def test_sharpness_is_one_for_the_images_themselves_below_for_blur_above_for_noise():
    """Issue 27 item 2: a reconstruction as sharp as the real images scores 1, a blurred one below, a noisy one above;
    checked against a loop over neighbouring pixels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    assert metrics.sharpness(x, x) == 1.0
    blurred = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert metrics.sharpness(x, blurred) < 0.7 < 1 < metrics.sharpness(x, noisy)

    def edges(images: Tensor) -> float:
        a = images.double().numpy()
        horizontal = sum(abs(a[b, c, i, j + 1] - a[b, c, i, j]) for b, c, i, j in np.ndindex(4, 3, 8, 7))
        vertical = sum(abs(a[b, c, i + 1, j] - a[b, c, i, j]) for b, c, i, j in np.ndindex(4, 3, 7, 8))
        return (horizontal + vertical) / (4 * 3 * 8 * 7)  # as many pairs each way

    assert metrics.sharpness(x, blurred) == pytest.approx(edges(blurred) / edges(x), rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sharpness(x, x[:, :, :4])


def test_summarize_is_mean_and_population_std_over_batches():
    values = [0.1, 0.2, 0.4]
    s = metrics.summarize(values)
    assert (s.mean, s.std, s.n) == (pytest.approx(np.mean(values)), pytest.approx(np.std(values)), 3)


def test_masked_pixel_mse_counts_only_masked_pixels():
    x = torch.zeros(2, 3, 6, 6)
    y = torch.full_like(x, 1.0)  # everything off by 1 in [-1, 1] (0.5 in [0, 1]) ...
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:3, 2:5] = 1
    mask[1, :, 0:1, 0:2] = 1
    y = torch.where(mask.bool(), torch.full_like(x, 0.2), y)  # ... except inside the mask: off by 0.2 (0.1)
    assert metrics.masked_pixel_mse(x, y, mask) == pytest.approx(0.01)
    # an explicit loop over the masked pixels, with a per-pixel error that varies
    g = torch.Generator().manual_seed(1)
    y = torch.rand(x.shape, generator=g) * 2 - 1
    errors = [((x[b, c, i, j] - y[b, c, i, j]) / 2) ** 2 for b, i, j in mask[:, 0].nonzero().tolist() for c in range(3)]
    assert metrics.masked_pixel_mse(x, y, mask) == pytest.approx(float(sum(errors) / len(errors)), rel=1e-6)
    with pytest.raises(ValueError, match="covers no pixel"):
        metrics.masked_pixel_mse(x, y, torch.zeros_like(mask))


def test_feature_mse_compares_network_outputs_after_resizing():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        small = [torch.nn.functional.interpolate(t, size=(4, 4), mode="nearest") for t in (x, y)]
        expected = float(((net(small[0]) - net(small[1])) ** 2).mean())
    assert metrics.feature_mse(net, x, y, input_size=4) == pytest.approx(expected, rel=1e-6)


def test_feature_mse_names_a_network_whose_output_has_no_batch_dimension():
    with pytest.raises(GaliError, match=r"the feature network /m\.pt must return one \(B, D\).*returned \(5,\)"):
        metrics.feature_mse(
            lambda t: t.sum(dim=(0, 2, 3)).repeat(5)[:5],
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, 3, 4, 4),
            name="the feature network /m.pt",
        )


def _blobs(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 10
    return centres[labels] + rng.normal(size=(n, dim)) * spread, labels


def test_linear_probe_is_perfect_on_linearly_separable_features():
    x, y = _blobs(300, 3, 20, 0.5, seed=0)
    tx, ty = x[:80], y[:80]
    result = metrics.linear_probe(x[80:], y[80:], tx, ty, labelled=100, draws=4, seed=0)
    assert result.mean == 0.0 and result.std == 0.0 and len(result.errors) == 4
    assert result.validation == (220 - 100) // 2 and result.test == 80


def test_linear_probe_is_at_chance_on_labels_unrelated_to_the_features():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 30)), rng.integers(0, 2, 400)
    result = metrics.linear_probe(x[100:], y[100:], x[:100], y[:100], labelled=100, draws=5, seed=0)
    assert 0.3 < result.mean < 0.7
    assert all(c in metrics.PROBE_C_GRID for c in result.chosen_c)


def test_linear_probe_says_when_there_are_too_few_training_images():
    x, y = _blobs(50, 2, 4, 0.5, seed=0)
    with pytest.raises(DataError, match=r"1000 labelled training images.*holds 50.*--probe-labelled"):
        metrics.linear_probe(x, y, x, y)


def _gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> Tensor:
    return torch.from_numpy(np.random.default_rng(seed).multivariate_normal(mean, cov, size=n))


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of the two samples' Gaussians, with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_of_identical_sets_is_zero():
    real = _gaussian(500, np.zeros(6), np.eye(6), seed=0)
    assert metrics.frechet_distance(real, real.clone()) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_the_gaussian_closed_form_computed_with_scipy():
    dim = 4
    rng = np.random.default_rng(3)
    m = rng.normal(size=(dim, dim))
    cov_a, cov_b = m @ m.T + np.eye(dim), np.diag([1.0, 2.0, 0.5, 3.0])
    mean_a, mean_b = np.zeros(dim), np.array([1.0, -0.5, 0.0, 2.0])
    real, fake = _gaussian(20000, mean_a, cov_a, seed=4), _gaussian(20000, mean_b, cov_b, seed=5)
    fid = metrics.frechet_distance(real, fake)
    # the same statistic from the same samples, computed independently
    assert fid == pytest.approx(_fid_scipy(real.numpy(), fake.numpy()), rel=1e-6)
    # and close to the population value of the two Gaussians
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    closed = float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert fid == pytest.approx(closed, rel=0.05)


def test_kid_is_the_unbiased_polynomial_mmd():
    real, fake = _gaussian(40, np.zeros(5), np.eye(5), seed=6), _gaussian(40, np.full(5, 0.5), np.eye(5), seed=7)
    mean, std, size = metrics.kernel_inception_distance(real, fake, subsets=3, subset_size=1000, seed=0)
    assert size == 40  # capped at the sets' size, so every subset is the whole set
    a, b = real.numpy(), fake.numpy()
    k = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731
    n = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.sum() / n**2
    assert mean == pytest.approx(mmd, rel=1e-6) and std == pytest.approx(0.0, abs=1e-9)
    assert metrics.kernel_inception_distance(real, real, subsets=2, subset_size=40)[0] < 1e-3 < mean


def test_to_uint8_range_rounds_to_the_png_grid():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5])
    assert metrics.to_uint8_range(x).tolist() == [0.0, 0.0, 128.0, 255.0, 255.0]


class InceptionLike(nn.Module):
    """A small random conv net with the clean-fid/StyleGAN Inception's call signature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, kernel_size=4, stride=4)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        h = torch.relu(self.conv(img / 128 - 1)).mean(dim=(2, 3))
        return h if return_features else h[:, :3]


class PlainFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, kernel_size=4, stride=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


class NoBatch(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean()


@pytest.mark.parametrize(
    ("cls", "dim", "call"), [(InceptionLike, 12, "return_features=True"), (PlainFeatures, 7, "model(x) on")]
)
def test_load_inception_accepts_both_torchscript_forms(tmp_path, cls, dim, call):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(cls()), str(path))
    net = metrics.load_inception(path, input_size=32)
    assert net.num_features == dim and call in net.describe()
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    features = net(images)
    assert features.shape == (3, dim) and features.dtype == torch.float64


def test_load_inception_errors_name_the_path_and_what_to_do(tmp_path):
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(DataError, match=rf"{missing} do not exist.*--inception.*nothing is downloaded"):
        metrics.load_inception(missing)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match=rf"cannot load {junk} as a TorchScript file"):
        metrics.load_inception(junk)
    bad = tmp_path / "bad.pt"
    torch.jit.save(torch.jit.script(NoBatch()), str(bad))
    with pytest.raises(GaliError, match=rf"{bad} must return \(N, D\) features.*returned \(\)"):
        metrics.load_inception(bad, input_size=8)


# -- reconstruction identity --------------------------------------------------------------------


def _clusters(n_per_class: int, classes: int = 3, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters: class c around 5·e_c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = 5 * np.eye(classes, dim)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_identity_is_perfect_for_exact_reconstructions_and_at_chance_for_shuffled_ones():
    train_x, train_y = _clusters(40)
    test_x, test_y = _clusters(20, seed=1)
    classifier = metrics.IdentityClassifier(train_x, train_y)
    exact = classifier.score(test_x, test_x, test_y)
    assert exact.ceiling == exact.accuracy == 1.0 and exact.nearest == 1.0 and exact.classes == 3
    # every reconstruction the same image of class 0: accuracy = the share of class 0, nearest ~ 0
    collapsed = classifier.score(test_x, np.repeat(test_x[:1], len(test_x), axis=0), test_y)
    assert collapsed.ceiling == 1.0 and collapsed.accuracy == pytest.approx(1 / 3)
    assert collapsed.nearest == pytest.approx(1 / len(test_x))  # only image 0 is nearest to itself
    # the reconstruction of each image is another image of its own class: right class, wrong image
    order = np.concatenate([np.roll(np.flatnonzero(test_y == c), 1) for c in range(3)])
    swapped = np.empty_like(test_x)
    swapped[np.sort(order)] = test_x[order]
    result = classifier.score(test_x, swapped, test_y)
    assert result.accuracy == 1.0 and result.nearest == 0.0
    assert result.to_dict()["chance"] == pytest.approx(1 / 3)


def test_nearest_own_fraction_matches_a_brute_force_count():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(37, 5))
    recon = real + rng.normal(scale=0.8, size=real.shape)
    distances = ((recon[:, None, :] - real[None, :, :]) ** 2).sum(-1)
    expected = np.mean([distances[i, i] < np.delete(distances[i], i).min() for i in range(len(real))])
    assert metrics.nearest_own_fraction(real, recon, chunk=8) == pytest.approx(expected)
    assert 0 < expected < 1  # the case is not trivial


def test_identity_classifier_names_single_class_training_data():
    with pytest.raises(DataError, match="at least two classes"):
        metrics.IdentityClassifier(np.zeros((4, 2)), np.zeros(4, dtype=int))


def test_held_out_metrics_give_mse_encoding_spread_and_identity():
    torch.manual_seed(0)

    class Encoder(nn.Module):  # μ = the mean pixel of each image repeated, log σ = −1 everywhere
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            mu = x.mean(dim=(1, 2, 3))[:, None].repeat(1, 4)
            return mu, torch.full_like(mu, -1.0)

    class Generator(nn.Module):  # a constant image of value μ
        def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
            return z[:, :1, None, None].expand(-1, 3, 2, 2)

    x = torch.rand(10, 3, 2, 2) * 2 - 1
    labels = torch.arange(10) % 2
    batches = [(x[:6], labels[:6]), (x[6:], labels[6:])]
    x_hat = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    figures = metrics.held_out_metrics(Generator(), Encoder(), batches)
    assert figures["recon_mse"] == pytest.approx(float(((x - x_hat) / 2).square().mean()), rel=1e-6)
    assert figures["recon_sharpness"] == 0  # constant reconstructions: no edges
    assert figures["e_sigma"] == pytest.approx(np.exp(-1.0), rel=1e-6)
    assert figures["e_mu_spread"] == pytest.approx(float(x.mean(dim=(1, 2, 3)).std()), rel=1e-5)
    assert "identity" not in figures  # no classifier given
    classifier = metrics.IdentityClassifier(metrics.pixel_features(x), labels.numpy())
    with_identity = metrics.held_out_metrics(Generator(), Encoder(), batches, classifier)
    expected = classifier.score(metrics.pixel_features(x), metrics.pixel_features(x_hat), labels.numpy())
    assert with_identity["identity"] == expected.accuracy and with_identity["identity_ceiling"] == expected.ceiling
