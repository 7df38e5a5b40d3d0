"""``gali data prepare`` on an ImageNet-style tree (issue 24, item 5): train/<synset>/*.JPEG + val/<synset>/*.JPEG.

Class indices from the sorted synsets (``classes.txt`` beside the shards), centre crop and an antialiased resize to
R×R, parallel workers, a summary naming unreadable files, and resumable: killed midway (SIGKILL, in the middle of a
shard) and started again, it writes the same files as an uninterrupted run, byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gali.engine.cli import main
from gali.pipelines.sources import open_split
from gali.pipelines.torch_files import load_image

SYNSETS = ("n01440764", "n01443537", "n01484850")


def make_imagenet_like(root: Path, train: int = 8, val: int = 2, seed: int = 0) -> Path:
    """``root/train/<synset>/*.JPEG`` (``train`` per synset) and ``root/val/<synset>/*.JPEG`` (``val`` each) of
    smooth JPEGs of mixed sizes and aspect ratios (portrait, landscape, square, one grayscale, one CMYK), and
    ``train/<first synset>/broken.JPEG``, a JPEG cut to half: unreadable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for s, synset in enumerate(SYNSETS):
            folder = root / split / synset
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
                noise = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC)
                if i == 1:
                    image = image.convert("L")
                elif i == 2:
                    image = image.convert("CMYK")
                image.save(folder / f"{synset}_{s * 100 + i}.JPEG", "JPEG", quality=90)
    whole = (root / "train" / SYNSETS[0] / f"{SYNSETS[0]}_0.JPEG").read_bytes()
    (root / "train" / SYNSETS[0] / "broken.JPEG").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet_like(tmp_path_factory.mktemp("imagenet") / "tree")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


PREPARE = ["data", "prepare", "--resolution", "16", "--shards", "4", "--workers", "2"]


def prepare(src: Path, dst: Path) -> list[str]:
    return [*PREPARE[:2], str(src), str(dst), *PREPARE[2:]]


def test_prepare_an_imagenet_tree(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "shards"
    assert main(prepare(tree, dst)) == 0
    out = capsys.readouterr().out
    assert f"train: 24 images in 4 shards under {dst / 'train'}; 3 classes, 8 to 8 images each; 16x16" in out
    assert f"test: 6 images in 4 shards under {dst / 'test'} (from val/); 3 classes, 2 to 2 images each" in out
    broken = tree / "train" / SYNSETS[0] / "broken.JPEG"
    assert f"  1 of 25 images unreadable, left out:\n    {broken}: OSError: " in out
    assert (dst / "classes.txt").read_text() == "".join(f"{s}\n" for s in SYNSETS)  # line i: class i
    for split, folder, n in (("train", "train", 24), ("test", "val", 6)):
        index = open_split("webdataset", dst, split)
        assert len(index) == n and index.class_names == list(SYNSETS)
        for i in range(n):
            with Image.open(index.image_file(i)) as image:
                assert image.size == (16, 16)
        # every synset's images under its index, and the pixels of the torch backend's eval transform (centre
        # crop, antialiased bilinear resize), up to JPEG's loss
        expected = sorted(str(p.relative_to(tree / folder)) for p in (tree / folder).rglob("*.JPEG"))  # key order
        keys = [int(os.fsdecode(m).split(".")[0]) for m in index.members]
        for i, k in enumerate(keys):
            assert SYNSETS.index(expected[k].split("/")[0]) == index.labels[i]
            reference = load_image(tree / folder / expected[k], 16).astype(float)
            assert np.abs(load_image(index.image_file(i), 16) - reference).mean() < 6


def test_prepare_killed_midway_resumes_to_the_same_bytes(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(prepare(tree, tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    # a subprocess that SIGKILLs itself in the middle of writing the second train shard (its 18th tar member)
    script = textwrap.dedent(f"""
        import os, signal
        from gali.engine.cli import main
        from gali.pipelines import tools
        add, calls = tools._add_member, []
        def add_then_die(tar, name, data):
            calls.append(name)
            if len(calls) == 18:
                os.kill(os.getpid(), signal.SIGKILL)
            add(tar, name, data)
        tools._add_member = add_then_die
        main({prepare(tree, cut)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    left = files(cut)
    assert "train/shard-00000.tar" in left and "train/shard-00001.tar.tmp" in left  # half a shard on disk
    assert "train/shard-00001.tar" not in left and "test/shard-00000.tar" not in left
    capsys.readouterr()
    assert main(prepare(tree, cut)) == 0
    out = capsys.readouterr().out
    assert "3 shards written, 1 already written and verified" in out and "1 of 25 images unreadable" in out
    assert "test: 6 images in 4 shards" in out and "4 shards written, 0 already" in out
    assert files(cut) == files(tmp_path / "whole")
    assert main(prepare(tree, cut)) == 0  # a finished preparation: every shard verified, nothing written
    assert "0 shards written, 4 already written and verified" in capsys.readouterr().out
    assert files(cut) == files(tmp_path / "whole")
