"""Image grids of a run (samples, reconstruction chains, inpainting) as PNG files.

Grids are tiled on the host into (H, W, 3) uint8 arrays by :func:`tile`, so the same array can be
written as a PNG and handed to TensorBoard without a second device-to-host copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from gali.engine.files import atomic_write
from gali.engine.nets.inference import inpaint, reconstruction_chain


def tile(images: Tensor, *, columns: int) -> np.ndarray:
    """Tile (N, 3, H, W) images in [-1, 1] into one (rows·H, columns·W, 3) uint8 array, row-major."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = image.permute(1, 2, 0).numpy()
    return canvas


def save_image(canvas: np.ndarray, path: str | Path, image_format: str = "PNG") -> Path:
    """Write an (H, W, 3) uint8 array atomically (a reader never sees half a file), in ``image_format`` (a Pillow
    format name; JPEG at quality 95 without chroma subsampling)."""
    options = {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {}
    return atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format=image_format, **options))


def reconstruction_grid(G: nn.Module, E: nn.Module, x: Tensor, labels: Tensor | None = None) -> np.ndarray:
    """Rows x, G(E(x)), G(E(G(E(x)))), one column per image of ``x`` (``labels``: x's, for a conditional G)."""
    return tile(torch.cat(reconstruction_chain(G, E, x, labels=labels)), columns=x.shape[0])


def inpainting_grid(
    G: nn.Module,
    E: nn.Module,
    x: Tensor,
    params: Tensor,
    *,
    fill: float = -2.0,
    impl: str = "auto",
    labels: Tensor | None = None,
) -> np.ndarray:
    """Rows x, masked x, G(μ_E(masked x)) and the composite (x outside the box, the inpainting inside).

    ``params`` are box parameters, one row per image (see
    :func:`gali.engine.nets.inference.evaluation_box_params`); ``fill`` is the value the encoder sees in
    masked pixels (shown black in the grid). The composite is the inpainted image that docs/method.md §4 evaluates.
    """
    masked, inpainted, composite = inpaint(G, E, x, params, fill=fill, impl=impl, labels=labels)
    return tile(torch.cat([x, masked.masked, inpainted, composite]), columns=x.shape[0])
