"""The CLI's refusals and small promises (issue 29, items 7, 9, 10, 11, 13-16, 18-20): a mistake on the command line
is refused before any work, with exit 2, a message that says what to give instead, and nothing written."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from gali.engine.cli import build_parser, main
from gali.engine.loop.config import load_config
from gali.kernels import _launch
from tests.test_launch import TINY as LAUNCH_TINY

TINY = [*LAUNCH_TINY, "run.snapshot_kimg=0.032", "run.kimg=0.032"]  # tests/test_launch.py's run, one step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """GALI_CACHE in a temporary folder for the whole module (the digits are made once)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GALI_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> Path:
    """The run folder of one 0.032-kimg run of the demo preset: config.toml and checkpoint-0000000032.pt."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, f"run.out_dir={out}"]) == 0
    (run_dir,) = out.iterdir()
    return run_dir


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _exit_code(argv: list[str]) -> int:
    """main's exit code, argparse's refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


# -- item 7: --out writes the format its extension names, or is refused ------------------------------------


@pytest.mark.parametrize(
    ("command", "name", "image_format"),
    [("sample", "s.jpg", "JPEG"), ("reconstruct", "r.jpeg", "JPEG"), ("sample", "s.png", "PNG")],
)
def test_out_writes_the_format_its_extension_names(run, tmp_path, capsys, command, name, image_format):
    out = tmp_path / name
    assert main([command, str(run / "checkpoint-0000000032.pt"), "--out", str(out), "--n", "4"]) == 0
    with Image.open(out) as image:
        assert image.format == image_format


