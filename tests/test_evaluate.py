"""gali eval: a checkpoint and a data split in, the metrics' table and JSON out; every bad input named.

The checkpoint is an untrained quarter-width demo model on the digits (the metrics' arithmetic is
tested in test_metrics.py; here the wiring is). A small randomly initialised conv net with the
clean-fid/StyleGAN Inception's call signature stands in for Inception-v3: torchvision does not
import beside this torch build and nothing may be downloaded.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from gali.engine.cli import main
from gali.engine.errors import DataError, GaliError
from gali.engine.eval.protocol import EvalOptions, SplitBatches, evaluate, parse_metrics
from gali.engine.loop.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.ema import WeightAverage
from gali.engine.loop.runtime import seed_everything
from gali.engine.method.tuple_spec import load_spec
from gali.engine.metrics.reconstruction import held_out_metrics
from gali.engine.nets.networks import build_networks
from gali.pipelines import make_pipeline

TINY = ["model.width=0.25", "model.latent_dim=32", "data.workers=0"]
CPU = torch.device("cpu")


class InceptionLike(nn.Module):
    """Random conv features, called as model(images in [0, 255], return_features=True) -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=8, stride=8)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        return torch.relu(self.conv(img / 128 - 1)).mean(dim=(2, 3))


class Vector(nn.Module):
    """A feature network with the wrong output: one number per batch instead of one row per image."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean()


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=4, stride=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).flatten(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint path, config, folder for networks) with GALI_CACHE in a temporary folder."""
    root = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(root / "cache"))
    cfg = load_config("demo", TINY)
    seed_everything(0)
    nets = build_networks(
        cfg.model, cfg.method, load_spec(cfg.method.tuples), resolution=cfg.data.resolution, device=CPU
    )
    x = next(iter(make_pipeline(cfg.data, split="train", batch_size=32, device=CPU, seed=0))).x
    nets.G.init_output_bias(x)
    (root / "run").mkdir()
    checkpoint = save_checkpoint(
        root / "run" / "checkpoint-0000000032.pt",
        {
            "config": cfg.to_dict(),
            "kimg": 0.032,
            "epoch": 1,
            "extra_dim": None,
            "G": nets.G.state_dict(),
            "E": nets.E.state_dict(),
            "D": nets.D.state_dict(),
        },
    )
    torch.jit.save(torch.jit.script(InceptionLike()), str(root / "inception.pt"))
    torch.jit.save(torch.jit.script(Features()), str(root / "features.pt"))
    torch.jit.save(torch.jit.script(Vector()), str(root / "vector.pt"))
    yield checkpoint, cfg, root, nets
    mp.undo()


