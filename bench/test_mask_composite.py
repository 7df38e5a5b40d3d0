"""Benchmark mask_composite, forward + backward: the Triton op, its reference twin, and the authors' style.

Run: ``pytest bench/test_mask_composite.py`` (``--benchmark-json=FILE`` keeps the numbers).
impl: ``triton`` (the fused op), ``ref`` (its plain-PyTorch twin), ``loop`` (the authors' per-sample host loop, boxes
only). mode: ``eager`` (the Python calls: mostly host overhead) or ``graph`` (a CUDA graph of forward + backward
replayed: the kernels' bandwidth; CUDA only, not ``loop``).
Shapes: on CUDA 256×3×64×64 (GALI-mix CelebA; L2 may hold it, so GB/s can exceed HBM), 64×3×256×256 and 256×3×256×256,
fp32 and bf16; on CPU tiny fp32 shapes in the interpreter. ``extra_info["GB/s"]``: a perfect single pass's bytes, the
same for every impl, over the median: (5 + 1/C)·N·e forward, 4·N·e backward (N = B·C·H·W elements of e bytes), 16 or
20·S bytes of parameters per sample (``extra_info["bytes"]``).
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
