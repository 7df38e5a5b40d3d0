"""Image grids written as PNG (samples, reconstruction chains), and the reconstruction error."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn


def save_grid(images: Tensor, path: str | Path, *, columns: int) -> Path:
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG, ``columns`` per row; written atomically."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = image.permute(1, 2, 0).numpy()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)
    return path


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


def save_reconstruction_grid(G: nn.Module, E: nn.Module, x: Tensor, path: str | Path) -> Path:
    """Rows of x, G(E(x)), G(E(G(E(x)))) for the given images."""
    chain = reconstruction_chain(G, E, x)
    return save_grid(torch.cat(chain), path, columns=x.shape[0])


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
        # [-1,1] -> [0,1] scales differences by 1/2, squared errors by 1/4
        total += ((x_hat.float() - x.float()) ** 2).mean(dim=(1, 2, 3)).sum().item() / 4
        count += x.shape[0]
    return total / count
