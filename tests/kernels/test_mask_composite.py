"""mask_composite: Triton kernel vs its reference twin (forward and every gradient), and the samplers.

On a CPU-only machine the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before anything imports triton); with a CUDA device the same tests run there.

Tolerances: masks and the selections x / y / fill are exact in every dtype. Arithmetic (the noise add,
the gradient sum g_masked + g_mix) is fp32 rounded once to the output dtype on both paths, so the
paths agree to fp32 rounding in fp32 (1e-6) and to one unit in the last place of bf16/fp16 (GPU FMA
contraction may round differently from the reference's separate multiply and add).
"""

import math

import numpy as np
import pytest
import torch

from gali.kernels import _launch
from gali.kernels.mask_composite import (
    MaskComposite,
    mask_composite,
    mask_composite_ref,
    sample_box_params,
    sample_stroke_params,
)

pytestmark = pytest.mark.numerics  # parity of twins: run again under a second CPU kernel path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float32:
        return {"atol": 1e-6, "rtol": 1e-6}
    eps = torch.finfo(dtype).eps
    return {"atol": eps, "rtol": eps}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _params(kind: str, n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    if kind == "box":
        return sample_box_params(n, h, w, generator=_gen(seed))
    strokes = sample_stroke_params(n, h, w, num_strokes=3, max_thickness=4, generator=_gen(seed))
    if kind == "dense":  # a given mask: the strokes' pixels, as a pipeline would hand them over
        return mask_composite_ref(torch.zeros(n, 1, h, w, device=DEVICE), strokes, kind="stroke").mask[:, 0].byte()
    return strokes


def _inputs(shape, dtype, seed=0, grad=True):
    g = _gen(seed)
    x, y, noise = (torch.randn(shape, generator=g, device=DEVICE).to(dtype) for _ in range(3))
    return x.requires_grad_(grad), y.requires_grad_(grad), noise


def _both(x, params, y=None, **kw) -> tuple[MaskComposite, MaskComposite]:
    return mask_composite(x, params, y, impl="triton", **kw), mask_composite_ref(x, params, y, **kw)


# --------------------------------------------------------------------------------------------------
# Kernel vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["box", "stroke", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3, 7, 9), (1, 2, 5, 4)], ids=["odd", "batch1"])
def test_forward_and_gradients_match_ref(kind, dtype, shape):
    x, y, noise = _inputs(shape, dtype)
    params = _params(kind, shape[0], shape[2], shape[3])
    out, ref = _both(x, params, y, kind=kind, noise=noise, noise_std=0.3)
    assert out.mask.dtype == out.masked.dtype == out.mix.dtype == dtype
    assert out.mask.shape == (shape[0], 1, *shape[2:])
    assert torch.equal(out.mask, ref.mask)
    assert torch.equal(out.masked, ref.masked)
    torch.testing.assert_close(out.mix, ref.mix, **_tol(dtype))
    assert not out.mask.requires_grad

    g_masked, g_mix = torch.randn_like(x), torch.randn_like(x)
    grads = torch.autograd.grad([out.masked, out.mix], [x, y], [g_masked, g_mix])
    grads_ref = torch.autograd.grad([ref.masked, ref.mix], [x, y], [g_masked, g_mix])
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))


CL = torch.channels_last


