"""The torch backend over every source: filelist and webdataset layouts, augment, channels_last, errors, symlinks."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.engine.errors import DataError
from gali.pipelines import Batch, Pipeline, check_batch, make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.sources import open_split

from .conftest import solid_color

CPU = torch.device("cpu")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, samples: list[tuple[str, bytes | None, str | None]], per_shard: int) -> None:
    """Shards of (key, PNG bytes or None, label text or None) samples, ``per_shard`` samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(0, len(samples), per_shard):
        with tarfile.open(folder / f"part-{j // per_shard:03d}.tar", "w") as tar:
            for key, image, label in samples[j : j + per_shard]:
                if image is not None:
                    add(tar, f"{key}.png", image)
                if label is not None:
                    add(tar, f"{key}.cls", label.encode())
                add(tar, f"{key}.json", b"{}")  # other members are ignored


def id_sample(index: int, label: int, resolution: int = 8) -> tuple[str, bytes, str]:
    return f"s{index:04d}", png(Image.new("RGB", (resolution, resolution), solid_color(index))), str(label)


@pytest.fixture
def shard_root(tmp_path: Path) -> Path:
    """Webdataset shards: train = 30 id images (label index % 3) in 4 shards, test = 6; no classes.txt."""
    root = tmp_path / "wds"
    write_shards(root / "train", [id_sample(i, i % 3) for i in range(30)], per_shard=8)
    write_shards(root / "test", [id_sample(100 + i, i % 3) for i in range(6)], per_shard=4)
    return root


@pytest.fixture
def list_root(id_folder: Callable[..., Path]) -> Path:
    """A filelist root: 30 id images listed in train.txt (label index % 3), 6 more in test.txt."""
    images = id_folder("lists/images", n=36)
    root = images.parent
    lines = ["# path label", ""] + [f"images/{i:05d}.png {i % 3}" for i in range(30)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("".join(f"images/{i:05d}.png {(i - 30) % 3}\n" for i in range(30, 36)))
    return root


def pipeline(source: str, root: Path, **kwargs: object) -> Pipeline:
    data: dict = {"workers": 0}
    data.update({k: kwargs.pop(k) for k in ("workers", "augment") if k in kwargs})
    cfg = DataConfig(source=source, root=str(root), resolution=8, **data)
    options: dict = {"split": "train", "batch_size": 4, "device": CPU, "seed": 0}
    options.update(kwargs)
    return make_pipeline(cfg, **options)


def decode_index(pixel: torch.Tensor) -> int:
    r, g, _ = np.rint((pixel.double().numpy() + 1.0) * 127.5).astype(int)
    return int(r + 256 * g)


def items(batches: list[Batch]) -> list[tuple[int, int]]:
    """(image index, label) of every image of ``batches``, in order."""
    return [(decode_index(b.x[i, :, 0, 0]), int(b.labels[i])) for b in batches for i in range(b.x.shape[0])]


@pytest.fixture(params=["filelist", "webdataset"])
def source_root(request: pytest.FixtureRequest, list_root: Path, shard_root: Path) -> tuple[str, Path]:
    return request.param, {"filelist": list_root, "webdataset": shard_root}[request.param]


def test_batches_meet_the_contract_and_labels_match(source_root: tuple[str, Path]) -> None:
    source, root = source_root
    train = pipeline(source, root, batch_size=7)
    assert train.class_names == ["0", "1", "2"] and train.num_images == 30 and len(train) == 4
    seen = []
    for batch in train:
        check_batch(batch, batch_size=7, resolution=8, device=CPU, num_classes=3)
        seen.extend(items([batch]))
    assert len({i for i, _ in seen}) == 28 and all(label == i % 3 for i, label in seen)
    test = pipeline(source, root, split="test", batch_size=6)
    assert test.class_names == train.class_names and test.num_images == 6
    offset = 30 if source == "filelist" else 100
    assert sorted(items(list(test))) == [(offset + i, i % 3) for i in range(6)]


def test_same_seed_same_order_and_workers_agree(source_root: tuple[str, Path]) -> None:
    source, root = source_root
    a, b = pipeline(source, root, seed=5), pipeline(source, root, seed=5, workers=2)
    epoch0 = items(list(a))
    assert items(list(b)) == epoch0
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = items(list(a))
    assert epoch1 != epoch0 and items(list(b)) == epoch1
    assert items(list(pipeline(source, root, seed=6))) != epoch0


def test_ranks_partition_the_epoch(source_root: tuple[str, Path]) -> None:
    source, root = source_root
    shards = [items(list(pipeline(source, root, rank=r, world_size=3))) for r in range(3)]
    assert [len(s) for s in shards] == [8, 8, 8]  # 30 // (4 · 3) = 2 batches per rank
    assert len({i for s in shards for i, _ in s}) == 24


def test_class_names_from_classes_txt_and_sparse_labels(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    write_shards(root, [id_sample(i, 10 * (i % 2) + 5) for i in range(8)], per_shard=8)  # labels 5 and 15
    p = pipeline("webdataset", root)
    assert p.class_names == ["5", "15"]
    assert all(label == i % 2 for i, label in items(list(p)))  # mapped to positions
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(16)) + "\n")
    p = pipeline("webdataset", root)
    assert len(p.class_names) == 16 and p.class_names[5] == "c5"
    assert all(label == 10 * (i % 2) + 5 for i, label in items(list(p)))


