"""Benchmark mask_composite, forward + backward: the Triton op, its reference twin, and the authors' style.

Run: ``pytest bench/test_mask_composite.py`` (add ``--benchmark-json=FILE`` to keep the numbers).

Implementations:
- ``triton``: the fused op (one forward kernel, one backward kernel);
- ``ref``: the plain-PyTorch twin (vectorised mask from index grids, autograd backward);
- ``loop``: the authors' structure, box masks only: a host-side loop over the batch writes each sample's
  box into a zero mask by slicing (a host sync to read the parameters), then the composites are
  elementwise arithmetic on the mask.

Shapes: on CUDA the GALI-mix CelebA batch (256×3×64×64), an ImageNet-resolution batch (64×3×256×256)
and a large batch (256×3×256×256) where launch overhead no longer hides the bandwidth; fp32 and bf16.
On CPU the Triton kernels run in the interpreter, so the shapes are tiny and only fp32: those numbers
check that the benchmark runs, not speed.

Modes: ``eager`` times the Python calls (forward, ``torch.autograd.grad``, sync), so at these sizes it
mostly measures host overhead (custom-op dispatch, autograd, launches); ``graph`` (CUDA only, not for
``loop``, whose host loop cannot be captured) captures forward + backward in a CUDA graph, as the
engine's graphed step does, and times replay + sync: that is the kernels' achieved bandwidth. At
256×3×64×64 a graph's working set partly stays in the 50 MB L2 between replays, so GB/s can exceed HBM.

Bytes counted per timed call (N = B·C·H·W elements of e bytes; what a perfect single pass moves):
forward reads x, y, noise and writes mask (N/C), masked and mix: (5 + 1/C)·N·e; backward reads
g_masked, g_mix and writes grad_x, grad_y: 4·N·e; plus 16 or 20·S bytes of parameters per sample.
``extra_info["GB/s"]`` is that count over the median time (the same count for every impl, so the
ratio between impls is their speed ratio); ``extra_info["bytes"]`` records the count. Each timed call
synchronises CUDA before returning.
"""

import pytest
import torch

from gali.kernels.mask_composite import (
    MaskComposite,
    mask_composite,
    mask_composite_ref,
    sample_box_params,
    sample_stroke_params,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = [(256, 3, 64, 64), (64, 3, 256, 256), (256, 3, 256, 256)] if CUDA else [(4, 3, 16, 16)]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
FILL, NOISE_STD = -2.0, 0.1


def _loop(x, params, y, *, kind, fill, noise, noise_std) -> MaskComposite:
    """The authors' structure: a per-sample Python loop builds the mask by slicing."""
    batch, _, height, width = x.shape
    mask = torch.zeros((batch, 1, height, width), dtype=x.dtype, device=x.device)
    for i, (top, left, box_h, box_w) in enumerate(params.tolist()):
        mask[i, :, top : top + box_h, left : left + box_w] = 1
    masked = x * (1 - mask) + fill * mask
    mix = x * (1 - mask) + y * mask + noise_std * noise
    return MaskComposite(mask, masked, mix)


IMPLS = {
    "triton": lambda *a, **kw: mask_composite(*a, **kw, impl="triton"),
    "ref": mask_composite_ref,
    "loop": _loop,
}


def _bytes(shape: tuple[int, ...], dtype: torch.dtype, params: torch.Tensor) -> int:
    """Bytes moved by forward + backward; the parameters (a dense kind's masks) are read by both."""
    batch, channels, height, width = shape
    n, e = batch * channels * height * width, torch.tensor([], dtype=dtype).element_size()
    return (5 * n + n // channels) * e + 4 * n * e + 2 * params.numel() * params.element_size()


@pytest.mark.parametrize("mode", ["eager", "graph"] if CUDA else ["eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["box", "stroke", "dense"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_mask_composite(benchmark, cuda_graphed, impl, kind, dtype, shape, mode):
    if impl == "loop" and kind != "box":
        pytest.skip("the authors' code has box masks only")
    if impl == "loop" and mode == "graph":
        pytest.skip("the per-sample loop reads the parameters on the host: not capturable")
    batch, _, height, width = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    if kind == "stroke":
        params = sample_stroke_params(batch, height, width, generator=g)
    else:
        params = sample_box_params(batch, height, width, generator=g)
    if kind == "dense":  # a pipeline's masks, read from memory: the same boxes as bytes
        params = mask_composite_ref(torch.zeros(batch, 1, height, width, device=DEVICE), params).mask[:, 0].byte()
    x, y, noise, g_masked, g_mix = (torch.randn(shape, generator=g, device=DEVICE).to(dtype) for _ in range(5))
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = IMPLS[impl]

    def forward_backward():
        out = fn(x, params, y, kind=kind, fill=FILL, noise=noise, noise_std=NOISE_STD)
        return torch.autograd.grad([out.masked, out.mix], [x, y], [g_masked, g_mix])

    run = forward_backward
    if mode == "graph":
        run = cuda_graphed(forward_backward)

    def step():
        run()
        if CUDA:
            torch.cuda.synchronize()

    step()  # compile / warm up outside the timing
    benchmark(step)
    moved = _bytes(shape, dtype, params)
    benchmark.extra_info["bytes"] = moved
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)"
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9
