"""The torch backend (``TorchFilePipeline``) over image folders: batches of the contract, seeded order, rank
shards, errors (the other sources: test_sources.py)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from gali.engine.errors import ConfigError, DataError
from gali.pipelines import Batch, Pipeline, check_batch
from gali.pipelines.config import DataConfig
from gali.pipelines.torch_files import TorchFilePipeline, load_image

from .conftest import mode_images

try:
    from gali.pipelines.dali import DaliPipeline
except ConfigError:  # nvidia-dali is not installed: the image-mode tests check the torch backend alone
    DaliPipeline = None

CPU = torch.device("cpu")
MODE_IMAGES = mode_images()


def pipeline(root: Path, **kwargs: object) -> TorchFilePipeline:
    options: dict = {"split": "train", "resolution": 8, "batch_size": 4, "device": CPU, "seed": 0, "workers": 0}
    options.update(kwargs)
    return TorchFilePipeline(root, **options)


def decode_index(pixel: torch.Tensor) -> int:
    """The image index that the ``id_folder`` fixture encoded in a solid color, from one pixel."""
    r, g, _ = np.rint((pixel.double().numpy() + 1.0) * 127.5).astype(int)
    return int(r + 256 * g)


def indices(batches: list[Batch]) -> list[int]:
    return [decode_index(b.x[i, :, 0, 0]) for b in batches for i in range(b.x.shape[0])]


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Two classes of non-square images in every accepted format and several color modes.

    'red' images are red in the middle and blue at the far left/right edges (the center crop
    removes the blue); 'green' images are green. Non-images, hidden files and hidden folders are
    scattered around and must be ignored.
    """
    root = tmp_path / "mixed"
    formats = [("png", "RGBA"), ("jpg", "RGB"), ("jpeg", "L"), ("bmp", "P"), ("webp", "RGB"), ("PNG", "RGB")]
    for cls, color in (("red", (255, 0, 0)), ("green", (0, 255, 0))):
        for i, (ext, mode) in enumerate(formats):
            folder = root / cls / ("nested" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB", (60, 30), color)
            image.paste((0, 0, 255), (0, 0, 10, 30))
            image.paste((0, 0, 255), (50, 0, 60, 30))
            if mode == "L" or mode == "P":
                image = image.convert(mode)
            elif mode == "RGBA":
                image = image.convert("RGBA")
            image.save(folder / f"{cls}{i}.{ext}")
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".hidden.png").write_bytes(b"skipped")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"skipped")
    return root


def test_batches_meet_the_contract_and_labels_follow_class_folders(mixed_folder: Path) -> None:
    p = pipeline(mixed_folder, resolution=16, batch_size=5)
    assert isinstance(p, Pipeline)
    assert p.class_names == ["green", "red"]
    assert p.num_images == 12 and len(p) == 2  # 12 images, batches of 5: the last 2 are dropped
    batches = list(p)
    assert len(batches) == 2
    for batch in batches:
        check_batch(batch, batch_size=5, resolution=16, device=CPU, num_classes=2)
        for x, label in zip(batch.x, batch.labels, strict=True):
            channel = 1 if label == 0 else 0  # green or red
            lum = x.mean(dim=(1, 2))
            if lum[0] == lum[1] == lum[2]:  # grayscale / palette images
                continue
            assert lum[channel] > 0.9 and lum[2] < -0.9, (label, lum)  # the blue edges are cropped away


