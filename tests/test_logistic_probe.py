"""probe-logistic (issue 24, item 2): the torch logistic regression against scikit-learn's, the choice of its L2
weight, the memory-mapped cache of training features, and the errors for bad input.

scikit-learn's ``LogisticRegression(C)`` minimises C·Σ cross-entropy + ½‖W‖² (intercept unpenalised), which is
n·C times gali's mean cross-entropy + l2/2·‖W‖² at C = 1 / (l2·n): the same minimiser. Both see the same
standardised features; scikit-learn's L-BFGS runs to a 1e-10 tolerance, so it stands for the exact optimum, and the
30 epochs of minibatch SGD come within 0.3 % accuracy, 2 % of the weights' norm and 0.03 in any probability on these
problems (measured over 4 seeds and 2 weights): the bounds asserted are 0.5 %, 5 % and 0.05.
"""

import numpy as np
import pytest
import torch

from gali.engine.errors import DataError, GaliError
from gali.engine.eval import probe_logistic
from gali.engine.eval.probe_logistic import FeatureCache
from gali.engine.eval.protocol import EvalOptions, evaluate
from gali.engine.metrics.logistic import fit_logistic, logistic_probe, top_k_correct
from gali.engine.nets.biggan import ResNetEncoder
from gali.pipelines import Batch
from tests.test_evaluate import _checkpoint_with_averages
from tests.test_launch import TINY


def _problem(n: int, seed: int, *, width: int = 48, classes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of correlated, unevenly scaled ReLU features of Gaussian classes (about 60 % separable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    z = rng.normal(size=(classes, 16))[y] + 2.0 * rng.normal(size=(n, 16))
    x = np.maximum(z @ rng.normal(size=(16, width)) + 1.0, 0) * rng.uniform(0.1, 10, size=width)
    return torch.tensor(x + 5 * rng.normal(size=width), dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("l2", [1e-3, 1e-2])
def test_the_fit_matches_scikit_learns_multinomial_logistic_regression(l2):
    from sklearn.linear_model import LogisticRegression

    x, y = _problem(5000, seed=0)
    train, test = slice(0, 3000), slice(3000, None)
    model = fit_logistic(x[train], y[train], torch.arange(3000), classes=8, l2=l2, seed=0)
    standardised = [((x[part] - model.mean) / model.std).numpy() for part in (train, test)]
    reference = LogisticRegression(C=1 / (l2 * 3000), max_iter=10_000, tol=1e-10).fit(standardised[0], y[train])
    accuracy = top_k_correct(model, x[test], y[test], (1,))[0] / 2000
    assert abs(accuracy - reference.score(standardised[1], y[test])) <= 0.005
    weight = torch.tensor(reference.coef_.T, dtype=torch.float32)
    assert float((model.weight - weight).norm() / weight.norm()) <= 0.05
    probabilities = torch.tensor(reference.predict_proba(standardised[1]), dtype=torch.float32)
    assert float((torch.softmax(model.logits(x[test]), dim=1) - probabilities).abs().max()) <= 0.05


def test_the_l2_weight_is_the_held_out_best_and_the_fit_is_deterministic():
    x, y = _problem(2500, seed=1)
    result = logistic_probe(x[:2000], y[:2000], x[2000:], y[2000:], validation=500, l2_grid=(1e3, 1e-4), seed=3)
    assert result.l2_grid == (1e-4, 1e3) and result.chosen_l2 == 1e-4  # 1e3 leaves the weights near 0
    # the held-out rows and fitted rows of seed 3, each weight fitted again: the accuracies recorded and the best
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(3))
    held, fitted = order[:500], order[500:]
    for l2, recorded in zip(result.l2_grid, result.validation_top1, strict=True):
        model = fit_logistic(x[:2000], y[:2000], fitted, classes=8, l2=l2, seed=3)
        assert top_k_correct(model, x[held], y[held], (1,))[0] / 500 == recorded
    assert result.validation_top1[0] > result.validation_top1[1] + 0.2
    assert 0.5 < result.top1 < result.top5 <= 1 and (result.train, result.validation, result.test) == (1500, 500, 500)
    again = logistic_probe(x[:2000], y[:2000], x[2000:], y[2000:], validation=500, l2_grid=(1e3, 1e-4), seed=3)
    assert again.to_dict() == result.to_dict()
    tied = logistic_probe(x[:2000], y[:2000], x[2000:], y[2000:], validation=500, l2_grid=(1e4, 1e5), seed=3)
    assert tied.validation_top1[0] == tied.validation_top1[1] and tied.chosen_l2 == 1e5  # the larger on ties


def test_bad_training_data_is_refused_saying_what_to_change():
    x, y = _problem(300, seed=2)
    with pytest.raises(DataError, match="at least two classes among the training images; it has one"):
        logistic_probe(x, torch.zeros_like(y), x, y)
    with pytest.raises(DataError, match=r"holds out 300 of the 300 training images.*--probe-logistic-validation"):
        logistic_probe(x, y, x, y, validation=300)
    with pytest.raises(ValueError, match="matching rows"):
        logistic_probe(x, y[:-1], x, y)
    x[7, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        assert np.isnan(logistic_probe(x, y, x, y, epochs=1).top1)


def test_the_features_are_mu_then_the_resnet_encoders_pooled_trunk():
    torch.manual_seed(0)
    E = ResNetEncoder(resolution=32, latent_dim=4, width=1 / 16).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    features = probe_logistic.probe_features(E, x)
    assert features.shape == (3, 4 + 128)  # μ, then 32 × the stem's 4 channels
    torch.testing.assert_close(features[:, :4], E(x)[0], rtol=0, atol=0)


def _cache(folder, rows: int = 10) -> FeatureCache:
    """A whole cache of ``rows`` rows of width 3 in two shards."""
    cache = FeatureCache({"images": rows, "seed": 0}, str(folder))
    shards = [
        cache.write(start, np.full((stop - start, 3), start, np.float32), np.arange(start, stop))
        for start, stop in ((0, 6), (6, rows))
    ]
    cache.commit(shards, width=3)
    return cache


def test_the_cache_is_read_memory_mapped_in_row_order_and_keyed(tmp_path):
    features, labels = _cache(tmp_path).load()
    assert all(isinstance(array, np.memmap) for array in features + labels)
    assert np.concatenate(labels).tolist() == list(range(10)) and np.concatenate(features)[6:, 0].tolist() == [6] * 4
    assert FeatureCache({"images": 10, "seed": 1}, str(tmp_path)).load() is None  # another key, another folder


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-8]), "features-0000000006.npy", "is missing or unreadable"),
        (lambda p: np.save(p, np.zeros((4, 2), np.float32)), "features-0000000006.npy", r"shape \(4, 2\).*\(4, 3\)"),
        (lambda p: np.save(p, np.zeros(6, np.int32)), "labels-0000000000.npy", "holds int32"),
        (lambda p: p.unlink(), "labels-0000000006.npy", "is missing"),
        (lambda p: p.write_text("{"), "manifest.json", "is unreadable"),
    ],
    ids=["truncated", "wrong-shape", "wrong-type", "missing", "bad-manifest"],
)
def test_a_damaged_cache_is_refused_naming_the_file_and_the_remedy(tmp_path, damage, file, message):
    cache = _cache(tmp_path)
    damage(cache.folder / file)
    with pytest.raises(GaliError, match=message) as error:
        cache.load()
    assert str(cache.folder / file) in str(error.value) and cache.digest in str(error.value)
    assert f"delete the folder {cache.folder}" in str(error.value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained demo-preset checkpoint at test_launch's tiny size (digits: 359 test images)."""
    root = tmp_path_factory.mktemp("probe-logistic")
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(root / "cache"))
    yield _checkpoint_with_averages(root / "run", "demo", TINY)
    mp.undo()