@pytest.mark.parametrize("kind", ["box", "stroke", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "layouts"),
    [
        ((3, 3, 7, 9), "all"),  # compute.channels_last: x, y, noise and the gradients channels-last
        ((2, 4, 5, 6), "all"),  # C a power of two: no padded channel in the tile
        ((2, 3, 6, 5), "mixed"),  # x channels-last, y, noise and g_mix NCHW: copied into x's (g_masked's) layout
        ((2, 1, 5, 7), "all"),  # one channel: both layouts are one
    ],
    ids=["odd", "c4", "mixed", "c1"],
)
def test_channels_last_is_read_and_written_in_place_and_matches_ref(kind, dtype, shape, layouts):
    x, y, noise = _inputs(shape, dtype)
    with torch.no_grad():
        x = x.contiguous(memory_format=CL).requires_grad_()
        if layouts == "all":
            y, noise = y.contiguous(memory_format=CL).requires_grad_(), noise.contiguous(memory_format=CL)
    params = _params(kind, shape[0], shape[2], shape[3])
    out, ref = _both(x, params, y, kind=kind, noise=noise, noise_std=0.3)
    for name, value in (("masked", out.masked), ("mix", out.mix)):
        assert value.is_contiguous(memory_format=CL), (name, value.stride())  # the output keeps x's layout
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.masked, ref.masked)
    torch.testing.assert_close(out.mix, ref.mix, **_tol(dtype))

    g_masked = torch.randn_like(x).contiguous(memory_format=CL)
    g_mix = torch.randn_like(x).contiguous(memory_format=CL if layouts == "all" else torch.contiguous_format)
    grads = torch.autograd.grad([out.masked, out.mix], [x, y], [g_masked, g_mix])
    grads_ref = torch.autograd.grad([ref.masked, ref.mix], [x, y], [g_masked, g_mix])
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **_tol(dtype))
        assert got.is_contiguous(memory_format=CL), got.stride()  # in the incoming gradient's layout


def test_channels_last_tiles_fit_the_nchw_block():
    """The launcher's channels-last tile holds as many elements as the NCHW block (2048 at most), the channels padded
    to a power of two."""
    from gali.kernels.mask_composite import _launch_config, _layout, _tile

    x = torch.zeros(2, 3, 64, 64)
    assert _layout(x) == torch.contiguous_format and _layout(x.contiguous(memory_format=CL)) == CL
    assert _layout(torch.zeros(2, 1, 8, 8).contiguous(memory_format=CL)) == torch.contiguous_format  # one channel
    assert _layout(x[:, :, ::2]) == torch.contiguous_format  # neither layout: copied, as before
    tile = _tile(CL, 3)
    assert tile == {"CHANNELS_LAST": True, "C_BLOCK": 4} and _launch_config(64 * 64, 4) == (512, 4)
    assert _tile(torch.contiguous_format, 3) == {"CHANNELS_LAST": False, "C_BLOCK": 1}
    assert _launch_config(64 * 64) == (2048, 4) and _launch_config(7 * 9, 4) == (64, 2)


@pytest.mark.parametrize("kind", ["box", "stroke"])
def test_ref_gradients_follow_the_formula(kind):
    x, y, _ = _inputs((2, 3, 6, 5), torch.float32)
    params = _params(kind, 2, 6, 5)
    ref = mask_composite_ref(x, params, y, kind=kind)
    g_masked, g_mix = torch.randn_like(x), torch.randn_like(x)
    grad_x, grad_y = torch.autograd.grad([ref.masked, ref.mix], [x, y], [g_masked, g_mix])
    m = ref.mask
    torch.testing.assert_close(grad_x, g_masked * (1 - m) + g_mix * (1 - m))
    torch.testing.assert_close(grad_y, g_mix * m)


@pytest.mark.parametrize("used", ["masked", "mix"])
def test_gradient_of_one_output_and_one_input(used):
    """An unused output sends no gradient; an input that needs none gets none."""
    x, y, _ = _inputs((2, 3, 5, 7), torch.float32)
    y.requires_grad_(False)
    params = _params("box", 2, 5, 7)
    out, ref = _both(x, params, y)
    g = torch.randn_like(x)
    (got,) = torch.autograd.grad(getattr(out, used), x, g)
    (want,) = torch.autograd.grad(getattr(ref, used), x, g)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert y.grad is None


