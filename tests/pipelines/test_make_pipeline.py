"""make_pipeline: dispatch on data.source and data.backend; channels_last to every backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gali.engine.errors import ConfigError, DataError
from gali.pipelines import check_batch, make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.synthetic import SyntheticPipeline
from gali.pipelines.torch_files import TorchFilePipeline

CPU = torch.device("cpu")


@pytest.mark.usefixtures("no_network")
def test_digits_are_prepared_in_the_default_cache(isolated_cache: Path) -> None:
    cfg = DataConfig(source="digits", resolution=8, workers=0)
    train = make_pipeline(cfg, split="train", batch_size=32, device=CPU, seed=0)
    assert (isolated_cache / "digits-8" / "manifest.json").is_file()
    test = make_pipeline(cfg, split="test", batch_size=32, device=CPU, seed=0)
    assert isinstance(train, TorchFilePipeline)
    assert train.num_images + test.num_images == 1797 and test.num_images == 359
    assert train.class_names == test.class_names == [str(d) for d in range(10)]
    assert len(train) == 1438 // 32 and len(test) == 359 // 32
    batch = next(iter(test))
    check_batch(batch, batch_size=32, resolution=8, device=CPU, num_classes=10)


def test_digits_in_a_given_root(digits16: Path) -> None:
    cfg = DataConfig(source="digits", root=str(digits16), resolution=16, workers=0)
    p = make_pipeline(cfg, split="train", batch_size=50, device=CPU, seed=0, rank=1, world_size=2)
    assert len(p) == 1438 // 100
    check_batch(next(iter(p)), batch_size=50, resolution=16, device=CPU, num_classes=10)


def test_folder_source(id_folder: Callable[..., Path]) -> None:
    root = id_folder(classes={"x": 5, "y": 5}, resolution=12)
    cfg = DataConfig(source="folder", root=str(root), resolution=12, workers=0)
    p = make_pipeline(cfg, split="train", batch_size=4, device=CPU, seed=0)
    assert p.class_names == ["x", "y"] and len(p) == 2
    check_batch(next(iter(p)), batch_size=4, resolution=12, device=CPU, num_classes=2)


def test_folder_source_with_missing_root(tmp_path: Path) -> None:
    cfg = DataConfig(source="folder", root=str(tmp_path / "missing"), workers=0)
    with pytest.raises(DataError, match="missing"):
        make_pipeline(cfg, split="train", batch_size=4, device=CPU, seed=0)


def test_synthetic_backend_reads_nothing(tmp_path: Path, isolated_cache: Path) -> None:
    cfg = DataConfig(source="folder", root=str(tmp_path / "missing"), backend="synthetic", resolution=16)
    p = make_pipeline(cfg, split="train", batch_size=100, device=CPU, seed=0, rank=1, world_size=2)
    assert isinstance(p, SyntheticPipeline) and len(p) == 250 and p.num_images == 50_000
    check_batch(next(iter(p)), batch_size=100, resolution=16, device=CPU, num_classes=10)
    test = make_pipeline(DataConfig(backend="synthetic"), split="test", batch_size=100, device=CPU, seed=0)
    assert len(test) == 100
    assert not isolated_cache.exists()  # source 'digits' with backend 'synthetic' writes no cache


def test_invalid_config_fails_before_reading() -> None:
    with pytest.raises(ConfigError, match=r"data\.backend"):
        make_pipeline(DataConfig(backend="dali-typo"), split="train", batch_size=4, device=CPU, seed=0)
    with pytest.raises(ConfigError, match=r"data\.root"):
        make_pipeline(DataConfig(source="folder"), split="train", batch_size=4, device=CPU, seed=0)


@pytest.mark.parametrize("backend", ["torch", "synthetic"])
def test_channels_last_is_passed_to_the_backend(backend: str, id_folder: Callable[..., Path]) -> None:
    cfg = DataConfig(source="folder", root=str(id_folder(n=8)), resolution=8, backend=backend, workers=0)
    for channels_last in (False, True):
        p = make_pipeline(cfg, split="train", batch_size=4, device=CPU, seed=0, channels_last=channels_last)
        x = next(iter(p)).x
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x.is_contiguous() != channels_last


def test_backend_auto_is_dali_only_on_a_cuda_device_with_dali_installed(monkeypatch) -> None:
    import importlib.util

    from gali.pipelines import resolve_backend

    assert resolve_backend("torch", torch.device("cuda")) == "torch"  # an explicit backend is kept
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert resolve_backend("auto", torch.device("cuda")) == "dali"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"

    def no_namespace(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", no_namespace)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
