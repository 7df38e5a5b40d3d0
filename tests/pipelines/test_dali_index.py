"""DALI reads shards through indexes (issue 24, item 4): the ones `gali data prepare` writes beside its shards (DALI's
``wds2idx`` format), and the ones the DALI backend writes for each pass, so that a resumed pass skips its first
batches through the index instead of decoding and dropping them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from gali.engine.errors import DataError
from gali.pipelines import dali as dali_backend
from gali.pipelines import make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.dali import DaliPipeline
from gali.pipelines.sources import dali_index_path, open_split
from gali.pipelines.tools import prepare_shards

from .test_dali import CPU, indices

wds2idx = pytest.importorskip("wds2idx")  # DALI's own indexing tool, installed with DALI


@pytest.fixture
def prepared(tmp_path: Path, id_folder: Callable[..., Path]) -> Path:
    """26 solid-color 8×8 PNGs (color = index, classes a: 13, b: 13) prepared into 3 shards."""
    src = id_folder(classes={"a": 13, "b": 13})
    prepare_shards(src, tmp_path / "shards", resolution=8, shards=3, image_format="png", workers=1)
    return tmp_path / "shards"


def read_all(shards: list[Path], index_paths: list[str] | None) -> list[tuple[bytes, bytes]]:
    """(image bytes, .cls bytes) of every sample DALI's webdataset reader reads from ``shards``, in order."""

    @pipeline_def
    def pipe():
        return tuple(fn.readers.webdataset(paths=[str(s) for s in shards], index_paths=index_paths, ext=["png", "cls"]))

    n = 26
    images, labels = pipe(batch_size=n, num_threads=1, device_id=None).run()
    return [(np.asarray(images.at(j)).tobytes(), np.asarray(labels.at(j)).tobytes()) for j in range(n)]


def test_prepare_writes_dalis_index_beside_each_shard(
    prepared: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    shards = sorted((prepared / "train").glob("*.tar"))
    for shard in shards:
        reference = tmp_path / "reference.idx"
        with wds2idx.IndexCreator(str(shard), str(reference), verbose=False) as creator:
            creator.create_index()
        assert dali_index_path(shard).read_text() == reference.read_text(), shard  # wds2idx's bytes
    capfd.readouterr()
    indexed = read_all(shards, [str(dali_index_path(s)) for s in shards])
    assert "Index file not provided" not in capfd.readouterr().err  # DALI indexed nothing
    assert indexed == read_all(shards, None)  # the same samples as DALI's own indexing
    assert sorted(int(label) for _, label in indexed) == [0] * 13 + [1] * 13


def test_a_resumed_pass_skips_its_first_batches_through_the_index(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    listed: list[str] = []  # the members DALI was told to read, pass after pass
    index = dali_backend.dali_index

    def spy(samples: list[list[tuple[str, int, int]]]) -> str:
        listed.extend(name for members in samples for name, _, _ in members)
        return index(samples)

    monkeypatch.setattr(dali_backend, "dali_index", spy)
    cfg = DataConfig(source="webdataset", root=str(prepared), resolution=8, backend="dali", workers=1)
    for rank in range(2):  # 26 images: 3 batches of 4 per rank
        pipe = DaliPipeline(cfg, prepared, split="train", batch_size=4, device=CPU, seed=3, rank=rank, world_size=2)
        twin = make_pipeline(
            replace(cfg, backend="torch"), split="train", batch_size=4, device=CPU, seed=3, rank=rank, world_size=2
        )
        for p in (pipe, twin):
            p.set_epoch(1)
        full = list(pipe)
        assert len(full) == 3 and sorted(indices(full)) == sorted(indices(list(twin)))  # the torch backend's images
        assert [int(name.split(".")[0]) for name in listed] == indices(full)  # key = the image's index: as listed
        everything = list(listed)
        listed.clear()
        for k in (1, 2, 3):
            pipe.set_epoch(1, start_batch=k)
            resumed = list(pipe)
            assert len(resumed) == 3 - k
            for a, b in zip(resumed, full[k:], strict=True):
                assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
            assert listed == everything[4 * k :], k  # the skipped images were not even listed, so not decoded
            listed.clear()
        assert torch.cat([b.labels for b in full]).tolist() == [int(i >= 13) for i in indices(full)]  # a, then b
    assert "Index file not provided" not in capfd.readouterr().err


def test_an_unreadable_shard_member_is_named_during_iteration(prepared: Path) -> None:
    shard = prepared / "train" / "shard-00001.tar"
    split = open_split("webdataset", prepared, "train")
    first = int(np.flatnonzero(split.shard_ids == 1)[0])
    with open(shard, "r+b") as f:  # the image's bytes overwritten in place: the tar still reads back whole
        f.seek(int(split.offsets[first]))
        f.write(b"\x00" * int(split.sizes[first]))
    cfg = DataConfig(source="webdataset", root=str(prepared), resolution=8, backend="dali", workers=1)
    pipe = DaliPipeline(cfg, prepared, split="train", batch_size=2, device=CPU, seed=0)
    with pytest.raises(DataError, match=re.escape(f"cannot read image {split.name(first)} (DALI: ")):
        list(pipe)