def textured_folder(tmp_path: Path, n: int = 8) -> Path:
    root = tmp_path / "textured"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def test_augment_is_reproducible_and_differs_from_eval(tmp_path: Path) -> None:
    root = textured_folder(tmp_path)
    first = [b.x for b in pipeline("folder", root, augment=True, seed=1, batch_size=8)]
    again = pipeline("folder", root, augment=True, seed=1, batch_size=8, workers=2)
    assert all(torch.equal(x, y.x) for x, y in zip(first, again, strict=True))
    again.set_epoch(1)
    assert not torch.equal(first[0], next(iter(again)).x)  # a new epoch draws new crops
    plain = [b.x for b in pipeline("folder", root, seed=1, batch_size=8)]
    assert not torch.equal(first[0], plain[0])
    other = [b.x for b in pipeline("folder", root, augment=True, seed=2, batch_size=8)]
    assert not torch.equal(first[0], other[0])
    check_batch(Batch(x=first[0], labels=None), batch_size=8, resolution=8, device=CPU)


def test_augment_applies_to_the_train_split_only(id_folder: Callable[..., Path]) -> None:
    root = id_folder("split/train", classes={"a": 4}).parent
    id_folder("split/test", classes={"a": 4})
    augmented = pipeline("folder", root, split="test", augment=True)
    plain = pipeline("folder", root, split="test")
    assert torch.equal(next(iter(augmented)).x, next(iter(plain)).x)


def test_channels_last(tmp_path: Path) -> None:
    root = textured_folder(tmp_path)
    (batch,) = list(pipeline("folder", root, channels_last=True, batch_size=8))
    assert batch.x.is_contiguous(memory_format=torch.channels_last) and not batch.x.is_contiguous()
    check_batch(batch, batch_size=8, resolution=8, device=CPU, num_classes=1)
    (plain,) = list(pipeline("folder", root, batch_size=8))
    assert torch.equal(batch.x, plain.x)


def test_malformed_list_line_names_file_and_line(list_root: Path) -> None:
    with (list_root / "train.txt").open("a") as f:
        f.write("images/00000.png zero\n")
    with pytest.raises(DataError, match=r"train\.txt, line 33: expected '<path> <label>'") as info:
        pipeline("filelist", list_root)
    assert str(list_root / "train.txt") in str(info.value)


