"""A checkpoint with a NaN or inf in any floating tensor is refused by name (exit 2) by every command that reads it,
and skipped by resume; metric code never hands non-finite features to scikit-learn (issue 29, item 1)."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gali.engine.cli import main
from gali.engine.metrics.identity import IdentityClassifier
from gali.engine.metrics.probe import linear_probe
from tests.test_launch import TINY as LAUNCH_TINY

# Two steps of 32 images, a checkpoint after each: checkpoint-0000000032.pt and checkpoint-0000000064.pt.
TINY = [*LAUNCH_TINY, "run.kimg=0.064", "run.snapshot_kimg=0.032", "run.ema_kimg=0.5", "run.ema_bn_batches=0"]
NEWEST = "checkpoint-0000000064.pt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def digits_cache(cache, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(cache))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """A finished tiny run's folder (read only: tests damage copies)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(cache))
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, f"run.dir={run_dir}"]) == 0
    mp.undo()
    return run_dir


def _damaged_copy(trained: Path, tmp_path: Path, where: tuple, value: float, *, name: str = NEWEST) -> Path:
    """A copy of the run folder whose checkpoint ``name`` has ``value`` in the first element of the tensor at
    ``where`` (keys into the saved dictionary: ``("G", "net.0.weight")``, ``("opt_ge", "state", 3, "exp_avg")``)."""
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(trained, run_dir)
    path = run_dir / name
    state = torch.load(path, weights_only=True)
    tensor = state
    for key in where:
        tensor = tensor[key]
    tensor[(0,) * tensor.dim()] = value
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("G_ema", "net.0.weight"), float("nan")),  # a moving average
        (("E", "convs.1.1.running_var"), float("inf")),  # BatchNorm statistics
        (("D", "branches.image.2.parametrizations.weight.original"), float("-inf")),  # a live weight
        (("opt_ge", "state", 3, "exp_avg_sq"), float("nan")),  # an optimizer moment
    ],
    ids=("ema", "batchnorm", "weight", "optimizer"),
)
def test_sample_reconstruct_and_eval_refuse_a_non_finite_checkpoint_by_name(trained, tmp_path, capsys, where, value):
    checkpoint = _damaged_copy(trained, tmp_path, where, value)
    named = ".".join(map(str, where))
    before = sorted(p.name for p in checkpoint.parent.iterdir())
    for command in (["sample", "--n", "4"], ["reconstruct", "--n", "4"], ["eval", "--metrics", "pixel-mse"]):
        assert main([command[0], str(checkpoint), *command[1:]]) == 2, command
        err = capsys.readouterr().err
        assert f"checkpoint {checkpoint} is damaged: {named} holds non-finite values (NaN or inf)" in err, command
    assert main(["sample", str(checkpoint), "--n", "4", "--live"]) == 2  # one bad tensor refuses the whole file
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == before  # no grid, no eval.json


def test_resume_skips_a_non_finite_checkpoint_and_takes_the_one_before(trained, tmp_path, capsys):
    checkpoint = _damaged_copy(trained, tmp_path, ("G_ema", "net.0.weight"), float("nan"))
    run_dir = checkpoint.parent
    assert main(["train", "--resume", str(checkpoint), "run.kimg=0.096"]) == 2  # the file named: refused
    assert f"checkpoint {checkpoint} is damaged: G_ema.net.0.weight holds non-finite" in capsys.readouterr().err
    # run.dir= (and --resume RUN_DIR): the newest readable checkpoint, the damaged one named and skipped
    assert main(["train", *TINY, f"run.dir={run_dir}", "run.kimg=0.096"]) == 0
    out = capsys.readouterr().out
    assert f"resume: skipping {NEWEST}: checkpoint {checkpoint} is damaged: G_ema.net.0.weight holds" in out
    assert "resumed from checkpoint-0000000032.pt at 0.032 kimg" in out
    state = torch.load(run_dir / "checkpoint-0000000096.pt", weights_only=True)
    assert state["images_seen"] == 96 and all(torch.isfinite(t).all() for t in state["G_ema"].values())
    assert torch.isfinite(torch.load(run_dir / NEWEST, weights_only=True)["G_ema"]["net.0.weight"]).all()  # rewritten