def test_load_image_resizes_the_shorter_side_then_center_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 40, 3), dtype=np.uint8))  # 40 wide, 100 tall
    image.save(tmp_path / "tall.png")
    pixels = load_image(tmp_path / "tall.png", 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    reference = np.asarray(image.resize((8, 20), Image.Resampling.BILINEAR).crop((0, 6, 8, 14)))
    assert np.array_equal(pixels, reference.transpose(2, 0, 1))


def test_static_batches_drop_the_last_incomplete_one(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=22)
    p = pipeline(root, batch_size=4)
    assert p.class_names == ["ids"] and len(p) == 5
    batches = list(p)
    assert [b.x.shape[0] for b in batches] == [4] * 5
    seen = indices(batches)
    assert len(set(seen)) == 20 and set(seen) <= set(range(22))
    assert all((b.labels == 0).all() for b in batches)


def test_order_depends_on_seed_and_epoch_only(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=40)
    a, b = pipeline(root, seed=3), pipeline(root, seed=3)
    epoch0 = indices(list(a))
    assert indices(list(b)) == epoch0
    assert indices(list(a)) == epoch0  # iterating again without set_epoch repeats the epoch
    a.set_epoch(1)
    epoch1 = indices(list(a))
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(range(40))
    b.set_epoch(1)
    assert indices(list(b)) == epoch1
    a.set_epoch(0)
    assert indices(list(a)) == epoch0
    assert indices(list(pipeline(root, seed=4))) != epoch0


def test_ranks_partition_the_epoch(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=50)
    ranks = [pipeline(root, batch_size=4, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in ranks] == [4, 4, 4]  # 50 // (4 · 3)
    for epoch in (0, 1):
        shards = []
        for p in ranks:
            p.set_epoch(epoch)
            shards.append(indices(list(p)))
        assert all(len(s) == 16 for s in shards)
        assert len(set().union(*map(set, shards))) == 48  # disjoint
        assert all(p.num_images == 50 for p in ranks)


def test_workers_give_the_same_batches(id_folder: Callable[..., Path]) -> None:
    root = id_folder(classes={"a": 9, "b": 11})
    inline, workers = pipeline(root, seed=1), pipeline(root, seed=1, workers=2)
    for epoch in (0, 1):
        inline.set_epoch(epoch)
        workers.set_epoch(epoch)
        for x, y in zip(inline, workers, strict=True):
            check_batch(y, batch_size=4, resolution=8, device=CPU, num_classes=2)
            assert torch.equal(x.x, y.x) and torch.equal(x.labels, y.labels)


def test_train_test_layout_shares_labels(id_folder: Callable[..., Path]) -> None:
    root = id_folder("split/train", classes={"a": 4, "b": 4, "c": 4}).parent
    id_folder("split/test", classes={"c": 4})  # a subset of the train classes
    test = pipeline(root, split="test")
    assert test.class_names == ["a", "b", "c"] and test.num_images == 4
    (batch,) = list(test)
    assert (batch.labels == 2).all()
    assert pipeline(root, split="train").num_images == 12


def test_without_train_folder_there_is_no_test_split(id_folder: Callable[..., Path]) -> None:
    root = id_folder(classes={"a": 4})
    with pytest.raises(DataError, match=r"no train/ subfolder.*no split 'test'") as info:
        pipeline(root, split="test")
    assert str(root) in str(info.value)


def test_missing_test_folder(id_folder: Callable[..., Path]) -> None:
    root = id_folder("split/train", classes={"a": 4}).parent
    with pytest.raises(DataError, match=r"split 'test' needs the folder") as info:
        pipeline(root, split="test")
    assert str(root / "test") in str(info.value)


def test_test_classes_must_match_train(id_folder: Callable[..., Path]) -> None:
    root = id_folder("split/train", classes={"a": 4}).parent
    id_folder("split/test", classes={"zebra": 4})
    with pytest.raises(DataError, match=r"zebra.*do not match"):
        pipeline(root, split="test")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*data\.root") as info:
        pipeline(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_root_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"holds no image files") as info:
        pipeline(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_loose_images_beside_class_folders(id_folder: Callable[..., Path]) -> None:
    root = id_folder(classes={"a": 4})
    Image.new("RGB", (8, 8)).save(root / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png"):
        pipeline(root)


def test_fewer_images_than_one_batch(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=3)
    with pytest.raises(DataError, match=r"3 images, fewer than one batch of 4"):
        pipeline(root)


def test_too_few_images_per_rank(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=7)
    with pytest.raises(DataError, match=r"3 per rank over 2 ranks, fewer than one batch of 4"):
        pipeline(root, rank=1, world_size=2)


def png_bytes(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("cut.png", lambda: png_bytes()[: len(png_bytes()) // 2]),
        ("cut.jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2]),
        ("garbage.jpeg", lambda: b"\x00not an image at all" * 10),
        ("empty.webp", lambda: b""),
    ],
)
def test_corrupt_image_names_the_file(id_folder: Callable[..., Path], name: str, content: Callable[[], bytes]) -> None:
    root = id_folder(classes={"a": 7})
    bad = root / "a" / name
    bad.write_bytes(content())
    p = pipeline(root, batch_size=8)  # one batch holding every image, the bad one included
    with pytest.raises(DataError, match=r"cannot read image") as info:
        list(p)
    message = str(info.value)
    assert str(bad) in message and f"gali data check {root}" in message
    assert bad.read_bytes() == content()  # nothing deleted or rewritten


def test_corrupt_image_in_a_worker_raises_the_one_line_error(id_folder: Callable[..., Path]) -> None:
    """A worker's DataError arrives as the worker raised it: the message of the in-process error, one line."""
    root = id_folder(classes={"a": 11})
    bad = root / "a" / "cut.png"
    bad.write_bytes(png_bytes()[:100])
    with pytest.raises(DataError) as inline:
        list(pipeline(root, batch_size=4))
    workers = pipeline(root, batch_size=4, workers=2)
    for _ in range(2):  # the persistent workers serve the next pass, which fails the same way
        with pytest.raises(DataError, match=re.escape(bad.name)) as info:
            list(workers)
        message = str(info.value)
        assert message == str(inline.value)
        assert message.startswith(f"cannot read image {bad}: ") and f"`gali data check {root}`" in message
        assert "\n" not in message and "Caught" not in message and "Traceback" not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_invalid_arguments(id_folder: Callable[..., Path]) -> None:
    root = id_folder(n=8)
    with pytest.raises(ValueError, match="split"):
        pipeline(root, split="val")
    with pytest.raises(ValueError, match="rank"):
        pipeline(root, rank=2, world_size=2)


@pytest.mark.parametrize("augment", [False, True])
def test_a_pass_started_mid_epoch_is_the_tail_of_the_full_pass(id_folder: Callable[..., Path], augment: bool) -> None:
    """A resumed run's epoch: the same images with the same augmentation, from batch k on, on every rank."""
    root = id_folder(n=50)
    for rank in range(2):
        full, resumed = (pipeline(root, batch_size=4, rank=rank, world_size=2, augment=augment) for _ in range(2))
        full.set_epoch(3)
        want = list(full)
        resumed.set_epoch(3, start_batch=2)
        got = list(resumed)
        assert len(want) == 6 and len(got) == 4
        for a, b in zip(got, want[2:], strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
        resumed.set_epoch(3, start_batch=6)
        assert list(resumed) == []
        resumed.set_epoch(4)  # the next epoch starts at its beginning again
        assert len(list(resumed)) == 6
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 6\].*got 7"):
        full.set_epoch(0, start_batch=7)


def pixels_of(batch: Batch) -> np.ndarray:
    """The batch's first image as uint8 (H, W, 3): x = k / 127.5 - 1 maps back exactly."""
    return np.rint((batch.x[0].double().numpy() + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)


@pytest.mark.parametrize("key", list(MODE_IMAGES))
def test_every_image_mode_decodes_to_the_rgb_of_dali(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One image of each mode (conftest.mode_images: known values, no resize), read by both backends.

    The torch backend gives the expected 8-bit RGB exactly: 16-bit gray round(v / 257) (not clipped to white),
    16-bit color Pillow's high byte v >> 8, CMYK (255 - C)(255 - K) / 255 rounded down, palette colors, alpha
    dropped. DALI's CPU decoder (where installed) gives its expected values exactly (16-bit: round(v / 257)),
    and the backends agree exactly, or within one level (1/127.5 in x) for 16-bit color."""
    case = MODE_IMAGES[key]
    root = tmp_path / "images"
    root.mkdir()
    (root / case.name).write_bytes(case.data)
    if case.gray16_as is not None:  # the torch backend reads in this process (no workers): the mapping applies
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), case.gray16_as)
    with Image.open(root / case.name) as image:
        assert image.mode == case.mode  # the mode under test is the one Pillow opens the file in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none, e.g. about converting a palette with transparency to RGB
        (batch,) = list(pipeline(root, resolution=case.size, batch_size=1))
    check_batch(batch, batch_size=1, resolution=case.size, device=CPU, num_classes=1)
    ours = pixels_of(batch)
    np.testing.assert_array_equal(ours, case.torch)
    if DaliPipeline is None:
        return
    cfg = DataConfig(source="folder", root=str(root), resolution=case.size, backend="dali", workers=1)
    (batch,) = list(DaliPipeline(cfg, root, split="train", batch_size=1, device=CPU, seed=0))
    theirs = pixels_of(batch)
    np.testing.assert_array_equal(theirs, case.dali)
    assert np.abs(ours.astype(int) - theirs).max() <= (1 if key.endswith("16bit") else 0)


def test_a_process_with_paused_workers_exits_and_a_job_sigterm_spares_them(tmp_path: Path) -> None:
    """Workers ignore SIGTERM while the main process runs (a job's signal), and still end when it exits."""
    code = """
import os, signal, sys, time
from torch.utils.data import DataLoader
from gali.pipelines.torch_files import _leave_stop_signals_to_the_main_process
loader = DataLoader(list(range(100)), batch_size=10, num_workers=2, persistent_workers=True,
                    worker_init_fn=_leave_stop_signals_to_the_main_process)
paused = iter(loader)
next(paused), next(paused)  # a batch from each worker: both have run their init function
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(0, signal.SIGTERM)  # the whole job, this process included (which ignores it here)
time.sleep(0.5)
assert len(list(loader)) == 10  # the workers are alive and still serve
print("served")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, start_new_session=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "served", done.stderr[-2000:]
