"""The DALI backend (CPU-only DALI: ``device_id=None``) against the batch contract and its torch twin."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.engine.errors import DataError
from gali.engine.loop.config import load_config
from gali.engine.loop.train import train
from gali.pipelines import Batch, Pipeline, check_batch, make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.dali import DaliPipeline
from gali.pipelines.torch_files import TorchFilePipeline

CPU = torch.device("cpu")
SOURCES = ("folder", "filelist", "webdataset")


def dali(
    root: Path,
    source: str = "folder",
    *,
    split: str = "train",
    batch_size: int = 4,
    seed: int = 0,
    resolution: int = 8,
    channels_last: bool = False,
    **kwargs: object,
) -> DaliPipeline:
    cfg = DataConfig(source=source, root=str(root), resolution=resolution, backend="dali", workers=1, **kwargs)
    return DaliPipeline(
        cfg, root, split=split, batch_size=batch_size, device=CPU, seed=seed, channels_last=channels_last
    )


def decode_index(pixel: torch.Tensor) -> int:
    """The image index that ``solid_color`` encoded, from one pixel in [-1, 1]."""
    r, g, _ = np.rint((pixel.double().numpy() + 1.0) * 127.5).astype(int)
    return int(r + 256 * g)


def indices(batches: list[Batch]) -> list[int]:
    return [decode_index(b.x[i, :, 0, 0]) for b in batches for i in range(b.x.shape[0])]


def png_bytes(index: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (index % 256, index // 256, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_source(kind: str, tmp_path: Path, id_folder: Callable[..., Path], n: int = 24) -> tuple[Path, dict[int, int]]:
    """``n`` solid-color PNGs (color = index) in the ``kind`` layout, and each index's label (index % 3)."""
    labels = {i: i % 3 for i in range(n)}
    if kind == "folder":  # id_folder numbers the images class after class
        counts = [n // 3, n // 3, n - 2 * (n // 3)]
        root = id_folder(classes={f"c{c}": count for c, count in enumerate(counts)})
        return root, dict(enumerate(c for c, count in enumerate(counts) for _ in range(count)))
    root = tmp_path / kind
    root.mkdir()
    if kind == "filelist":
        folder = id_folder(n=n)
        lines = [f"../{folder.name}/{i:05d}.png {labels[i]}" for i in range(n)]
        (root / "train.txt").write_text("# path label\n" + "\n".join(lines) + "\n")
        return root, labels
    for shard in range(3):  # webdataset: three shards, samples in order
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(shard, n, 3):
                add_member(tar, f"s{i:05d}.png", png_bytes(i))
                add_member(tar, f"s{i:05d}.cls", f"{labels[i]}\n".encode())
    return root, labels


@pytest.mark.parametrize("kind", SOURCES)
def test_batches_meet_the_contract_with_the_labels_of_the_source(kind, tmp_path, id_folder):
    root, labels = make_source(kind, tmp_path, id_folder)
    pipe = dali(root, kind)
    assert isinstance(pipe, Pipeline)
    assert (pipe.num_images, len(pipe), pipe.resolution, pipe.batch_size) == (24, 6, 8, 4)
    assert pipe.class_names == (["c0", "c1", "c2"] if kind == "folder" else ["0", "1", "2"])
    batches = list(pipe)
    assert len(batches) == 6
    for batch in batches:
        check_batch(batch, batch_size=4, resolution=8, device=CPU, num_classes=3)
        got = [labels[decode_index(batch.x[i, :, 0, 0])] for i in range(4)]
        assert batch.labels.tolist() == got
    seen = indices(batches)
    assert len(set(seen)) == 24 and set(seen) == set(labels)


@pytest.mark.parametrize("kind", SOURCES)
def test_order_is_a_function_of_seed_and_epoch_and_two_ranks_partition_an_epoch(kind, tmp_path, id_folder):
    root, _ = make_source(kind, tmp_path, id_folder, n=26)  # 26 = 3 batches of 4 per rank over 2 ranks, + 2
    first, again = dali(root, kind, seed=3), dali(root, kind, seed=3)
    assert indices(list(first)) == indices(list(again))
    epoch0 = indices(list(first))
    first.set_epoch(1)
    assert indices(list(first)) != epoch0
    first.set_epoch(0)
    assert indices(list(first)) == epoch0

    cfg = DataConfig(source=kind, root=str(root), resolution=8, backend="dali", workers=1)
    ranks = [
        DaliPipeline(cfg, root, split="train", batch_size=4, device=CPU, seed=3, rank=r, world_size=2) for r in range(2)
    ]
    for epoch in (0, 1):
        seen = []
        for pipe in ranks:
            pipe.set_epoch(epoch)
            assert len(pipe) == 3
            seen.append(indices(list(pipe)))
        assert [len(s) for s in seen] == [12, 12] and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("kind", SOURCES)
def test_a_pass_started_mid_epoch_is_the_tail_of_the_full_pass(kind, tmp_path, id_folder):
    """What a resumed run reads: the reader's list from the resumed batch on (shards: through the pass's index)."""
    root, _ = make_source(kind, tmp_path, id_folder, n=26)
    cfg = DataConfig(source=kind, root=str(root), resolution=8, backend="dali", workers=1)
    for rank in range(2):
        full, resumed = (
            DaliPipeline(cfg, root, split="train", batch_size=4, device=CPU, seed=3, rank=rank, world_size=2)
            for _ in range(2)
        )
        full.set_epoch(1)
        resumed.set_epoch(1, start_batch=1)
        want = indices(list(full))
        assert len(want) == 12 and indices(list(resumed)) == want[4:]
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 3\].*got 4"):
        resumed.set_epoch(1, start_batch=4)