@pytest.mark.parametrize("kind", ["box", "stroke", "dense"])
def test_without_y(kind):
    x, _, _ = _inputs((2, 3, 5, 6), torch.bfloat16)
    params = _params(kind, 2, 5, 6)
    out, ref = _both(x, params, kind=kind, fill=-3.0)
    assert out.mix is None and ref.mix is None
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.masked, ref.masked)
    g = torch.randn_like(x)
    (got,) = torch.autograd.grad(out.masked, x, g)
    (want,) = torch.autograd.grad(ref.masked, x, g)
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("kind", ["box", "stroke", "dense"])
def test_outside_is_x_inside_is_fill_or_y(impl, kind):
    x, y, noise = _inputs((3, 2, 9, 7), torch.float32, grad=False)
    params = _params(kind, 3, 9, 7, seed=1)
    out = mask_composite(x, params, y, kind=kind, fill=-2.0, impl=impl)
    m = out.mask.bool().expand_as(x)
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.masked[~m], x[~m]) and torch.equal(out.mix[~m], x[~m])
    assert bool((out.masked[m] == -2.0).all()) and torch.equal(out.mix[m], y[m])
    noisy = mask_composite(x, params, y, kind=kind, noise=noise, noise_std=0.25, impl=impl)
    torch.testing.assert_close(noisy.mix, out.mix + 0.25 * noise, atol=1e-6, rtol=1e-6)
    assert torch.equal(noisy.masked, out.masked)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("shape", ["BHW", "B1HW"])
def test_dense_kind_reads_the_given_mask(impl, shape):
    """A dense mask drawn from box parameters gives the box kind's outputs exactly, bool or uint8."""
    x, y, _ = _inputs((3, 2, 6, 7), torch.float32, grad=False)
    boxes = _params("box", 3, 6, 7, seed=2)
    box = mask_composite(x, boxes, y, kind="box", impl=impl)
    dense = box.mask.bool() if shape == "B1HW" else box.mask[:, 0].byte()
    out = mask_composite(x, dense, y, kind="dense", impl=impl)
    assert torch.equal(out.mask, box.mask) and torch.equal(out.masked, box.masked) and torch.equal(out.mix, box.mix)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_noise_std_tensor_equals_float(impl):
    x, y, noise = _inputs((2, 3, 4, 4), torch.float32, grad=False)
    params = _params("stroke", 2, 4, 4)
    as_float = mask_composite(x, params, y, kind="stroke", noise=noise, noise_std=0.1, impl=impl)
    std = torch.tensor(0.1, device=DEVICE)
    as_tensor = mask_composite(x, params, y, kind="stroke", noise=noise, noise_std=std, impl=impl)
    assert torch.equal(as_float.mix, as_tensor.mix)


def test_box_masks_exact_rectangles():
    params = torch.tensor([[0, 0, 1, 1], [2, 1, 3, 4], [0, 0, 5, 6], [3, 4, 9, 9]], dtype=torch.int32, device=DEVICE)
    x = torch.zeros(4, 1, 5, 6, device=DEVICE)
    want = torch.zeros(4, 1, 5, 6, device=DEVICE)
    want[0, 0, 0, 0] = 1
    want[1, 0, 2:5, 1:5] = 1
    want[2] = 1
    want[3, 0, 3:, 4:] = 1  # a box reaching outside the image is clipped to it
    for impl in ("triton", "ref"):
        assert torch.equal(mask_composite(x, params, impl=impl).mask, want)
    int64 = mask_composite(x, params.long(), impl="triton").mask  # any integer dtype is accepted
    assert torch.equal(int64, want)


