"""Shards are verified, not trusted (issue 29, items 2, 6, 12).

A WebDataset shard cut short (an interrupted copy) or with bytes after its last member is an error naming the
shard and the byte offset, wherever it is read: ``gali data check`` and ``stats``, ``gali data prepare`` (its
source, and its own output when it resumes) and the pipelines that training starts. Never a smaller data set.
``data check`` and ``data stats`` read with one reader and agree; a failed ``data prepare`` is resumed by a rerun.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.engine.cli import main
from gali.engine.errors import DataError
from gali.pipelines import make_pipeline, tools
from gali.pipelines.config import DataConfig
from gali.pipelines.sources import open_split
from gali.pipelines.tools import check_images, dataset_stats, prepare_shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source folder, its shards): train/{a: 6, b: 6} of 12×10 PNGs, one shard of 12 samples."""
    root = tmp_path_factory.mktemp("verified")
    src = root / "src"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (src / "train" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(src / "train" / cls / f"{i}.png")
    prepare_shards(src, root / "shards", resolution=8, shards=1, image_format="png", workers=1)
    return src, root / "shards"


def cuts(shard: bytes, path: Path) -> dict[str, tuple[bytes, int]]:
    """Damaged copies of ``shard`` (its bytes) and the byte offset each message must name."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    second = members[2]  # the second sample's image
    last_end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # where the end-of-archive blocks begin
    return {
        "inside a header": (shard[: second.offset + 100], second.offset + 100),
        "inside a member's data": (shard[: second.offset_data + 7], second.offset_data + 7),
        "at a member boundary": (shard[: second.offset], second.offset),
        "after the last member": (shard[:last_end], last_end),
        "cut to half": (shard[: len(shard) // 2], len(shard) // 2),
        "trailing garbage": (shard + b"\x01garbage" * 100, len(shard)),
    }


def damaged_copy(tmp_path: Path, shards: Path, data: bytes) -> Path:
    root = tmp_path / "damaged"
    (root / "train").mkdir(parents=True)
    (root / "classes.txt").write_bytes((shards / "classes.txt").read_bytes())
    (root / "train" / "shard-00000.tar").write_bytes(data)
    return root


def test_a_damaged_shard_is_an_error_naming_shard_and_offset_everywhere(
    prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, shards = prepared
    good = shards / "train" / "shard-00000.tar"
    assert len(open_split("webdataset", shards, "train")) == 12
    for why, (data, offset) in cuts(good.read_bytes(), good).items():
        root = damaged_copy(tmp_path / why.replace(" ", "-").replace("'", ""), shards, data)
        shard = root / "train" / "shard-00000.tar"
        with pytest.raises(DataError) as info:  # training start-up indexes the split here
            make_pipeline(
                DataConfig(source="webdataset", root=str(root), resolution=8, workers=0),
                split="train",
                batch_size=4,
                device=torch.device("cpu"),
                seed=0,
            )
        message = str(info.value)
        assert str(shard) in message and f"byte offset {offset}" in message, (why, message)
        for command in ("check", "stats"):
            assert main(["data", command, str(root)]) == 2, why
            err = capsys.readouterr().err
            assert str(shard) in err and f"byte offset {offset}" in err, (why, command, err)
        out = tmp_path / why / "out"
        assert main(["data", "prepare", str(root), str(out), "--resolution", "8", "--shards", "1"]) == 2
        assert f"byte offset {offset}" in capsys.readouterr().err
        assert not out.exists()


def test_prepare_verifies_its_own_shards_when_it_resumes(
    prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, shards = prepared
    dst = tmp_path / "again"
    args = ["data", "prepare", str(src), str(dst), "--resolution", "8", "--shards", "1", "--format", "png"]
    assert main(args) == 0
    shard = dst / "train" / "shard-00000.tar"
    original = shard.read_bytes()
    assert original == (shards / "train" / "shard-00000.tar").read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # damaged since it was written
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"shard {shard} is damaged: it ends at byte offset {len(original) // 2}" in out
    assert "written again" in out and "1 shards written, 0 already written and verified" in out
    assert shard.read_bytes() == original


def test_check_and_stats_agree_on_a_truncated_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pngs"
    (root / "train" / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "train" / "a" / f"{i}.png")
    whole = (root / "train" / "a" / "2.png").read_bytes()
    (root / "train" / "a" / "2.png").write_bytes(whole[: len(whole) // 2])  # its header still opens
    report = check_images(root, workers=1)
    _, stats = dataset_stats(root, workers=1)
    assert [name for name, _ in report.bad] == [str(root / "train" / "a" / "2.png")]
    assert stats["train"].unreadable == len(report.bad) == 1
    assert sum(stats["train"].sizes.values()) == 2  # sizes of the readable images only
    assert main(["data", "stats", str(root)]) == 0
    assert "1 unreadable" in capsys.readouterr().out


def test_a_failed_prepare_is_resumed_by_a_rerun(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = prepared
    settings = {"resolution": 8, "shards": 4, "image_format": "png", "workers": 1}
    prepare_shards(src, tmp_path / "whole", **settings)
    write = tools._write_shard
    calls = []

    def fail_on_the_third(path: Path, samples, ext: str) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        write(path, samples, ext)

    monkeypatch.setattr(tools, "_write_shard", fail_on_the_third)
    with pytest.raises(OSError, match="No space left"):
        prepare_shards(src, tmp_path / "cut", **settings)
    monkeypatch.undo()
    assert any((tmp_path / "cut").iterdir())  # left non-empty
    args = ["data", "prepare", str(src), str(tmp_path / "cut"), "--resolution", "8", "--shards", "4", "--format", "png"]
    assert main(args) == 0
    assert "2 shards written, 2 already written and verified" in capsys.readouterr().out
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*"))
    assert whole == sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut").rglob("*"))
    for name in whole:
        if (tmp_path / "whole" / name).is_file():
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
