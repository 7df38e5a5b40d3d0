"""Inference chains of trained networks, in eval mode: sampling, reconstruction and inpainting.

Reconstructions use z = μ_E(x) (docs/method.md §3.1); inpainting masks are the fixed evaluation boxes
of docs/method.md §5 item 5, the same for every call with one seed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from gali.engine.nets.feature_models import resize_to
from gali.kernels.mask_composite import MaskComposite, mask_composite, sample_box_params
from gali.pipelines.masks import eval_box_range


@torch.no_grad()
def sample_images(G: nn.Module, z: Tensor, labels: Tensor | None = None) -> Tensor:
    """G(z) in eval mode (G(z, labels) for a class-conditional G; others ignore the labels)."""
    was_training = G.training
    G.eval()
    images = G(z, labels)
    G.train(was_training)
    return images


@torch.no_grad()
def encode(E: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """E's (μ, log σ) of x in eval mode."""
    was_training = E.training
    E.eval()
    mu, log_sigma = E(x)
    E.train(was_training)
    return mu, log_sigma


@torch.no_grad()
def reconstruction_chain(
    G: nn.Module, E: nn.Module, x: Tensor, depth: int = 2, labels: Tensor | None = None
) -> list[Tensor]:
    """[x, G(μ_E(x)), G(μ_E(G(μ_E(x)))), ...] with E and G in eval mode and z = μ (docs/method.md §3.1).

    E encodes x as given; the first entry is x at G's resolution (:func:`resize_to`, a no-op unless E sees
    more pixels than G draws), so every entry can be compared with every other. ``labels``: x's, for a
    class-conditional G.
    """
    chain = [x]
    for _ in range(depth):
        chain.append(sample_images(G, encode(E, chain[-1])[0], labels))
    chain[0] = resize_to(x, chain[1].shape[-1])
    return chain


def encoding_stats(mu: Tensor, log_sigma: Tensor) -> dict[str, Tensor]:
    """Whether E encodes, from its outputs for a batch of images: two 0-d tensors, no host sync.

    ``e_sigma`` is the mean of σ = exp(log σ) over images and latent dimensions (the prior's is 1;
    an encoder that carries information about x shrinks it); ``e_mu_spread`` is the std of μ over
    the images, averaged over latent dimensions (an encoder whose μ barely moves with x maps every
    image to about the same code, whatever its σ).
    """
    return {"e_sigma": log_sigma.detach().float().exp().mean(), "e_mu_spread": mu.detach().float().std(dim=0).mean()}


@torch.no_grad()
def recalibrate_batch_norm(G: nn.Module, E: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]]) -> int:
    """Recompute E's and G's BatchNorm running statistics on real data: E on x, G on μ_E(x) (and x's labels,
    for a class-conditional G), from (x, labels) ``batches``.

    During training E's statistics average over every image it was called on (under GALI-4 mostly
    generated ones: x, G(E(x)) and G(z) each step) and G's over its inputs E(x) and z ~ N(0, I);
    evaluation feeds E real images and G codes μ_E(x) only. The statistics are reset and replaced by
    the plain average over ``batches`` (momentum None), in train mode; the weights are untouched and
    both networks are left in eval mode. Returns the number of images used; with no batches the
    statistics are left as they were and ValueError is raised.
    """
    norms = [m for net in (E, G) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    saved = [b.clone() for m in norms for b in m.buffers()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    E.train()
    G.train()
    images = 0
    for x, labels in batches:
        G(E(x)[0], labels)
        images += x.shape[0]
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    E.eval()
    G.eval()
    if not images:
        for buffer, value in zip((b for m in norms for b in m.buffers()), saved, strict=True):
            buffer.copy_(value)
        raise ValueError("recalibrate_batch_norm: no batches were given")
    return images


def evaluation_box_params(n: int, resolution: int, *, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """``n`` fixed evaluation boxes, int32 (n, 4) ``[top, left, h, w]``, the same for every call with ``seed``.

    Sides are uniform on 8..54 scaled to the resolution (54/64·R) and every box lies fully inside
    the image (docs/method.md §5 item 5). Drawn on the CPU from a seeded generator, so the boxes do not
    depend on the device or on the training RNG, and moved to ``device``.
    """
    min_size, max_size = eval_box_range(resolution)
    generator = torch.Generator().manual_seed(seed)
    params = sample_box_params(n, resolution, resolution, min_size=min_size, max_size=max_size, generator=generator)
    return params.to(device)


def inpaint(
    G: nn.Module,
    E: nn.Module,
    x: Tensor,
    params: Tensor,
    *,
    kind: str = "box",
    fill: float = -2.0,
    impl: str = "auto",
    labels: Tensor | None = None,
) -> tuple[MaskComposite, Tensor, Tensor]:
    """The inpainting chain: (the masked input with its mask, G(μ_E(masked x)), the composite).

    ``params`` are boxes (``kind='box'``) or given masks (``'dense'``, a pipeline's); the composite keeps x
    outside each mask and takes the inpainting inside it. ``labels``: x's, for a class-conditional G.
    """
    masked = mask_composite(x, params, kind=kind, fill=fill, impl=impl)
    inpainted = reconstruction_chain(G, E, masked.masked, depth=1, labels=labels)[1]
    return masked, inpainted, mask_composite(x, params, y=inpainted, kind=kind, fill=fill, impl=impl).mix