@pytest.mark.parametrize("name", ["s.gif", "s.txt", "s"])
def test_out_with_an_extension_of_no_written_format_is_refused(run, tmp_path, capsys, name):
    assert main(["sample", str(run / "checkpoint-0000000032.pt"), "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ".png" in err and ".jpg" in err and "Traceback" not in err
    assert _files(tmp_path) == []


# -- item 9: compute.kernel_impl=triton where Triton cannot run; an out_dir that cannot hold a run folder ------


def test_triton_kernels_on_a_cpu_are_refused_before_the_run_folder(tmp_path, capsys, cache, monkeypatch):
    monkeypatch.setattr(_launch, "interpreted", lambda kernel: False)  # as on a CPU without TRITON_INTERPRET=1
    out = tmp_path / "runs"
    assert main(["train", *TINY, "compute.kernel_impl=triton", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "compute.kernel_impl" in err and "auto" in err and "TRITON_INTERPRET=1" in err
    assert not out.exists()
    run_dir = tmp_path / "job"  # and a resume that asks for them: refused before it trains or writes
    assert main(["train", *TINY, "run.kimg=0.032", f"run.dir={run_dir}"]) == 0
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["train", "--resume", str(run_dir), "run.kimg=0.064", "compute.kernel_impl=triton"]) == 2
    assert "compute.kernel_impl" in capsys.readouterr().err and sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_an_out_dir_that_cannot_hold_a_run_folder_is_refused(tmp_path, capsys, cache, where):
    (tmp_path / "file").write_text("not a folder")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "runs", "proc": Path("/proc/gali-runs")}[where]
    assert main(["train", *TINY, f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert _files(tmp_path) == ["file"] and not Path("/proc/gali-runs").exists()


# -- item 10: --n < 1 and --out in a missing folder ------------------------------------------------------


@pytest.mark.parametrize("argv", [["sample", "--n", "0"], ["sample", "--n", "-4"], ["reconstruct", "--n", "0"]])
def test_n_below_one_is_refused(run, capsys, argv):
    before = _files(run)
    assert _exit_code([argv[0], str(run / "checkpoint-0000000032.pt"), *argv[1:]]) == 2
    assert "--n: must be >= 1" in capsys.readouterr().err
    assert _files(run) == before


@pytest.mark.parametrize("command", ["sample", "reconstruct"])
def test_out_in_a_missing_folder_is_refused(run, tmp_path, capsys, command):
    out = tmp_path / "nodir" / "x.png"
    assert main([command, str(run / "checkpoint-0000000032.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"folder {out.parent} does not exist" in err and "Traceback" not in err
    assert _files(tmp_path) == []


# -- item 11: a config.toml where a checkpoint or a run folder is read --------------------------------------


@pytest.mark.parametrize("argv", [["train", "--resume"], ["sample"], ["reconstruct"], ["eval"]])
def test_a_config_file_is_named_as_such_where_a_checkpoint_is_read(run, capsys, argv):
    before = _files(run)
    assert main([*argv, str(run / "config.toml")]) == 2
    err = capsys.readouterr().err
    assert "is a config file, not a checkpoint" in err and "weights_only" not in err
    wanted = str(run) if argv[0] == "train" else str(run / "checkpoint-0000000032.pt")
    assert wanted in err
    assert _files(run) == before


# -- item 13: options and overrides intermixed --------------------------------------------------------------


def test_options_and_overrides_may_be_intermixed(capsys):
    assert main(["train", "--preset", "demo", "run.seed=1", "--dry-run", "run.kimg=2"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["run"]["seed"] == 1 and printed["run"]["kimg"] == 2.0


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["profile", "run.seed=1", "--steps", "3", "run.kimg=2"], {"steps": 3}),
        (["info", "run.seed=1", "--preset", "demo", "run.kimg=2"], {"preset": "demo"}),
        (["reproduce", "run.seed=1", "--seeds", "2", "run.kimg=2"], {"seeds": 2}),
        (
            ["eval", "c.pt", "run.seed=1", "--metrics", "probe", "run.kimg=2"],
            {"metrics": "probe", "checkpoint": "c.pt"},
        ),
    ],
)
def test_every_command_with_overrides_takes_them_around_its_options(argv, options):
    args = build_parser().parse_args(argv)
    assert args.overrides == ["run.seed=1", "run.kimg=2"]
    assert {key: getattr(args, key) for key in options} == options


# -- item 14: an override of a string key is the text as written --------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("run.out_dir=2026-12-07", "out_dir", "2026-12-07"),
        ("run.out_dir=2026", "out_dir", "2026"),
        ("data.root=12:30:00", "root", "12:30:00"),
    ],
)
def test_an_override_of_a_string_key_takes_the_text_as_written(capsys, override, key, value):
    assert main(["train", "--dry-run", override]) == 0
    section = override.split(".")[0]
    assert tomllib.loads(capsys.readouterr().out)[section][key] == value


# -- item 15: a run started from a saved config.toml keeps the preset's name ------------------------------


def test_a_run_from_a_saved_config_keeps_the_presets_name(run, tmp_path, capsys):
    assert run.name == "00000-demo"
    assert load_config(str(run / "config.toml")).preset == "demo"
    out = tmp_path / "runs"
    assert main(["train", "--preset", str(run / "config.toml"), f"run.out_dir={out}"]) == 0
    assert [p.name for p in out.iterdir()] == ["00000-demo"]


# -- item 16: --dry-run marks a missing required key ---------------------------------------------------------


def test_dry_run_marks_a_missing_data_root(capsys):
    assert main(["train", "--preset", "celeba64-ali", "--dry-run"]) == 0
    printed = capsys.readouterr()
    data = printed.out.split("[data]\n", 1)[1]
    assert data.startswith("# root = ...  <- MISSING") and "data.root=/path/to/data" in data.splitlines()[0]
    assert tomllib.loads(printed.out)["data"]["source"] == "folder"  # still TOML, the missing key commented out
    assert "data.root is not set" in printed.err
    assert main(["train", "--preset", "celeba64-ali", "--dry-run", "data.resolution=3"]) == 2  # a wrong value: refused


# -- item 18: gali's warnings without an internal source line ---------------------------------------------


def test_warnings_carry_no_internal_source_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gali", "train", "--dry-run", "method.kernel_impl=ref"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "gali: warning: config key 'method.kernel_impl' is deprecated and will be removed; use 'compute.kernel_impl'\n"
    )


# -- item 19: --feature-model and --feature-arch name the options typed ------------------------------------


def test_a_state_dict_feature_model_asks_for_feature_arch(run, tmp_path, capsys):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "features.pt")
    argv = ["eval", str(run / "checkpoint-0000000032.pt"), "--feature-model", str(tmp_path / "features.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "add --feature-arch svhn-multidigit" in err and "method.feature_arch" not in err


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_feature_arch_with_a_torchscript_feature_model_is_refused(run, tmp_path, capsys):
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(tmp_path / "features.pt"))
    before = _files(run)
    argv = ["eval", str(run / "checkpoint-0000000032.pt"), "--feature-model", str(tmp_path / "features.pt")]
    assert main([*argv, "--feature-arch", "svhn-multidigit"]) == 2
    err = capsys.readouterr().err
    assert "--feature-arch svhn-multidigit" in err and "TorchScript" in err and "drop --feature-arch" in err
    assert _files(run) == before


# -- item 20: help texts ----------------------------------------------------------------------------------


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps at hyphens too


def test_help_texts(capsys):
    reproduce = _help(["reproduce"], capsys)
    assert "--batch-size BATCH_SIZE images per batch of the evaluation only" in reproduce
    assert "+objective (product, minimax, misclassification" in reproduce
    assert "(default: pixel-mse)" in _help(["eval"], capsys)


@pytest.mark.parametrize(("group", "commands"), [("data", ("check", "prepare", "stats")), ("native", ("build",))])
def test_a_command_group_without_a_subcommand_lists_its_commands(capsys, group, commands):
    assert _exit_code([group]) == 2
    err = capsys.readouterr().err
    assert f"usage: gali {group}" in err and all(name in err for name in commands)
    assert "required" not in err and "_command" not in err
