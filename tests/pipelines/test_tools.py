"""``gali data check|prepare|stats``: bad files found, shards that read back like the source, counts."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gali.engine.cli import main
from gali.pipelines import make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.tools import check_images

from .conftest import mode_images

CPU = torch.device("cpu")


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random smooth image (a bilinear upscale of 3×3 noise): JPEG keeps it close."""
    return Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height))


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """train/{cat: 5, dog: 7}, test/{cat: 2, dog: 2} of non-square smooth images in several formats."""
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 5, "dog": 7}), ("test", {"cat": 2, "dog": 2})):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                ext = ("png", "jpg", "webp")[i % 3]
                smooth_image(rng, 20 + 4 * i, 16 + 2 * (i % 4)).save(root / split / cls / f"{i}.{ext}")
    return root


def read_all(source: str, root: Path, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    cfg = DataConfig(source=source, root=str(root), resolution=8, workers=0)
    p = make_pipeline(cfg, split=split, batch_size=n, device=CPU, seed=0)
    (batch,) = list(p)
    return batch.x, batch.labels, p.class_names


def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each image of ``a`` the index of the nearest image of ``b``; asserts a one-to-one match."""
    nearest = torch.cdist(a.flatten(1), b.flatten(1)).argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(b)))
    return nearest


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_prepare_round_trips_through_the_webdataset_source(
    split_folder: Path, tmp_path: Path, image_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "shards"
    args = ["data", "prepare", str(split_folder), str(dst), "--resolution", "8", "--shards", "3"]
    assert main([*args, "--format", image_format, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images in 3 shards" in out and "test: 4 images in 3 shards" in out
    shards = [f"shard-0000{j}.{ext}" for j in range(3) for ext in ("idx", "tar")]  # each with DALI's index
    assert sorted(p.name for p in (dst / "train").iterdir()) == shards
    assert (dst / "classes.txt").read_text() == "cat\ndog\n"
    assert not list(dst.rglob(".*"))  # no temporary files left
    for split, n in (("train", 12), ("test", 4)):
        x, labels, names = read_all("webdataset", dst, split, n)
        x_ref, labels_ref, names_ref = read_all("folder", split_folder, split, n)
        assert names == names_ref == ["cat", "dog"]
        nearest = matched(x, x_ref)
        assert torch.equal(labels, labels_ref[nearest])
        if image_format == "png":
            assert torch.equal(x, x_ref[nearest])  # exact: the same eval transform, lossless
        else:
            assert (x - x_ref[nearest]).abs().mean() < 0.02


def test_prepare_is_deterministic_and_refuses_a_non_empty_destination(
    split_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for dst in ("a", "b"):
        assert (
            main(["data", "prepare", str(split_folder), str(tmp_path / dst), "--resolution", "8", "--shards", "2"]) == 0
        )
    for shard in ("train/shard-00000.tar", "test/shard-00001.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    before = (tmp_path / "a" / "classes.txt").read_bytes()
    # a rerun with the same settings resumes (tests/pipelines/test_prepare_imagenet.py); other settings are refused
    assert main(["data", "prepare", str(split_folder), str(tmp_path / "a"), "--resolution", "16", "--shards", "2"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "a" / "classes.txt").read_bytes() == before


def test_check_finds_planted_bad_files(split_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(split_folder)]) == 0
    assert capsys.readouterr().out.strip() == "checked 16 files, 0 bad"

    jpeg = io.BytesIO()
    smooth_image(np.random.default_rng(1), 64, 64).save(jpeg, "JPEG")
    planted = {
        "train/cat/cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "train/dog/text.png": b"this is not a png\n",
        "test/cat/empty.webp": b"",
    }
    for name, data in planted.items():
        (split_folder / name).write_bytes(data)
    (split_folder / "train" / "notes.txt").write_text("not an image: not checked")
    assert main(["data", "check", str(split_folder), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "checked 19 files, 3 bad"
    bad = {line.split(": ")[1]: line for line in lines[:-1]}
    assert set(bad) == {str(split_folder / name) for name in planted}
    assert "truncated" in bad[str(split_folder / "train/cat/cut.jpg")].lower()
    assert "UnidentifiedImageError" in bad[str(split_folder / "train/dog/text.png")]


def test_check_names_a_symlink_loop_and_counts_each_image_once(
    split_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    links = [split_folder / "loop", split_folder / "train" / "cat" / "loop"]
    for link in links:
        link.symlink_to(".")
    with pytest.warns(UserWarning) as warned:
        assert main(["data", "check", str(split_folder)]) == 0
    assert capsys.readouterr().out.strip() == "checked 16 files, 0 bad"
    assert sorted(str(w.message).partition(" ")[0] for w in warned) == sorted(map(str, links))
    assert all("is a symlink loop" in str(w.message) for w in warned)


def test_check_accepts_every_image_mode_and_still_finds_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    cases = list(mode_images().values())
    for i, case in enumerate(cases):
        (root / f"{i:02d}-{case.name}").write_bytes(case.data)
    assert main(["data", "check", str(root), "--workers", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"checked {len(cases)} files, 0 bad"

    gray16 = next(c for c in cases if c.mode == "I;16").data
    cmyk = next(c for c in cases if c.mode == "CMYK").data
    planted = {"cut-gray16.png": gray16[: len(gray16) // 2], "cut-cmyk.jpg": cmyk[: len(cmyk) // 2]}
    for name, data in planted.items():
        (root / name).write_bytes(data)
    report = check_images(root, workers=2)
    assert report.checked == len(cases) + 2
    assert sorted(name for name, _ in report.bad) == sorted(str(root / name) for name in planted)


def test_check_reads_shards_and_lists(split_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "shards"
    assert main(["data", "prepare", str(split_folder), str(dst), "--resolution", "8", "--shards", "1"]) == 0
    capsys.readouterr()
    with tarfile.open(dst / "test" / "shard-00000.tar", "a") as tar:
        for name, data in (("bad.jpg", b"\xff\xd8 not really"), ("bad.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["data", "check", str(dst)]) == 1
    out = capsys.readouterr().out
    assert f"bad: {dst / 'test' / 'shard-00000.tar'}:bad.jpg: " in out and "checked 17 files, 1 bad" in out

    (split_folder / "train.txt").write_text("train/cat/0.png 0\ntrain/dog/1.jpg 1\n")
    assert main(["data", "check", str(split_folder / "train.txt")]) == 0
    assert "checked 2 files, 0 bad" in capsys.readouterr().out


def test_data_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a.png one\n")
    assert main(["data", "stats", str(tmp_path / "lists")]) == 2
    assert "train.txt, line 1" in capsys.readouterr().err


def test_stats_counts_per_class_and_sizes(split_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", str(split_folder)]) == 0
    out = capsys.readouterr().out
    assert "source layout 'folder'" in out
    assert "train: 12 images, 2 classes\n  cat  5\n  dog  7\n" in out
    assert "test: 4 images, 2 classes\n  cat  2\n  dog  2\n" in out
    # train widths 20..44 step 4 (cat: 20-36, dog: 20-44), heights 16..22: buckets 16-31 and 32-63 wide
    assert "    16-31 x 16-31: 6\n    32-63 x 16-31: 6\n" in out