def test_a_second_evaluation_reads_the_training_features_from_the_cache(checkpoint, tmp_path, monkeypatch):
    extracted: list[int] = []

    def counted(E, x):
        extracted.append(len(x))
        return features(E, x)

    features = probe_logistic.probe_features
    monkeypatch.setattr(probe_logistic, "probe_features", counted)
    options = EvalOptions(probe_logistic_images=250, probe_logistic_epochs=5, cache_dir=str(tmp_path))
    results = []
    for _ in range(2):
        extracted.clear()
        results.append(evaluate(checkpoint, "probe-logistic", options, log=lambda line: None).results)
    first, second = (r["probe-logistic"] for r in results)
    assert sum(extracted) == 359  # the evaluation split's images only: none of the training split's 250
    assert not first["cache_reused"] and second["cache_reused"] and first["train_images"] == 250
    assert {**first, "cache_reused": None} == {**second, "cache_reused": None}
    assert first["features"] == "mu of E" and first["width"] == 8 and first["classes"] == 10
    shard = next(tmp_path.glob("probe-logistic-*/features-*.npy"))
    assert isinstance(np.load(shard, mmap_mode="r"), np.memmap)
    np.save(shard, np.zeros((250, 9), np.float32))
    with pytest.raises(GaliError, match=rf"{shard} .*shape \(250, 9\).*delete the folder"):
        evaluate(checkpoint, "probe-logistic", options, log=lambda line: None)


def test_unlabelled_training_images_and_bad_options_are_refused(checkpoint, tmp_path, monkeypatch):
    read_block = probe_logistic.read_block

    def unlabelled(batches, block):
        for index, start, batch in read_block(batches, block):
            yield index, start, Batch(x=batch.x, labels=None, masks=None)

    monkeypatch.setattr(probe_logistic, "read_block", unlabelled)
    options = EvalOptions(probe_logistic_images=200, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="'probe-logistic' needs labelled images; the train split"):
        evaluate(checkpoint, "probe-logistic", options, log=lambda line: None)
    for option, message in (
        ({"probe_logistic_epochs": 0}, "--probe-logistic-epochs must be >= 1"),
        ({"split": "train"}, "use --split test"),
        ({"probe_logistic_validation": 200}, "holds out 200 of the 200 training images"),
    ):
        with pytest.raises(GaliError, match=message):
            evaluate(checkpoint, "probe-logistic", EvalOptions(**{**options.__dict__, **option}), log=lambda line: None)
