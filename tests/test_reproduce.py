"""gali reproduce: five methods at one budget, one table beside the paper's numbers, deterministic."""

import json
from pathlib import Path

import pytest

from gali.engine.cli import main
from gali.engine.errors import GaliError
from gali.engine.eval.protocol import EvalOptions
from gali.engine.eval.reproduce import METHODS, PAPER, MethodRow, ReproduceOptions, SeedRun, reproduce, reproduce_table

# no identity classifier in the training snapshots, a small one in the evaluation: the wiring is tested here
TINY = (
    "model.width=0.25",
    "model.latent_dim=32",
    "data.workers=0",
    "run.batch_size=32",
    "run.tick_kimg=0.05",
    "run.grid_size=2",
    "run.identity_images=0",
)
FAST_EVAL = EvalOptions(probe_labelled=200, probe_draws=2, probe_pool=500, identity_images=300)


def _run(seed: int, pixel: float, identity: float = 0.5, kimg: float = 8.0) -> SeedRun:
    return SeedRun(
        seed=seed,
        kimg=kimg,
        run_dir=Path("r"),
        checkpoint=Path("c.pt"),
        images_per_second=100.0,
        train_seconds=1.0,
        eval_seconds=1.0,
        results={
            "pixel-mse": {"mean": pixel, "std": 0.001},
            "probe": {"mean": 0.125, "std": 0.0125},
            "recon-identity": {"accuracy": identity, "ceiling": 0.9, "nearest": 0.4},
        },
    )


def _row(method: str, pixel: float) -> MethodRow:
    return MethodRow(method=method, num_classes=4, runs=[_run(0, pixel)])


def test_table_puts_the_papers_numbers_beside_ours():
    table = reproduce_table([_row(m, 0.01 * (i + 1)) for i, m in enumerate(METHODS)], header="HEADER")
    lines = table.splitlines()
    assert lines[0] == "HEADER"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == list(METHODS)
    gali4 = rows[METHODS.index("gali4")]
    assert "0.0300 ± 0.0010" in gali4 and "12.50 ± 1.25" in gali4  # ours; the probe error in percent
    assert "| 0.500 |" in gali4 and "identity" in lines[2]  # one seed: the identity accuracy alone
    assert PAPER["gali4"]["pixel_mse"] in gali4 and PAPER["gali4"]["probe"] in gali4 and PAPER["gali4"]["fid"] in gali4
    assert "SVHN" in lines[2] and "CelebA" in lines[2] and "SVHN 32×32" in table  # which data set the paper's are for


def test_budgets_give_rows_and_the_first_budget_at_the_identity_goal():
    rows = [
        MethodRow("gali4", 4, [_run(0, 0.03, 0.6, kimg=20), _run(1, 0.03, 0.7, kimg=20)]),
        MethodRow("gali4", 4, [_run(0, 0.02, 0.78, kimg=40), _run(1, 0.02, 0.84, kimg=40)]),
        MethodRow("ali", 2, [_run(0, 0.05, 0.5, kimg=20), _run(1, 0.05, 0.5, kimg=20)]),
        MethodRow("ali", 2, [_run(0, 0.04, 0.79, kimg=40), _run(1, 0.04, 0.8, kimg=40)]),
    ]
    table = reproduce_table(rows, header="HEADER")
    assert "| gali4 | 4 | 40 |" in table and "| ali | 2 | 20 |" in table
    assert "- gali4: 40 kimg" in table and "- ali: not within 40 kimg" in table  # 0.81 and 0.795 on average