def test_file_sources_deal_the_torch_backends_order_to_every_rank(id_folder):
    root = id_folder(n=26)
    cfg = DataConfig(source="folder", root=str(root), resolution=8, backend="dali", workers=1)
    for rank in range(2):
        twin = TorchFilePipeline(
            root, split="train", resolution=8, batch_size=4, device=CPU, seed=5, rank=rank, world_size=2
        )
        pipe = DaliPipeline(cfg, root, split="train", batch_size=4, device=CPU, seed=5, rank=rank, world_size=2)
        for p in (twin, pipe):
            p.set_epoch(2)
        assert indices(list(pipe)) == indices(list(twin))


def smooth_image(i: int, size: tuple[int, int]) -> Image.Image:
    """A smooth color field (gradients and a low-frequency wave), like a photo rather than noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    r = 128 + 100 * np.sin(2 * np.pi * (xx + 0.3 * i / 7))
    g = 255 * yy
    b = 128 + 80 * np.cos(2 * np.pi * (xx + yy))
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))


# Sizes: shrinking (landscape, portrait, square), enlarging (smaller than the 16x16 crop) and identity.
SIZES = [(60, 45), (45, 60), (33, 33), (12, 9), (7, 20), (16, 16), (101, 77), (40, 30)]


@pytest.mark.parametrize(("ext", "max_steps", "mean_steps"), [("png", 2, 0.25), ("jpg", 4, 0.5)])
def test_eval_transform_agrees_with_the_torch_backend(ext, max_steps, mean_steps, tmp_path):
    """Same images, same order, same centered-square resize (shrinking, enlarging, identity).

    A step is one uint8 level, 1/127.5 in [-1, 1] units. Measured on these images (DALI 2.4, Pillow): PNG max
    2 steps, mean 0.09 (DALI's antialiased linear resampling rounds differently from Pillow's); JPEG (quality
    95) max 2 steps, mean 0.14: decoding adds little. The JPEG bound leaves room for other libjpeg builds.
    Where no resize happens the floats are bit-identical (see the digits test)."""
    root = tmp_path / "smooth"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate(SIZES):
            smooth_image(i, size).save(root / cls / f"{i}.{ext}", quality=95)
    cfg = DataConfig(source="folder", root=str(root), resolution=16, backend="dali", workers=2)
    pipe = DaliPipeline(cfg, root, split="train", batch_size=4, device=CPU, seed=1)
    twin = TorchFilePipeline(root, split="train", resolution=16, batch_size=4, device=CPU, seed=1)
    for ours, theirs in zip(pipe, twin, strict=True):
        assert torch.equal(ours.labels, theirs.labels)
        diff = (ours.x - theirs.x).abs() * 127.5
        assert float(diff.max()) <= max_steps + 1e-4 and float(diff.mean()) <= mean_steps


def test_digits_are_bit_identical_to_the_torch_backend(digits16):
    cfg = DataConfig(source="digits", root=str(digits16), resolution=16, backend="dali", workers=2)
    twin_cfg = DataConfig(source="digits", root=str(digits16), resolution=16, backend="torch", workers=0)
    for split in ("train", "test"):
        pipe = make_pipeline(cfg, split=split, batch_size=64, device=CPU, seed=2)
        twin = make_pipeline(twin_cfg, split=split, batch_size=64, device=CPU, seed=2)
        assert isinstance(pipe, DaliPipeline) and pipe.class_names == twin.class_names
        assert (pipe.num_images, len(pipe)) == (twin.num_images, len(twin))
        for ours, theirs in zip(pipe, twin, strict=True):
            assert torch.equal(ours.x, theirs.x) and torch.equal(ours.labels, theirs.labels)


def test_augmentation_is_seeded_and_channels_last_keeps_the_values(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, size in enumerate(SIZES):
        smooth_image(i, size).save(root / f"{i}.jpg", quality=95)
    runs = [list(dali(root, resolution=16, augment=True, seed=4)) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        check_batch(a, batch_size=4, resolution=16, device=CPU, num_classes=1)
        assert torch.equal(a.x, b.x)
    plain = list(dali(root, resolution=16, seed=4))
    assert any(not torch.equal(a.x, p.x) for a, p in zip(runs[0], plain, strict=True))

    last = list(dali(root, resolution=16, seed=4, channels_last=True))
    for a, p in zip(last, plain, strict=True):
        check_batch(a, batch_size=4, resolution=16, device=CPU, num_classes=1)
        assert a.x.is_contiguous(memory_format=torch.channels_last) and torch.equal(a.x, p.x)


def write_corrupt_folder(root: Path, bad: str) -> Path:
    (root / "c").mkdir(parents=True)
    for i in range(8):
        smooth_image(i, (20, 20)).save(root / "c" / f"{i}.jpg")
    path = root / "c" / "5.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if bad == "truncated" else b"not an image at all" * 8)
    return path


@pytest.mark.parametrize("bad", ["truncated", "garbage"])
def test_an_unreadable_image_is_named_during_iteration(bad, tmp_path):
    path = write_corrupt_folder(tmp_path / "data", bad)
    pipe = dali(tmp_path / "data")
    with pytest.raises(DataError, match=r"cannot read image .*5\.jpg.*gali data check"):
        list(pipe)
    with pytest.raises(DataError, match=r"5\.jpg"):  # the next pass builds a fresh pipeline and fails the same way
        list(pipe)
    assert path.exists()


def test_bad_roots_and_splits_fail_before_any_batch(tmp_path, id_folder):
    with pytest.raises(DataError, match="does not exist"):
        dali(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        dali(tmp_path / "empty")
    with pytest.raises(DataError, match="no train/ subfolder"):
        dali(id_folder(n=8), split="test")
    with pytest.raises(DataError, match="fewer than one batch of 16"):
        dali(id_folder("few", n=8), batch_size=16)
    cfg = DataConfig(source="folder", root=str(tmp_path / "few"), resolution=8, backend="dali")
    with pytest.raises(DataError, match="per rank over 3 ranks"):
        DaliPipeline(cfg, tmp_path / "few", split="train", batch_size=4, device=CPU, seed=0, rank=0, world_size=3)
    (tmp_path / "tars").mkdir()
    with pytest.raises(DataError, match=r"no \.tar shards"):
        dali(tmp_path / "tars", "webdataset")


def test_gali_train_runs_on_the_dali_backend(tmp_path):
    overrides = [
        "data.backend=dali",
        "data.workers=1",
        "model.width=0.125",
        "model.latent_dim=16",
        "run.batch_size=16",
        "run.kimg=0.064",
        "run.tick_kimg=0.032",
        "run.snapshot_kimg=0.064",
        "run.grid_size=2",
        f"run.out_dir={tmp_path / 'runs'}",
    ]
    lines: list[str] = []
    result = train(load_config("demo", overrides), log=lines.append)
    assert result.kimg == pytest.approx(0.064) and np.isfinite(result.recon_mse)
    assert any("batches of 16 per epoch" in line for line in lines)
