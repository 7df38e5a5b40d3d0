"""Fixtures of the pipeline tests: an isolated cache, no network, small image folders, images of every mode."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def png_file(pixels: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    """A PNG of ``pixels`` ((H, W) or (H, W, C) values) written chunk by chunk, unfiltered: for the layouts
    Pillow cannot write (16-bit RGB, RGBA and gray+alpha). ``color_type``: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    a = np.asarray(pixels)
    height, width = a.shape[:2]
    sample = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + a[y].astype(sample).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def saved(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class ModeImage:
    """A small square image file that Pillow opens in ``mode``, and the 8-bit RGB (H, W, 3) each backend
    must decode it to (``torch``: the torch backend, ``dali``: DALI's CPU decoder).

    ``gray16_as`` is how Pillow opens a 16-bit grayscale PNG for this case: (mode, raw mode) as
    ``PngImagePlugin._MODES[(16, 0)]`` (older Pillow releases opened it as 'I'); None leaves Pillow's own.
    """

    mode: str
    name: str
    data: bytes
    torch: np.ndarray
    dali: np.ndarray
    gray16_as: tuple[str, str] | None = None

    @property
    def size(self) -> int:
        return self.torch.shape[0]


SIDE = 8
# 16-bit values where the high byte (v >> 8) and DALI's round(v / 257) differ, or round near a half, and more.
TRICKY16 = [
    0,
    1,
    127,
    128,
    129,
    255,
    256,
    383,
    384,
    385,
    32767,
    32768,
    32895,
    32896,
    65279,
    65280,
    65407,
    65408,
    65535,
    40000,
    257,
    514,
    771,
    1000,
]


def values16(seed: int) -> np.ndarray:
    """SIDE×SIDE uint16 values: ``TRICKY16`` and then random ones."""
    rest = np.random.default_rng(seed).integers(0, 65536, SIDE * SIDE - len(TRICKY16))
    return np.concatenate([TRICKY16, rest]).astype(np.uint16).reshape(SIDE, SIDE)


def values8(seed: int, channels: int) -> np.ndarray:
    """SIDE×SIDE×channels uint8 values, 0 and 255 among them."""
    a = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, channels), dtype=np.uint8)
    a[0, 0], a[0, 1] = 0, 255
    return a


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2).astype(np.uint8)


def dali16(v: np.ndarray) -> np.ndarray:
    """DALI's 8-bit value of 16-bit samples: round(v / 257) (measured on DALI 2.4's CPU decoder)."""
    return np.rint(v / 257.0).astype(np.uint8)


def high_byte(v: np.ndarray) -> np.ndarray:
    return (v >> 8).astype(np.uint8)


def mode_images() -> dict[str, ModeImage]:
    """One ``ModeImage`` per mode, keyed by a test id."""
    cases: list[ModeImage] = []
    gray16 = values16(0)
    for mode, raw in (("I;16", None), ("I;16B", ("I;16B", "I;16B")), ("I", ("I", "I;16B"))):
        expected = rgb(dali16(gray16))  # exactly DALI's
        cases.append(ModeImage(mode, "gray16.png", saved(Image.fromarray(gray16), "PNG"), expected, expected, raw))
    color16 = np.stack([values16(1), values16(2), values16(3)], axis=-1)
    alpha16 = values16(4)
    # Pillow hands 16-bit color (and gray+alpha) over as 8-bit, the high byte: one level from DALI's at most.
    for mode, name, pixels, color_type, colors in (
        ("RGB", "rgb16.png", color16, 2, color16),
        ("RGBA", "rgba16.png", np.concatenate([color16, alpha16[:, :, None]], -1), 6, color16),
        ("RGBA", "la16.png", np.stack([gray16, alpha16], -1), 4, np.repeat(gray16[:, :, None], 3, axis=2)),
    ):
        data = png_file(pixels, color_type, 16)
        cases.append(ModeImage(mode, name, data, high_byte(colors), dali16(colors)))

    palette = values8(5, 3).reshape(-1, 3)[:16]
    index = (np.arange(SIDE * SIDE) * 7 % 16).astype(np.uint8).reshape(SIDE, SIDE)
    image = Image.frombytes("P", (SIDE, SIDE), index.tobytes())
    image.putpalette(palette.tobytes())
    cases.append(ModeImage("P", "palette.png", saved(image, "PNG"), palette[index], palette[index]))
    transparency = bytes([0, 128, 255, 7] * 4)  # alpha of palette entries 0..15: dropped
    data = saved(image, "PNG", transparency=transparency)
    cases.append(ModeImage("P", "palette-transparent.png", data, palette[index], palette[index]))

    # CMYK: 8×8 blocks of one color each (JPEG at quality 100 keeps them exactly), colors where DALI's
    # rounding down and Pillow's rounding to nearest differ.
    cmyk_colors = np.array(
        [
            [100, 50, 25, 10],
            [200, 200, 200, 200],
            [30, 60, 90, 120],
            [0, 0, 0, 0],
            [255, 0, 0, 0],
            [0, 0, 0, 255],
            [1, 2, 3, 4],
            [128, 64, 32, 16],
        ],
        np.uint8,
    )
    blocks = cmyk_colors[[[0, 1, 2, 3], [4, 5, 6, 7], [7, 6, 5, 4], [3, 2, 1, 0]]]  # (4, 4, 4): 4×4 blocks
    cmyk = blocks.repeat(8, 0).repeat(8, 1)  # 32×32
    ink = 255 - cmyk.astype(np.int64)
    expected = (ink[:, :, :3] * ink[:, :, 3:] // 255).astype(np.uint8)  # (255 - C)(255 - K) / 255, rounded down
    data = saved(Image.frombytes("CMYK", (32, 32), cmyk.tobytes()), "JPEG", quality=100)
    cases.append(ModeImage("CMYK", "cmyk.jpg", data, expected, expected))

    gray, alpha = values8(6, 1)[:, :, 0], values8(7, 1)[:, :, 0]
    cases.append(ModeImage("L", "gray.png", saved(Image.fromarray(gray), "PNG"), rgb(gray), rgb(gray)))
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    cases.append(ModeImage("LA", "gray-alpha.png", saved(la, "PNG"), rgb(gray), rgb(gray)))  # alpha dropped
    color = values8(8, 3)
    rgba = Image.merge("RGBA", [*Image.fromarray(color).split(), Image.fromarray(alpha)])
    cases.append(ModeImage("RGBA", "rgba.png", saved(rgba, "PNG"), color, color))  # the colors as stored
    bits = gray >= 128
    cases.append(ModeImage("1", "bilevel.png", saved(Image.fromarray(bits), "PNG"), rgb(bits * 255), rgb(bits * 255)))
    keys = [
        "I;16",
        "I;16B",
        "I",
        "RGB-16bit",
        "RGBA-16bit",
        "LA-16bit",
        "P",
        "P-transparency",
        "CMYK",
        "L",
        "LA",
        "RGBA",
        "1",
    ]
    return dict(zip(keys, cases, strict=True))