def _stroke_mask_bruteforce(params: np.ndarray, h: int, w: int) -> np.ndarray:
    """Distance from every pixel centre to every segment by projection, float64 (the textbook way)."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    mask = np.zeros((params.shape[0], h, w), dtype=bool)
    for i, strokes in enumerate(params.astype(np.float64)):
        for x0, y0, x1, y1, r in strokes:
            ex, ey = x1 - x0, y1 - y0
            length2 = ex * ex + ey * ey
            t = np.zeros_like(cols) if length2 == 0 else ((cols - x0) * ex + (rows - y0) * ey) / length2
            t = np.clip(t, 0.0, 1.0)
            dist2 = (cols - x0 - t * ex) ** 2 + (rows - y0 - t * ey) ** 2
            # Integer endpoints and half-integer radii put every non-boundary distance at least
            # 1e-6 away from r², far above float64 rounding, so this margin only settles ties.
            mask[i] |= dist2 <= r * r + 1e-9
    return mask


@pytest.mark.parametrize(("h", "w", "thickness"), [(13, 11, 5), (96, 80, 12)])
def test_stroke_masks_match_point_to_segment_distances(h, w, thickness):
    params = sample_stroke_params(16, h, w, num_strokes=3, max_thickness=thickness, generator=_gen(3))
    want = torch.from_numpy(_stroke_mask_bruteforce(params.cpu().numpy(), h, w)).to(DEVICE)
    x = torch.zeros(16, 1, h, w, device=DEVICE)
    for impl in ("triton", "ref"):
        assert torch.equal(mask_composite(x, params, kind="stroke", impl=impl).mask[:, 0].bool(), want)


def test_stroke_mask_shapes():
    h, w = 13, 11
    x = torch.zeros(1, 1, h, w, device=DEVICE)
    # A horizontal stroke of thickness 1 covers exactly its own pixels; a point stroke is a disc.
    line = torch.tensor([[[2.0, 4.0, 8.0, 4.0, 0.5], [5.0, 9.0, 5.0, 9.0, 2.0]]], device=DEVICE)
    want = torch.zeros(h, w, device=DEVICE)
    want[4, 2:9] = 1
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    want[((rows - 9) ** 2 + (cols - 5) ** 2 <= 4).to(DEVICE)] = 1
    for impl in ("triton", "ref"):
        assert torch.equal(mask_composite(x, line, kind="stroke", impl=impl).mask[0, 0], want)


def test_custom_op_registration():
    x, y, noise = _inputs((2, 3, 4, 5), torch.float32)
    for kind in ("box", "stroke"):
        params = _params(kind, 2, 4, 5)
        torch.library.opcheck(torch.ops.gali.mask_composite.default, (x, params, y, noise, None, kind, -2.0, 0.2))
        torch.library.opcheck(torch.ops.gali.mask_composite.default, (x, params, None, None, None, kind, -2.0, 0.0))


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def _row_coverage(side: int, sizes: range) -> np.ndarray:
    """P(index r is covered) when the size is uniform on `sizes` and the offset uniform where it fits."""
    cover = np.zeros(side)
    for size in sizes:
        for start in range(side - size + 1):
            cover[start : start + size] += 1.0 / (len(sizes) * (side - size + 1))
    return cover


def test_box_sampler_matches_the_paper_distribution():
    n, h, w, lo, hi = 40_000, 7, 5, 2, 4
    params = sample_box_params(n, h, w, min_size=lo, max_size=hi, generator=_gen(7))
    assert params.dtype == torch.int32 and params.shape == (n, 4) and params.device.type == DEVICE.type
    top, left, box_h, box_w = params.long().cpu().unbind(1)
    assert int(box_h.min()) == lo and int(box_h.max()) == hi and int(box_w.min()) == lo and int(box_w.max()) == hi
    assert bool((top >= 0).all() and (left >= 0).all() and (top + box_h <= h).all() and (left + box_w <= w).all())

    def check_counts(observed: torch.Tensor, probs: torch.Tensor) -> None:
        expected = n * probs
        sigma = (n * probs * (1 - probs)).sqrt()
        assert bool(((observed - expected).abs() <= 5 * sigma + 1e-9).all()), (observed, expected)

    sizes = range(lo, hi + 1)
    for offset, size, side in ((top, box_h, h), (left, box_w, w)):
        assert abs(size.double().mean().item() - (lo + hi) / 2) < 0.02
        # Joint law of (size, offset): size uniform, offset uniform where the box fits.
        observed = torch.zeros(len(sizes), side)
        observed.index_put_((size - lo, offset), torch.ones(n), accumulate=True)
        probs = torch.tensor(
            [[1 / (len(sizes) * (side - s + 1)) if o <= side - s else 0.0 for o in range(side)] for s in sizes],
            dtype=torch.float64,
        )
        check_counts(observed.double(), probs)

    # Per-pixel coverage against its exact value; every mask has area box_h·box_w (fully inside).
    mask = mask_composite_ref(torch.zeros(n, 1, h, w, device=DEVICE), params).mask[:, 0].cpu()
    assert torch.equal(mask.sum((1, 2)).long(), box_h * box_w)
    exact = torch.from_numpy(np.outer(_row_coverage(h, sizes), _row_coverage(w, sizes))).float()
    sigma = (exact * (1 - exact) / n).sqrt()
    assert bool(((mask.mean(0) - exact).abs() <= 5 * sigma + 1e-6).all())
    expected_fraction = ((lo + hi) / 2) ** 2 / (h * w)
    assert abs(mask.mean().item() - expected_fraction) < 0.01


def test_box_sampler_defaults_and_evaluation_masks():
    params = sample_box_params(5_000, 6, 9, generator=_gen(1))  # sizes 1..side, never empty
    _, _, box_h, box_w = params.long().unbind(1)
    assert int(box_h.min()) == 1 and int(box_h.max()) == 6 and int(box_w.max()) == 9
    mask = mask_composite(torch.zeros(5_000, 1, 6, 9, device=DEVICE), params, impl="ref").mask
    assert bool((mask.sum((1, 2, 3)) >= 1).all())
    assert abs(box_h.double().mean().item() - 3.5) < 0.1 and abs(box_w.double().mean().item() - 5.0) < 0.15
    evaluation = sample_box_params(2_000, 64, 64, min_size=8, max_size=54, generator=_gen(0))
    top, left, box_h, box_w = evaluation.long().unbind(1)
    assert int(box_h.min()) >= 8 and int(box_w.max()) <= 54
    assert bool((top + box_h <= 64).all() and (left + box_w <= 64).all())


def test_stroke_sampler_ranges():
    params = sample_stroke_params(2_000, 10, 20, num_strokes=5, max_thickness=6, generator=_gen(2))
    assert params.dtype == torch.float32 and params.shape == (2_000, 5, 5)
    x0, y0, x1, y1, r = params.cpu().unbind(-1)
    for v, side in ((x0, 20), (x1, 20), (y0, 10), (y1, 10)):
        assert torch.equal(v, v.round()) and int(v.min()) == 0 and int(v.max()) == side - 1
    assert torch.equal(2 * r, (2 * r).round()) and float(r.min()) == 0.5 and float(r.max()) == 3.0
    assert abs(x0.mean().item() - 9.5) < 0.2 and abs(r.mean().item() - 1.75) < 0.05
    default = sample_stroke_params(3, 64, 48, device=DEVICE)
    assert default.shape == (3, 4, 5) and float(default[..., 4].max()) <= 48 // 8 / 2


@pytest.mark.parametrize("sampler", [sample_box_params, sample_stroke_params])
def test_samplers_are_deterministic_for_a_seed(sampler):
    a = sampler(64, 16, 12, generator=_gen(42))
    b = sampler(64, 16, 12, generator=_gen(42))
    c = sampler(64, 16, 12, generator=_gen(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.zeros(2, 3, 4, 4, device=DEVICE)
    box = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    stroke = torch.zeros(2, 3, 5, device=DEVICE)
    return [
        ("x must be a 4-D", dict(x=x[0], params=box)),
        ("x must be float32", dict(x=x.long(), params=box)),
        ("kind must be one of", dict(x=x, params=box, kind="circle")),
        ("params for kind='box' must have shape", dict(x=x, params=box[:1])),
        ("params for kind='box' must be an integer", dict(x=x, params=box.float())),
        ("params for kind='stroke' must have shape", dict(x=x, params=stroke[..., :4], kind="stroke")),
        ("params for kind='stroke' must be floating", dict(x=x, params=stroke.int(), kind="stroke")),
        ("params for kind='dense' must be the masks", dict(x=x, params=x[:, 0, :3].byte(), kind="dense")),
        ("params for kind='dense' must be uint8 or bool", dict(x=x, params=x[:, 0], kind="dense")),
        ("y must have x's shape", dict(x=x, params=box, y=x[:1])),
        ("y must match x's dtype", dict(x=x, params=box, y=x.half())),
        ("noise is added to mix, which needs y", dict(x=x, params=box, noise=x)),
        ("noise must have x's shape", dict(x=x, params=box, y=x, noise=x[..., :2])),
        ("noise_std tensor must be a 0-d", dict(x=x, params=box, y=x, noise=x, noise_std=torch.ones(1, device=DEVICE))),
        ("noise_std=0.5 was given but noise is None", dict(x=x, params=box, y=x, noise_std=0.5)),
        ("noise_std must be a float", dict(x=x, params=box, y=x, noise=x, noise_std="0.1")),
    ]


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("message,kwargs", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_name_the_argument(impl, message, kwargs):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        mask_composite(**kwargs, impl=impl)


def test_bad_impl_and_sampler_arguments():
    x = torch.zeros(1, 1, 4, 4, device=DEVICE)
    box = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'ref'\)"):
        mask_composite(x, box, impl="cuda")
    huge = torch.zeros(65536, 1, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="batch must be <= 65535"):
        mask_composite(huge, torch.zeros(65536, 4, dtype=torch.int32, device=DEVICE), impl="triton")
    cases = [
        (ValueError, "n must be >= 1", lambda: sample_box_params(0, 4, 4)),
        (TypeError, "height must be an int", lambda: sample_box_params(2, 4.0, 4)),
        (ValueError, "min_size must be in", lambda: sample_box_params(2, 4, 4, min_size=0)),
        (ValueError, "max_size must be in", lambda: sample_box_params(2, 4, 8, max_size=5)),
        (ValueError, "max_size must be in", lambda: sample_box_params(2, 8, 8, min_size=4, max_size=3)),
        (ValueError, "num_strokes must be >= 1", lambda: sample_stroke_params(2, 4, 4, num_strokes=0)),
        (ValueError, "max_thickness must be >= 1", lambda: sample_stroke_params(2, 4, 4, max_thickness=0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter check concerns CPU tensors")
def test_triton_on_cpu_without_interpreter_or_triton_is_a_clear_error(monkeypatch):
    x = torch.zeros(1, 1, 4, 4)
    box = torch.zeros(1, 4, dtype=torch.int32)
    monkeypatch.setattr(_launch, "InterpretedFunction", type("NotTheKernelsType", (), {}))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mask_composite(x, box, impl="triton")
    assert torch.equal(mask_composite(x, box).mask, mask_composite_ref(x, box).mask)  # 'auto' falls back
    monkeypatch.setattr(_launch, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        mask_composite(x, box, impl="triton")
    assert math.isclose(float(mask_composite(x, box, impl="auto").masked.sum()), 0.0)


def test_runs_under_torch_compile():
    """The op is one opaque node for torch.compile, forward and backward (fullgraph, no graph break)."""
    x, y, noise = _inputs((2, 3, 6, 5), torch.float32)
    params = _params("box", 2, 6, 5)
    std = torch.tensor(0.2, device=DEVICE)

    def loss(impl):
        out = mask_composite(x, params, y, noise=noise, noise_std=std, impl=impl)
        return (2 * out.masked).sum() + (out.mix**2).sum()

    compiled = torch.compile(lambda: loss("triton"), fullgraph=True)
    got = torch.autograd.grad(compiled(), [x, y])
    want = torch.autograd.grad(loss("ref"), [x, y])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
