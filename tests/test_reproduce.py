"""gali reproduce: five methods at one budget, one table beside the paper's numbers, deterministic."""

import json
from pathlib import Path

import pytest

from gali.engine.cli import main
from gali.engine.errors import GaliError
from gali.engine.eval.protocol import EvalOptions
from gali.engine.eval.reproduce import METHODS, PAPER, MethodRow, ReproduceOptions, reproduce, reproduce_table

TINY = ("model.width=0.25", "model.latent_dim=32", "data.workers=0", "run.batch_size=32", "run.tick_kimg=0.05",
        "run.grid_size=2")
FAST_EVAL = EvalOptions(probe_labelled=200, probe_draws=2, probe_pool=500)


def _row(method: str, pixel: float) -> MethodRow:
    return MethodRow(method=method, num_classes=4, run_dir=Path("r"), checkpoint=Path("c.pt"), images_per_second=100.0,
                     train_seconds=1.0, eval_seconds=1.0,
                     results={"pixel-mse": {"mean": pixel, "std": 0.001}, "probe": {"mean": 0.125, "std": 0.0125}})


def test_table_puts_the_papers_numbers_beside_ours():
    table = reproduce_table([_row(m, 0.01 * (i + 1)) for i, m in enumerate(METHODS)], header="HEADER")
    lines = table.splitlines()
    assert lines[0] == "HEADER"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == list(METHODS)
    gali4 = rows[METHODS.index("gali4")]
    assert "0.0300 ± 0.0010" in gali4 and "12.50 ± 1.25" in gali4  # ours; the probe error in percent
    assert PAPER["gali4"]["pixel_mse"] in gali4 and PAPER["gali4"]["probe"] in gali4 and PAPER["gali4"]["fid"] in gali4
    assert "SVHN" in lines[2] and "CelebA" in lines[2] and "SVHN 32×32" in table  # which data set the paper's are for


@pytest.mark.parametrize(("options", "message"), [
    ({"methods": ("ali", "bigbigan")}, r"unknown method 'bigbigan' in --methods; accepted .*gali-mix"),
    ({"overrides": ("method.tuples=gali8",)}, r"method.tuples=gali8: set by gali reproduce itself"),
    ({"overrides": ("run.kimg=3",)}, r"run.kimg=3: set by gali reproduce itself"),
    ({"kimg": 0}, r"--kimg must be > 0"),
])
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
        assert row.checkpoint.is_file() and row.checkpoint.parent.parent == tmp_path / "a" / row.method
        assert 0 < row.results["pixel-mse"]["mean"] < 1 and 0 <= row.results["probe"]["mean"] <= 1
        assert "fid" not in row.results  # no Inception weights given
    assert report.markdown_path.read_text().strip() == report.table
    document = json.loads(report.json_path.read_text())
    assert [r["method"] for r in document["rows"]] == list(METHODS) and document["kimg"] == 0.1
    # the same seed gives the same numbers (through the CLI this time, for one of the methods)
    code = main(["reproduce", "--kimg", "0.1", "--methods", "gali4", "--out-dir", str(tmp_path / "b"),
                 "--probe-labelled", "200", "--probe-draws", "2", "--probe-pool", "500", *TINY])
    assert code == 0
    again = {r["method"]: r["results"] for r in json.loads((tmp_path / "b" / "reproduce.json").read_text())["rows"]}
    first = {row.method: row.results for row in report.rows}
    assert list(again) == ["gali4"]
    assert again["gali4"]["pixel-mse"]["mean"] == first["gali4"]["pixel-mse"]["mean"]
    assert again["gali4"]["probe"]["errors"] == first["gali4"]["probe"]["errors"]
