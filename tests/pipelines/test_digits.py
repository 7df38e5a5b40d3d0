"""The demo data set: scikit-learn's digits written once as a train/test image-folder tree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gali.engine.errors import DataError
from gali.pipelines import default_digits_root, prepare_digits
from gali.pipelines import digits as digits_module


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_split_is_stratified_complete_and_labelled_by_folder(digits16: Path) -> None:
    targets = load_digits().target
    seen: dict[str, list[int]] = {"train": [], "test": []}
    for split in seen:
        assert sorted(p.name for p in (digits16 / split).iterdir()) == [str(d) for d in range(10)]
        for png in (digits16 / split).glob("*/*.png"):
            index = int(png.stem)
            assert targets[index] == int(png.parent.name)  # the folder name is the image's label
            seen[split].append(index)
    assert sorted(seen["train"] + seen["test"]) == list(range(len(targets)))  # disjoint and complete
    for c in range(10):
        n_test = sum(targets[i] == c for i in seen["test"])
        assert n_test == round((targets == c).sum() * 0.2)
    manifest = json.loads((digits16 / "manifest.json").read_text())
    assert manifest["counts"] == {"train": len(seen["train"]), "test": len(seen["test"])}
    assert manifest["resolution"] == 16


def test_images_are_rgb_at_the_resolution_with_the_digit_bright(digits16: Path) -> None:
    png = next((digits16 / "train" / "0").glob("*.png"))
    with Image.open(png) as image:
        assert image.mode == "RGB" and image.size == (16, 16)
        pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    original = load_digits().images[int(png.stem)]
    assert pixels[0, 0, 0] < 40 and pixels.max() > 200 and original.max() == 16  # white digit on black


@pytest.mark.usefixtures("no_network")
def test_preparation_is_deterministic_and_offline(tmp_path: Path) -> None:
    a = prepare_digits(tmp_path / "a", resolution=8)
    b = prepare_digits(tmp_path / "b", resolution=8)
    assert tree_digest(a) == tree_digest(b)
    targets = load_digits().target
    split = digits_module._stratified_test_mask(targets, 0.2, seed=0)
    assert np.array_equal(split, digits_module._stratified_test_mask(targets, 0.2, seed=0))
    assert not np.array_equal(split, digits_module._stratified_test_mask(targets, 0.2, seed=1))


def test_second_call_is_a_no_op(digits16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in digits16.rglob("*")}

    def fail() -> None:
        raise AssertionError("load_digits called again")

    monkeypatch.setattr("sklearn.datasets.load_digits", fail)
    assert prepare_digits(digits16, resolution=16) == digits16
    assert {p: p.stat().st_mtime_ns for p in digits16.rglob("*")} == before


def test_default_root_follows_gali_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "c"))
    assert default_digits_root(32) == tmp_path / "c" / "digits-32"
    monkeypatch.delenv("GALI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_digits_root(64) == tmp_path / "home" / ".cache" / "gali" / "digits-64"


def test_interrupted_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = 0
    real_save = Image.Image.save

    def save_then_crash(self: Image.Image, *args: object, **kwargs: object) -> None:
        nonlocal saved
        if saved == 100:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        saved += 1
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(tmp_path / "cache" / "digits-8", resolution=8)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache, no temporary folder
    monkeypatch.setattr(Image.Image, "save", real_save)
    root = prepare_digits(tmp_path / "cache" / "digits-8", resolution=8)
    assert (root / "manifest.json").is_file()


def test_folder_without_manifest_is_not_used_or_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "digits-8"
    (root / "train" / "3").mkdir(parents=True)
    keep = root / "train" / "3" / "0001.png"
    keep.write_bytes(b"half written")
    with pytest.raises(DataError, match=r"not a digits cache") as info:
        prepare_digits(root, resolution=8)
    assert str(root) in str(info.value)
    assert keep.read_bytes() == b"half written"


def test_cache_made_with_other_arguments_is_refused(digits16: Path) -> None:
    with pytest.raises(DataError, match=r"resolution.*16.*delete") as info:
        prepare_digits(digits16, resolution=32)
    assert str(digits16) in str(info.value)


def test_cache_with_missing_files_is_refused(tmp_path: Path) -> None:
    root = prepare_digits(tmp_path / "d", resolution=8)
    next((root / "test" / "7").glob("*.png")).unlink()
    with pytest.raises(DataError, match=r"manifest lists"):
        prepare_digits(root, resolution=8)


def test_concurrent_finisher_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks preparing at once: the one that renames second uses the first one's cache."""
    root = tmp_path / "d"
    real_replace = digits_module.os.replace

    def other_rank_wins(src: str, dst: str) -> None:
        monkeypatch.setattr(digits_module.os, "replace", real_replace)
        prepare_digits(root, resolution=8)  # the other rank finishes first
        real_replace(src, dst)

    monkeypatch.setattr(digits_module.os, "replace", other_rank_wins)
    assert prepare_digits(root, resolution=8) == root
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_digits(Path("unused"), test_fraction=1.0)
    with pytest.raises(ValueError, match="resolution"):
        prepare_digits(Path("unused"), resolution=4)