def test_split_batches_yield_every_image_once_with_a_partial_last_batch(setup):
    _, cfg, _, _ = setup
    batches = SplitBatches(cfg.data, "test", batch_size=100, device=CPU, seed=0)
    sizes, labels = [], []
    for batch in batches:
        sizes.append(batch.x.shape[0])
        labels.append(batch.labels)
    n = batches.num_images
    assert sizes == [100] * (n // 100) + ([n % 100] if n % 100 else []) and n % 100  # the digits' split is not whole
    everything = next(iter(make_pipeline(cfg.data, split="test", batch_size=n, device=CPU, seed=0)))
    assert torch.equal(torch.cat(labels).sort().values, everything.labels.sort().values)
    limited = [b.x.shape[0] for b in SplitBatches(cfg.data, "test", batch_size=100, device=CPU, seed=0, limit=150)]
    assert limited == [100, 50]


def test_pixel_mse_matches_the_reconstruction_error_of_every_image(setup):
    checkpoint, cfg, _, nets = setup
    n = SplitBatches(cfg.data, "test", batch_size=1, device=CPU, seed=0).num_images
    report = evaluate(checkpoint, "pixel-mse", EvalOptions(batch_size=n), log=lambda line: None)
    one_batch = report.results["pixel-mse"]
    pipeline = make_pipeline(cfg.data, split="test", batch_size=n, device=CPU, seed=0)  # one batch of all
    expected = held_out_metrics(nets.G, nets.E, ((b.x, None) for b in pipeline))["recon_mse"]
    assert one_batch["n"] == 1 and one_batch["images"] == n
    assert one_batch["mean"] == pytest.approx(expected, rel=1e-5) and one_batch["std"] == 0.0
    batched = evaluate(checkpoint, "pixel-mse", EvalOptions(), log=lambda line: None).results["pixel-mse"]
    assert batched["n"] == -(-n // 100) and batched["std"] > 0
    assert batched["mean"] == pytest.approx(expected, rel=0.05)  # the mean over batches weights the last one more


def test_fid_kid_run_end_to_end_offline_with_a_cached_reference(setup):
    checkpoint, _, root, _ = setup
    options = EvalOptions(
        inception=str(root / "inception.pt"),
        inception_input_size=64,
        fid_samples=300,
        kid_subsets=5,
        kid_subset_size=200,
        cache_dir=str(root / "fid"),
    )
    lines: list[str] = []
    first = evaluate(checkpoint, "fid,kid", options, log=lines.append).results
    assert np.isfinite(first["fid"]["value"]) and first["fid"]["value"] > 0
    assert first["kid"]["subset_size"] == 200 and first["kid"]["subsets"] == 5
    assert "torchmetrics" in first["fid"]["implementation"] and "return_features=True" in first["fid"]["network_input"]
    assert first["fid"]["reference"]["cache_reused"] is False and any("cached in" in line for line in lines)
    assert len(list((root / "fid").glob("reference-*.pt"))) == 1
    again = evaluate(checkpoint, "fid,kid", options, log=lines.append).results
    assert again["fid"]["reference"]["cache_reused"] is True
    assert again["fid"]["value"] == pytest.approx(first["fid"]["value"], rel=1e-9)
    assert again["kid"]["mean"] == pytest.approx(first["kid"]["mean"], rel=1e-9)
    other_seed = evaluate(checkpoint, "fid", EvalOptions(**{**options.__dict__, "seed": 1}), log=lines.append)
    assert other_seed.results["fid"]["reference"]["cache_reused"] is False  # the seed is part of the key


def test_json_is_written_next_to_the_checkpoint_and_merged(setup, tmp_path):
    _, _, root, _ = setup
    checkpoint = tmp_path / "checkpoint-0000000032.pt"
    checkpoint.write_bytes(setup[0].read_bytes())
    evaluate(checkpoint, "pixel-mse", EvalOptions(), log=lambda line: None)
    report = evaluate(
        checkpoint, "inpaint,feature-mse", EvalOptions(feature_model=str(root / "features.pt")), log=lambda line: None
    )
    assert report.json_path == checkpoint.with_name("checkpoint-0000000032.eval.json")
    document = json.loads(report.json_path.read_text())
    assert document["checkpoint"] == str(checkpoint)
    assert document["config"]["method"]["tuples"] == "gali4-alice-mu"  # the demo's
    assert set(document["metrics"]) == {"pixel-mse", "inpaint", "feature-mse"}
    inpaint = document["metrics"]["inpaint"]
    low, high = inpaint["mask"]["drawn_sides"]
    assert 4 <= low <= high <= 27  # 8..54 on 64x64, scaled to 32x32
    assert inpaint["pixel_mse"]["mean"] > 0 and inpaint["feature_mse"]["mean"] > 0
    assert "inpaint" in report.table and "feature-mse" in report.table


def test_inpaint_takes_the_pipelines_per_sample_masks_for_runs_trained_with_them(setup, tmp_path, monkeypatch):
    """A run with method.mask_source=pipeline is evaluated on the pipeline's per-image evaluation boxes: the same
    mask for an image whatever the batch size."""
    from gali.engine.eval import inpainting as protocol  # the inpaint metric's module calls inpaint

    cfg = load_config("demo", [*TINY, "method.tuples=gali-mix", "method.mask_source=pipeline"])
    seed_everything(0)
    nets = build_networks(
        cfg.model, cfg.method, load_spec(cfg.method.tuples), resolution=cfg.data.resolution, device=CPU
    )
    checkpoint = save_checkpoint(
        tmp_path / "checkpoint-0000000032.pt",
        {
            "config": cfg.to_dict(),
            "kimg": 0.032,
            "epoch": 1,
            "extra_dim": None,
            "G": nets.G.state_dict(),
            "E": nets.E.state_dict(),
            "D": nets.D.state_dict(),
        },
    )
    used: dict[int, dict[bytes, Tensor]] = {}
    inpaint = protocol.inpaint

    def spy(G, E, x, params, *, kind, **kwargs):
        assert kind == "dense"
        for image, mask in zip(x, params, strict=True):
            used[batch_size][image.numpy().tobytes()] = mask.clone()
        return inpaint(G, E, x, params, kind=kind, **kwargs)

    monkeypatch.setattr(protocol, "inpaint", spy)
    for batch_size in (50, 77):
        used[batch_size] = {}
        result = evaluate(checkpoint, "inpaint", EvalOptions(batch_size=batch_size), log=lambda line: None)
        mask = result.results["inpaint"]["mask"]
        assert "per sample by the pipeline" in mask["source"] and "drawn_sides" not in mask
        low, high = mask["coverage"]  # rounded to 4 digits; sides 4..27 at 32²
        assert 16 / 1024 - 1e-4 <= low <= high <= 27 * 27 / 1024 + 1e-4
    assert used[50].keys() == used[77].keys() and len(used[50]) > 300
    assert all(torch.equal(used[50][key], used[77][key]) for key in used[50])


def test_probe_reports_test_error_over_draws(setup):
    checkpoint, _, _, _ = setup
    result = evaluate(
        checkpoint, "probe", EvalOptions(probe_labelled=200, probe_draws=2, probe_pool=500), log=lambda line: None
    ).results["probe"]
    assert result["n"] == 2 and result["labelled"] == 200 and result["validation"] == 150
    assert result["train_images_read"] == 500 and 0 <= result["mean"] < 0.9  # ten classes: chance is 0.9


def test_recon_identity_reports_ceiling_accuracy_and_nearest(setup):
    checkpoint, _, root, _ = setup
    report = evaluate(checkpoint, "recon-identity,pixel-mse", EvalOptions(identity_images=600), log=lambda line: None)
    result = report.results["recon-identity"]
    assert result["ceiling"] > 0.8 and result["classes"] == 10 and result["features"] == "pixels"
    # the untrained G outputs about the mean image for every input: about one class for all, near chance
    assert result["accuracy"] < 0.3 and result["nearest"] < 0.05
    assert result["images"] == report.results["pixel-mse"]["images"]
    assert "recon-identity" in report.table and f"real images {result['ceiling']:.3f}" in report.table
    with_features = evaluate(
        checkpoint,
        "recon-identity",
        EvalOptions(identity_images=600, feature_model=str(root / "features.pt")),
        log=lambda line: None,
    )
    assert with_features.results["recon-identity"]["features"]["feature_model"] == str(root / "features.pt")


def test_bn_recalibration_changes_the_figures_and_not_the_checkpoint(setup):
    checkpoint, _, _, _ = setup
    before = checkpoint.read_bytes()
    plain = evaluate(checkpoint, "pixel-mse", EvalOptions(), log=lambda line: None).results["pixel-mse"]
    lines: list[str] = []
    recalibrated = evaluate(
        checkpoint, "pixel-mse", EvalOptions(bn_recalibrate=2, batch_size=50), log=lines.append
    ).results["pixel-mse"]
    assert plain["bn_recalibrated_images"] == 0 and recalibrated["bn_recalibrated_images"] == 100
    assert recalibrated["mean"] != plain["mean"]
    assert any("recomputed on 100 training images" in line for line in lines)
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    ("metrics", "options", "error", "message"),
    [
        ("pixel-mse,psnr", {}, GaliError, r"unknown metric 'psnr' in --metrics; accepted .*pixel-mse.*inpaint"),
        ("fid", {}, GaliError, r"need --inception PATH"),
        ("feature-mse", {}, GaliError, r"needs --feature-model PATH"),
        (
            "fid",
            {"inception": "/nowhere/inception-2015-12-05.pt"},
            DataError,
            r"/nowhere/inception-2015-12-05.pt do not exist.*--inception",
        ),
        (
            "feature-mse",
            {"feature_model": "/nowhere/net.pt"},
            GaliError,
            r"--feature-model /nowhere/net.pt does not exist",
        ),
        ("probe", {"probe_labelled": 5000}, DataError, r"5000 labelled training images.*--probe-labelled"),
        ("probe", {"split": "train"}, GaliError, r"use --split test"),
        ("recon-identity", {"split": "train"}, GaliError, r"'recon-identity' fits its classifier.*use --split test"),
        ("pixel-mse", {"bn_recalibrate": -1}, GaliError, r"--bn-recalibrate must be >= 0"),
        ("recon-identity", {"identity_images": 0}, GaliError, r"--identity-images must be >= 1"),
        ("pixel-mse", {"data_overrides": ("run.kimg=3",)}, GaliError, r"only data\.\* overrides.*run\.kimg=3"),
    ],
)
def test_bad_inputs_raise_errors_that_name_them(setup, metrics, options, error, message):
    checkpoint, _, _, _ = setup
    with pytest.raises(error, match=message):
        evaluate(checkpoint, metrics, EvalOptions(**options), log=lambda line: None)


def test_a_feature_network_with_the_wrong_output_shape_is_named(setup):
    checkpoint, _, root, _ = setup
    path = root / "vector.pt"
    with pytest.raises(GaliError, match=rf"feature network {path} must return one \(B, D\).*returned \(\)"):
        evaluate(checkpoint, "feature-mse", EvalOptions(feature_model=str(path)), log=lambda line: None)


def test_parse_metrics_keeps_order_and_drops_repeats():
    assert parse_metrics("probe, pixel-mse,probe") == ("probe", "pixel-mse")
    with pytest.raises(GaliError, match="none given"):
        parse_metrics(" , ")


def test_cli_eval_prints_the_table_and_reports_errors(setup, capsys, tmp_path):
    checkpoint, _, _, _ = setup
    assert main(["eval", str(checkpoint), "data.workers=0", "--metrics", "pixel-mse"]) == 0
    out = capsys.readouterr().out
    assert "pixel-mse" in out and "±" in out and "eval.json" in out
    missing = tmp_path / "checkpoint-9.pt"
    assert main(["eval", str(missing)]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    """A folder data set of a handful of images: train/ and test/, each two classes of two 20x20 PNGs."""
    root = tmp_path_factory.mktemp("few")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _checkpoint_with_averages(folder: Path, preset: str, overrides: list[str]) -> Path:
    """An untrained checkpoint of ``preset`` with G_ema and E_ema, written by the engine's own save path."""
    cfg = load_config(preset, overrides)
    seed_everything(0)
    nets = build_networks(
        cfg.model, cfg.method, load_spec(cfg.method.tuples), resolution=cfg.data.resolution, device=CPU
    )
    ema = WeightAverage(nets, ema_kimg=1, rampup=0, start_kimg=0)
    folder.mkdir()
    return save_checkpoint(folder / "checkpoint-0000000002.pt", Checkpoint(cfg, nets, ema=ema).state_dict())


@pytest.mark.parametrize(
    ("preset", "model", "resolution"),
    [
        ("svhn32-gali4", ["model.width=0.25", "model.latent_dim=32"], 32),
        ("celeba64-gali4", ["model.width=0.125", "model.latent_dim=32"], 64),
        ("imagenet128-gali4", [f"model.width={1 / 48}", "model.latent_dim=12"], 128),  # BigGAN G, ResNet E: ch 2, 1
    ],
    ids=("32x32", "64x64", "128x128"),
)
def test_cli_eval_takes_the_checkpoints_whole_config_at_every_resolution(
    preset, model, resolution, few_images, tmp_path, capsys
):
    """The checkpoint's model is validated against its own data, not the default 32² model (issue 21, finding 5);
    the data overrides go on top of its whole config, as gali train --resume applies them."""
    checkpoint = _checkpoint_with_averages(
        tmp_path / "run", preset, [*model, "data.root=/moved/away", "data.workers=0"]
    )
    argv = ["eval", str(checkpoint), f"data.root={few_images}", "--metrics", "pixel-mse", "--batch-size", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    document = json.loads(checkpoint.with_name("checkpoint-0000000002.eval.json").read_text())
    result = document["metrics"]["pixel-mse"]
    assert result["images"] == 4 and result["n"] == 2 and result["weights"] == "ema"
    assert math.isfinite(result["mean"]) and result["mean"] > 0 and math.isfinite(result["std"])
    trained = load_checkpoint(checkpoint)[0].to_dict()
    assert document["config"]["model"] == trained["model"] and document["config"]["data"]["resolution"] == resolution
    assert document["config"]["data"]["root"] == str(few_images)  # the override, recorded with the figures


def test_cli_eval_exits_2_naming_a_non_finite_metric_after_writing_it(few_images, tmp_path, capsys):
    """G's moving average gives NaN (a negative BatchNorm variance: finite, so the checkpoint is read; a NaN weight
    is refused on reading, tests/test_damaged_checkpoints.py): the table and the JSON (null) are written, then exit
    2 naming the metric and the checkpoint; the live weights of the same checkpoint are finite and exit 0."""
    checkpoint = _checkpoint_with_averages(
        tmp_path / "run", "demo", [*TINY, "data.source=folder", f"data.root={few_images}"]
    )
    state = torch.load(checkpoint, weights_only=True)
    state["G_ema"]["net.1.running_var"].fill_(-1.0)  # G's first BatchNorm: sqrt(-1 + eps) is NaN
    torch.save(state, checkpoint)
    assert main(["eval", str(checkpoint), "--metrics", "pixel-mse", "--batch-size", "2"]) == 2
    out, err = capsys.readouterr()
    assert "nan ± nan" in out and "eval.json" in out
    assert f"checkpoint {checkpoint}: pixel-mse.mean, pixel-mse.std, pixel-mse.image_mean came out non-finite" in err
    document = json.loads(checkpoint.with_name("checkpoint-0000000002.eval.json").read_text())  # strict JSON: null
    measured = document["metrics"]["pixel-mse"]
    assert measured["mean"] is None and measured["std"] is None and measured["images"] == 4
    assert measured["weights"] == "ema"
    assert main(["eval", str(checkpoint), "--metrics", "pixel-mse", "--batch-size", "2", "--live"]) == 0
    live = json.loads(checkpoint.with_name("checkpoint-0000000002.eval.json").read_text())["metrics"]["pixel-mse"]
    assert live["weights"] == "live" and math.isfinite(live["mean"])
