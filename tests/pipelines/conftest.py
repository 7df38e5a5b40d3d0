"""Fixtures of the pipeline tests: an isolated cache, no network, small image folders."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from gali.pipelines import prepare_digits


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $GALI_CACHE at a temporary folder so that no test touches ~/.cache."""
    cache = tmp_path / "gali-cache"
    monkeypatch.setenv("GALI_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every attempt to open a network connection fail."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits written once at 16×16 for the whole session."""
    return prepare_digits(tmp_path_factory.mktemp("digits") / "digits-16", resolution=16)


def solid_color(index: int) -> tuple[int, int, int]:
    """A color that encodes ``index`` (< 65536) and that decoding recovers exactly."""
    return (index % 256, index // 256, 200)


@pytest.fixture
def id_folder(tmp_path: Path) -> Callable[..., Path]:
    """Make a folder of R×R PNGs, each a solid color that encodes its index (``solid_color``).

    ``classes`` maps class folder names to image counts; ``None`` writes ``n`` images directly in
    the folder. Indices run across classes in the order given.
    """

    def make(name: str = "ids", *, classes: dict[str, int] | None = None, n: int = 0, resolution: int = 8) -> Path:
        root = tmp_path / name
        layout = classes if classes is not None else {"": n}
        index = 0
        for cls, count in layout.items():
            folder = root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                Image.new("RGB", (resolution, resolution), solid_color(index)).save(folder / f"{index:05d}.png")
                index += 1
        return root

    return make
