"""The demo data set: scikit-learn's handwritten digits, written once as an image-folder tree.

``load_digits()`` ships inside scikit-learn (1,797 grayscale 8×8 images, values 0..16, ten
classes), so the demo needs no download. ``prepare_digits`` writes them as RGB PNG files

    root/train/<digit>/<index>.png      root/test/<digit>/<index>.png      root/manifest.json

upscaled to the training resolution (Pillow bilinear; white digit on black), with a stratified,
seeded held-out split. ``<index>`` is the image's index in ``load_digits()``. The tree is built in a
temporary sibling folder and renamed into place with the manifest already inside, so a
half-written cache is never used; a second call with the same arguments is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gali.engine.errors import DataError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def cache_root() -> Path:
    """gali's cache folder: ``$GALI_CACHE``, by default ``~/.cache/gali``."""
    return Path(os.environ.get("GALI_CACHE") or "~/.cache/gali").expanduser()


def default_digits_root(resolution: int) -> Path:
    """The default cache folder of the digits at ``resolution``: ``$GALI_CACHE/digits-<res>``."""
    return cache_root() / f"digits-{resolution}"


def _stratified_test_mask(targets: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out images: round(n_c · test_fraction) random images of each class c."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        n_test = round(len(members) * test_fraction)
        mask[rng.permutation(members)[:n_test]] = True
    return mask


def _expected_manifest(resolution: int, test_fraction: float, seed: int, counts: dict[str, int]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "source": "sklearn.datasets.load_digits",
        "resolution": resolution,
        "test_fraction": test_fraction,
        "seed": seed,
        "classes": [str(d) for d in range(10)],
        "counts": counts,
    }


def _count_pngs(root: Path) -> dict[str, int]:
    return {
        split: sum(1 for _ in (root / split).glob("*/*.png")) if (root / split).is_dir() else 0
        for split in ("train", "test")
    }


def _check_existing(root: Path, resolution: int, test_fraction: float, seed: int) -> None:
    """Accept a finished cache at ``root`` made with the same arguments, or raise ``DataError``."""
    manifest_path = root / MANIFEST
    remedy = f"delete {root} to rebuild it, or set data.root to another folder"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"digits cache {root}: unreadable {manifest_path} ({e}); {remedy}") from e
    wanted = {"resolution": resolution, "test_fraction": test_fraction, "seed": seed}
    found = {k: manifest.get(k) for k in wanted}
    if manifest.get("format") != MANIFEST_FORMAT or found != wanted:
        raise DataError(
            f"digits cache {root} was made with {found} (format {manifest.get('format')}), not {wanted}; {remedy}"
        )
    counts = _count_pngs(root)
    if counts != manifest.get("counts"):
        raise DataError(
            f"digits cache {root} holds {counts} PNG files but its manifest lists {manifest.get('counts')} "
            f"(files were removed or added); {remedy}"
        )


def prepare_digits(root: Path, resolution: int = 32, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's digits once as RGB PNGs under ``root`` (train/test split) and return ``root``.

    Deterministic for given arguments; a finished cache made with the same arguments is reused as
    is. Raises ``DataError`` if ``root`` holds something else (a non-empty folder without a
    manifest, or a cache made with other arguments) and ``ValueError`` for invalid arguments.
    """
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    root = Path(root).expanduser()
    if (root / MANIFEST).is_file():
        _check_existing(root, resolution, test_fraction, seed)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} exists and is not a digits cache (no {MANIFEST}); refusing to write into it. "
            "Point data.root at a new or empty folder, or leave it unset for the default "
            f"{default_digits_root(resolution)}"
        )

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = np.asarray(digits.target)
    is_test = _stratified_test_mask(targets, test_fraction, seed)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for index, (image, target, test) in enumerate(zip(images, targets, is_test, strict=True)):
            folder = tmp / ("test" if test else "train") / str(int(target))
            folder.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BILINEAR)
            big.convert("RGB").save(folder / f"{index:04d}.png")
        counts = {"train": int((~is_test).sum()), "test": int(is_test.sum())}
        manifest = _expected_manifest(resolution, test_fraction, seed, counts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0o700
        try:
            os.replace(tmp, root)  # atomic; succeeds over an empty folder, fails over a non-empty one
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            _check_existing(root, resolution, test_fraction, seed)  # another process finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