def test_resume_refuses_a_run_folder_whose_every_checkpoint_is_non_finite(trained, tmp_path, capsys):
    run_dir = _damaged_copy(trained, tmp_path, ("E_ema", "convs.0.1.running_mean"), float("nan")).parent
    _damaged_copy(trained, tmp_path, ("opt_d", "state", 0, "exp_avg"), float("inf"), name="checkpoint-0000000032.pt")
    assert main(["train", "--resume", str(run_dir), "run.kimg=0.096"]) == 2
    captured = capsys.readouterr()
    assert f"resume: skipping {NEWEST}: checkpoint {run_dir / NEWEST} is damaged: E_ema.convs.0.1.running_mean" in (
        captured.out
    )
    assert "skipping checkpoint-0000000032.pt" in captured.out and "opt_d.state.0.exp_avg holds" in captured.out
    assert f"run folder {run_dir} holds no readable checkpoint-*.pt" in captured.err


def test_eval_of_networks_that_give_nan_reports_nan_figures_not_a_scikit_learn_traceback(trained, tmp_path, capsys):
    """Finite weights whose networks give NaN (a negative BatchNorm variance in E's moving average): the identity
    classifier and the probe's SVMs are not handed NaN features; the figures are NaN, null in the JSON, exit 2."""
    checkpoint = _damaged_copy(trained, tmp_path, ("E_ema", "convs.0.1.running_var"), -1.0)
    argv = ["eval", str(checkpoint), "--metrics", "recon-identity,probe", "--identity-images", "200"]
    argv += ["--probe-labelled", "20", "--probe-draws", "1", "--probe-pool", "100"]
    with pytest.warns(RuntimeWarning, match="hold NaN or inf") as caught:
        assert main(argv) == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "recon-identity: the reconstructions' features hold NaN or inf" in messages
    assert "probe: the training images' features hold NaN or inf" in messages
    err = capsys.readouterr().err
    assert "recon-identity.accuracy" in err and "probe.mean" in err and "came out non-finite" in err
    assert "recon-identity.ceiling" not in err  # the real images' accuracy is measured: it is finite
    assert main([*argv[:3], "recon-identity", *argv[4:6], "--live"]) == 0  # the live E is fine


def test_the_identity_metric_never_hands_non_finite_features_to_scikit_learn():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(40, 6)), np.arange(40) % 2
    classifier = IdentityClassifier(train, labels)
    real, test_labels = rng.normal(size=(10, 6)), np.arange(10) % 2
    recon = real.copy()
    recon[3, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="the reconstructions' features hold NaN or inf"):
        result = classifier.score(real, recon, test_labels)
    assert np.isfinite(result.ceiling) and np.isnan(result.accuracy) and np.isnan(result.nearest)
    train[0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="the training images' features hold NaN or inf"):
        broken = IdentityClassifier(train, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(broken.score(real, real, test_labels).ceiling)


def test_the_probe_never_hands_non_finite_features_to_scikit_learn():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(60, 5)), np.arange(60) % 3
    test, test_labels = rng.normal(size=(12, 5)), np.arange(12) % 3
    assert np.isfinite(linear_probe(train, labels, test, test_labels, labelled=20, draws=2).mean)
    test[5, 1] = np.nan
    with pytest.warns(RuntimeWarning, match="probe: the test images' features hold NaN or inf"):
        result = linear_probe(train, labels, test, test_labels, labelled=20, draws=2)
    assert np.isnan(result.mean) and np.isnan(result.std) and result.errors == [] and result.test == 12
    train[7, 0] = -np.inf
    with pytest.warns(RuntimeWarning, match="probe: the training images' features hold NaN or inf"):
        assert np.isnan(linear_probe(train, labels, test, test_labels, labelled=20, draws=2).mean)
