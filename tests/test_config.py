"""Typed config: presets load, overrides apply, every bad key or value names itself."""

import pytest

from gali.engine.cli import main
from gali.engine.config import parse_override
from gali.engine.errors import ConfigError
from gali.engine.loop.config import config_from_dict, dump_config, load_config, preset_names

PAPER_PRESETS = [
    "svhn32-ali",
    "svhn32-alice",
    "svhn32-gali4",
    "svhn32-gali8",
    "svhn32-gali-pt",
    "celeba64-ali",
    "celeba64-alice",
    "celeba64-gali4",
    "celeba64-gali-mix",
    "celeba64-gali-pt",
]


def test_every_preset_of_the_issue_ships():
    assert {*PAPER_PRESETS, "demo"} <= set(preset_names())


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_need_a_data_root_and_carry_the_authors_hyperparameters(name):
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(name)
    cfg = load_config(name, ["data.root=/data/somewhere"])
    dataset, method = name.split("-", 1)
    assert cfg.data.source == "folder" and cfg.data.root == "/data/somewhere"
    assert cfg.model.arch == dataset and cfg.data.resolution == int(dataset[-2:])
    assert cfg.method.tuples == method
    expected_lr = {"svhn32": 2e-4, "celeba64": 4e-5 if method.startswith("gali") else 1e-4}[dataset]
    assert cfg.optim.lr == expected_lr
    expected_n_dis = 5 if name in ("svhn32-ali", "svhn32-alice", "svhn32-gali8") else 1
    assert cfg.optim.n_dis == expected_n_dis
    assert cfg.run.batch_size == (20 if name == "celeba64-gali-pt" else 100)
    assert cfg.method.loss_weights == "paper"


def test_alice_lambdas_follow_the_code():
    assert load_config("svhn32-alice", ["data.root=/d"]).method.alice_lambda == 1.0
    assert load_config("celeba64-alice", ["data.root=/d"]).method.alice_lambda == 0.02


def test_overrides_apply_with_toml_literals():
    cfg = load_config("demo", ["optim.lr=4e-5", "run.seed=7", "method.loss_weights=authors", "run.kimg=3"])
    assert cfg.optim.lr == 4e-5 and cfg.run.seed == 7 and cfg.method.loss_weights == "authors"
    assert isinstance(cfg.run.kimg, float)
    assert parse_override("data.root=/a/b") == ("data.root", "/a/b")
    assert parse_override("method.feature_model=none") == ("method.feature_model", None)


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("optim.lrr=1", "optim.lrr", "accepted: optim.lr"),
        ("optimizer.lr=1", "optimizer.lr", "section in run, data"),
        ("optim.lr=-1", "optim.lr", "> 0"),
        ("optim.lr=fast", "optim.lr", "expected float"),
        ("optim.beta1=1.5", "optim.beta1", "[0, 1)"),
        ("run.batch_size=2.5", "run.batch_size", "expected int"),
        ("method.loss_weights=mine", "method.loss_weights", "accepted: paper, authors"),
        ("compute.kernel_impl=cuda", "compute.kernel_impl", "accepted: auto, triton, ref"),
        ("data.source=web", "data.source", "accepted: digits, folder, filelist, webdataset"),
        ("data.resolution=64", "data.resolution", "model.arch='svhn32' takes 32x32"),
        ("model.arch=resnet", "model.arch", "accepted: svhn32, celeba64"),
        ("run.device=tpu", "run.device", "accepted: auto, cpu, cuda"),
        ("method.mask_max_size=0.5", "method.mask_max_size", "expected int"),
        ("noequals", "noequals", "section.key=value"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)
    assert fragment in str(info.value)


def test_unknown_preset_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"accepted: .*svhn32-gali4"):
        load_config("svhn32-gali5")


def test_preset_file_with_a_bad_key_names_it(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[optim]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(str(path))


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("svhn32-gali-pt", ["data.root=/d", "method.feature_model=/m.pt", "optim.lr=1e-4"])
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again.to_dict() | {"preset": cfg.preset} == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_dry_run_prints_the_resolved_config_and_trains_nothing(capsys, tmp_path):
    assert main(["train", "--dry-run", f"run.out_dir={tmp_path}", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0003" in out and "[method]" in out
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_bad_value_and_exits_nonzero(capsys):
    assert main(["train", "--dry-run", "optim.n_dis=0"]) == 2
    assert "optim.n_dis" in capsys.readouterr().err


def test_deprecated_keys_warn_and_set_the_keys_that_replaced_them():
    with pytest.warns(FutureWarning, match=r"'method\.kernel_impl' is deprecated and will be removed; use 'compute\."):
        cfg = load_config("demo", ["method.kernel_impl=ref"])
    assert cfg.compute.kernel_impl == "ref"
    with pytest.warns(FutureWarning, match=r"'data\.channels_last' is deprecated .* use 'compute\.channels_last'"):
        cfg = load_config("demo", ["data.channels_last=false"])
    assert cfg.compute.channels_last is False
    old = load_config("demo").to_dict()  # a config saved before kernel_impl moved to [compute]
    old["method"]["kernel_impl"] = old["compute"].pop("kernel_impl")
    old["method"]["kernel_impl"] = "triton"
    with pytest.warns(FutureWarning):
        assert config_from_dict(old).compute.kernel_impl == "triton"
    with pytest.raises(ConfigError, match=r"compute\.kernel_impl"), pytest.warns(FutureWarning):
        load_config("demo", ["method.kernel_impl=cuda"])
