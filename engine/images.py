"""Image grids (samples, reconstruction chains, inpainting) as PNG, and the reconstruction error.

Grids are tiled on the host into (H, W, 3) uint8 arrays by :func:`tile`, so the same array can be
written as a PNG and handed to TensorBoard without a second device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from gali.engine.metrics import pixel_mse
from gali.kernels.mask_composite import MaskComposite, mask_composite, sample_box_params

# Evaluation boxes of GALI.md §5 item 6: sides 8..54 on 64x64 images, fully inside the image.
EVAL_MASK_MIN, EVAL_MASK_MAX, EVAL_MASK_RESOLUTION = 8, 54, 64


def tile(images: Tensor, *, columns: int) -> np.ndarray:
    """Tile (N, 3, H, W) images in [-1, 1] into one (rows·H, columns·W, 3) uint8 array, row-major."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = image.permute(1, 2, 0).numpy()
    return canvas


def save_png(canvas: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG atomically, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)
    return path


def save_grid(images: Tensor, path: str | Path, *, columns: int) -> Path:
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, ``columns`` per row; written atomically."""
    return save_png(tile(images, columns=columns), path)


@torch.no_grad()
def reconstruction_chain(G: nn.Module, E: nn.Module, x: Tensor, depth: int = 2) -> list[Tensor]:
    """[x, G(μ_E(x)), G(μ_E(G(μ_E(x)))), ...] with E and G in eval mode and z = μ (GALI.md §3.1)."""
    was_training = G.training, E.training
    G.eval()
    E.eval()
    chain = [x]
    for _ in range(depth):
        mu, _ = E(chain[-1])
        chain.append(G(mu))
    G.train(was_training[0])
    E.train(was_training[1])
    return chain


def reconstruction_grid(G: nn.Module, E: nn.Module, x: Tensor) -> np.ndarray:
    """Rows x, G(E(x)), G(E(G(E(x)))), one column per image of ``x``."""
    return tile(torch.cat(reconstruction_chain(G, E, x)), columns=x.shape[0])


def save_reconstruction_grid(G: nn.Module, E: nn.Module, x: Tensor, path: str | Path) -> Path:
    """Rows of x, G(E(x)), G(E(G(E(x)))) for the given images."""
    return save_png(reconstruction_grid(G, E, x), path)


def evaluation_box_params(n: int, resolution: int, *, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` fixed evaluation boxes, int32 (n, 4) ``[top, left, h, w]``, the same for every call with ``seed``.

    Sides are uniform on 8..54 scaled to the resolution (54/64·R) and every box lies fully inside
    the image (GALI.md §5 item 6). Drawn on the CPU from a seeded generator, so the boxes do not
    depend on the device or on the training RNG, and moved to ``device``.
    """
    min_size = max(1, round(EVAL_MASK_MIN * resolution / EVAL_MASK_RESOLUTION))
    max_size = max(min_size, round(EVAL_MASK_MAX * resolution / EVAL_MASK_RESOLUTION))
    generator = torch.Generator().manual_seed(seed)
    params = sample_box_params(n, resolution, resolution, min_size=min_size, max_size=max_size, generator=generator)
    return params.to(device)


def inpainting_grid(G: nn.Module, E: nn.Module, x: Tensor, params: Tensor, *, fill: float = -2.0,
                    impl: str = "auto") -> np.ndarray:
    """Rows x, masked x, G(μ_E(masked x)) and the composite (x outside the box, the inpainting inside).

    ``params`` are box parameters, one row per image (see :func:`evaluation_box_params`); ``fill`` is
    the value the encoder sees in masked pixels (shown black in the grid). The composite is the
    inpainted image that GALI.md §4 evaluates.
    """
    masked, inpainted, composite = inpaint(G, E, x, params, fill=fill, impl=impl)
    return tile(torch.cat([x, masked.masked, inpainted, composite]), columns=x.shape[0])


def inpaint(G: nn.Module, E: nn.Module, x: Tensor, params: Tensor, *, fill: float = -2.0,
            impl: str = "auto") -> tuple[MaskComposite, Tensor, Tensor]:
    """The inpainting chain: (the masked input with its mask, G(μ_E(masked x)), the composite).

    The composite keeps x outside each box and takes the inpainting inside it.
    """
    masked = mask_composite(x, params, fill=fill, impl=impl)
    inpainted = reconstruction_chain(G, E, masked.masked, depth=1)[1]
    return masked, inpainted, mask_composite(x, params, y=inpainted, fill=fill, impl=impl).mix


@torch.no_grad()
def sample_images(G: nn.Module, z: Tensor) -> Tensor:
    """G(z) in eval mode."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def reconstruction_mse(G: nn.Module, E: nn.Module, batches: Iterable[Tensor]) -> float:
    """Pixel MSE of x̂ = G(μ_E(x)) in [0, 1] space, averaged over images (GALI.md §4.1)."""
    total, count = 0.0, 0
    for x in batches:
        x_hat = reconstruction_chain(G, E, x, depth=1)[1]
        total += pixel_mse(x, x_hat) * x.shape[0]  # the batch's mean, weighted by its images
        count += x.shape[0]
    return total / count