def test_list_errors(list_root: Path, tmp_path: Path) -> None:
    (list_root / "test.txt").write_text("images/00000.png 7\n")
    with pytest.raises(DataError, match=r"test\.txt, line 1: label 7 is not among the labels of the train split"):
        open_split("filelist", list_root, "test")
    (list_root / "test.txt").write_text("images/missing.png 0\n")
    with pytest.raises(DataError, match=r"lists 1 files that do not exist.*missing\.png"):
        open_split("filelist", list_root, "test")
    single = list_root / "train.txt"
    assert len(open_split("filelist", single, "train")) == 30  # one .txt: split 'train' only
    with pytest.raises(DataError, match=r"no test split"):
        open_split("filelist", single, "test")
    with pytest.raises(DataError, match=r"holds no train\.txt"):
        open_split("filelist", tmp_path, "train")


def test_missing_cls_or_image_names_shard_and_key(tmp_path: Path) -> None:
    key, image, _ = id_sample(3, 0)
    write_shards(tmp_path / "a", [id_sample(0, 0), (key, image, None)], per_shard=2)
    with pytest.raises(DataError, match=r"part-000\.tar: sample 's0003' .* has no s0003\.cls label") as info:
        open_split("webdataset", tmp_path / "a", "train")
    assert str(tmp_path / "a" / "part-000.tar") in str(info.value)
    write_shards(tmp_path / "b", [id_sample(0, 0), (key, None, "1")], per_shard=2)
    with pytest.raises(DataError, match=r"part-000\.tar: sample 's0003' has a \.cls label but no image"):
        open_split("webdataset", tmp_path / "b", "train")
    write_shards(tmp_path / "c", [(key, image, "x")], per_shard=2)
    with pytest.raises(DataError, match=r"sample 's0003': s0003\.cls holds b'x', expected an integer"):
        open_split("webdataset", tmp_path / "c", "train")


@pytest.mark.parametrize("source", ["filelist", "webdataset"])
def test_missing_root_and_split(source: str, tmp_path: Path, shard_root: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist") as info:
        pipeline(source, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.tar shards|no train\.txt"):
        pipeline(source, tmp_path / "empty" if source == "webdataset" else shard_root)


def test_corrupt_shard_member_names_shard_and_member(tmp_path: Path) -> None:
    samples = [id_sample(i, 0) for i in range(4)]
    samples[2] = (samples[2][0], samples[2][1][:30], "0")
    write_shards(tmp_path / "w", samples, per_shard=4)
    with pytest.raises(DataError, match=r"cannot read image .*part-000\.tar:s0002\.png"):
        list(pipeline("webdataset", tmp_path / "w"))


@pytest.mark.parametrize(
    ("link", "target", "why"),
    [
        ("a/loop", ".", "is a symlink loop"),  # 41 copies of class a before
        ("loop", ".", "is a symlink loop"),  # a phantom class 'loop' before
        ("b/up", "../..", "is a symlink loop"),  # above the data root: the other classes again
        ("e", "a", "leads to .*/a, which is indexed already"),  # a second way into class a
    ],
)
def test_a_symlink_loop_or_second_link_adds_no_images_or_classes(
    id_folder: Callable[..., Path], link: str, target: str, why: str
) -> None:
    root = id_folder("data/root", classes={"a": 8, "b": 8})
    outside = id_folder("elsewhere", classes={"c": 3, "d": 2})
    (root / "c").symlink_to(outside / "c")  # links to other folders are followed
    (root / "a" / "more").symlink_to(outside / "d")
    plain = open_split("folder", root, "train")
    assert len(plain) == 21 and plain.class_names == ["a", "b", "c"]
    (root / link).symlink_to(target)
    with pytest.warns(UserWarning, match=re.escape(str(root / link)) + " " + why):
        linked = open_split("folder", root, "train")
    assert linked.class_names == plain.class_names
    assert np.array_equal(linked.paths, plain.paths) and np.array_equal(linked.labels, plain.labels)