def test_several_seeds_give_mean_and_std_over_seeds():
    row = MethodRow(method="gali4", num_classes=4, runs=[_run(0, 0.02, 0.6), _run(1, 0.04, 0.8)])
    assert row.cell("pixel-mse") == "0.0300 ± 0.0100"  # over seeds, not over batches
    assert row.cell("recon-identity", "accuracy", digits=3) == "0.700 ± 0.100"
    assert row.cell("fid", "value") == "—"  # not measured


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"methods": ("ali", "bigbigan")}, r"unknown method 'bigbigan' in --methods; accepted .*gali-mix"),
        ({"overrides": ("method.tuples=gali8",)}, r"method.tuples=gali8: set by gali reproduce itself"),
        ({"overrides": ("run.kimg=3",)}, r"run.kimg=3: set by gali reproduce itself"),
        ({"kimg": 0}, r"--kimg must be > 0"),
        ({"seeds": 0}, r"--seeds must be >= 1"),
        ({"kimg": 80, "at_kimg": (20, 30)}, r"--at-kimg 20,30: .* each \(and --kimg\) a multiple of the smallest"),
        ({"kimg": 80, "at_kimg": (160,)}, r"--at-kimg 160: give budgets above 0 and at most --kimg 80"),
        (
            {"metrics": ("pixel-mse", "sharpness")},
            r"unknown metric 'sharpness' in --metrics; .*recon-sharp",
        ),
    ],
)
def test_bad_options_are_refused_before_training(tmp_path, options, message):
    with pytest.raises(GaliError, match=message):
        reproduce(ReproduceOptions(out_dir=str(tmp_path), **options), log=lambda line: None)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_reproduce_trains_evaluates_and_repeats_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    options = ReproduceOptions(kimg=0.1, out_dir=str(tmp_path / "a"), overrides=TINY, evaluation=FAST_EVAL)
    report = reproduce(options, log=lambda line: None)
    assert [row.method for row in report.rows] == list(METHODS)
    for row in report.rows:
        (run,) = row.runs
        assert run.checkpoint.is_file() and run.checkpoint.parent.parent == tmp_path / "a" / row.method / "seed0"
        assert 0 < run.results["pixel-mse"]["mean"] < 1 and 0 <= run.results["probe"]["mean"] <= 1
        assert 0 <= run.results["recon-identity"]["accuracy"] <= 1
        assert "fid" not in run.results  # no Inception weights given
    assert report.markdown_path.read_text().strip() == report.table
    document = json.loads(report.json_path.read_text())
    assert [r["method"] for r in document["rows"]] == list(METHODS) and document["kimg"] == 0.1
    # the same seed gives the same numbers, another seed others (through the CLI, for one of the methods)
    code = main(
        [
            "reproduce",
            "--kimg",
            "0.1",
            "--methods",
            "gali4",
            "--seeds",
            "2",
            "--at-kimg",
            "0.05",
            "--metrics",
            "recon-identity,recon-sharpness,pixel-mse,probe",
            "--out-dir",
            str(tmp_path / "b"),
            "--probe-labelled",
            "200",
            "--probe-draws",
            "2",
            "--probe-pool",
            "500",
            "--identity-images",
            "300",
            *TINY,
        ]
    )
    assert code == 0
    halfway, again = json.loads((tmp_path / "b" / "reproduce.json").read_text())["rows"]
    first = next(row for row in report.rows if row.method == "gali4").runs[0].results
    assert again["method"] == "gali4" and [run["seed"] for run in again["runs"]] == [0, 1]
    # at 0.05 kimg: the checkpoint of the first step past it (batch 32: 64 images), evaluated apart
    assert [halfway["kimg"], again["kimg"]] == [0.05, 0.1]
    assert Path(halfway["runs"][0]["checkpoint"]).name == "checkpoint-0000000064.pt"
    assert halfway["runs"][0]["results"]["pixel-mse"]["mean"] != first["pixel-mse"]["mean"]
    assert 0 < halfway["runs"][0]["train_seconds"] < again["runs"][0]["train_seconds"]
    assert again["runs"][0]["results"]["recon-sharpness"]["mean"] > 0
    seed0, seed1 = (run["results"] for run in again["runs"])
    assert seed0["pixel-mse"]["mean"] == first["pixel-mse"]["mean"]
    assert seed0["probe"]["errors"] == first["probe"]["errors"]
    assert seed1["pixel-mse"]["mean"] != seed0["pixel-mse"]["mean"]
    assert "seeds 0..1" in (tmp_path / "b" / "reproduce.md").read_text()
