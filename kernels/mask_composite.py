"""Inpainting masks drawn on the device, the encoder's masked input and the mix composite, in one pass.

One pass (GALI-mix, docs/method.md §2.3) computes each sample's mask in registers from its parameters and writes each
output once: ``mask`` (B, 1, H, W), 1 = masked; ``masked = x·(1−m) + fill·m``; ``mix = x·(1−m) + y·m``
(+ ``noise_std·noise``). Backward, one pass, recomputes the mask: grad_x = (g_masked + g_mix)·(1−m), grad_y = g_mix·m.
Kinds: ``"box"`` int32 (B, 4) ``[top, left, box_h, box_w]``; ``"stroke"`` float32 (B, S, 5) ``[x0, y0, x1, y1, radius]``
(x = column, pixel centres at integers), masked within radius of a segment, bit-exact for :func:`sample_stroke_params`'
draws up to 2048 pixels a side; ``"dense"`` a given uint8/bool mask (B, [1,] H, W), nonzero = masked.
Bytes (e per element, N = B·C·H·W): forward (5 + [noise] + 1/C)·N·e (dense: + N·e/C + B·H·W), backward 4·N·e. Limits:
fp32 math, one rounding; fp32/bf16/fp16; batch <= 65535 on Triton; each S compiles a kernel; parameters unchecked
(clipped to the image), no gradient; CUDA-graph capturable. Layout: a channels-last x (``compute.channels_last``) is
read in place and ``masked``/``mix`` are written channels-last (the backward reads and writes its gradients in the
incoming gradient's layout); an input in another layout than x's, or neither layout, is copied into x's first.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gali.kernels._launch import Impl, device_guard, tl, triton, use_triton

__all__ = ["MaskComposite", "mask_composite", "mask_composite_ref", "sample_box_params", "sample_stroke_params"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KINDS = ("box", "stroke", "dense")
_KIND_CODE = {kind: code for code, kind in enumerate(_KINDS)}  # the kernels' KIND constexpr

Kind = Literal["box", "stroke", "dense"]


class MaskComposite(NamedTuple):
    """The op's outputs: ``mask`` (B,1,H,W), ``masked`` (B,C,H,W), ``mix`` (B,C,H,W) or None."""

    mask: Tensor
    masked: Tensor
    mix: Tensor | None


# ----------------------------------------------------------------------------------------------------------
# Reference twin
# ----------------------------------------------------------------------------------------------------------
# Plain PyTorch, gradients from autograd.


def _mask_ref(params: Tensor, kind: str, height: int, width: int) -> Tensor:
    """Boolean (B, 1, H, W) mask from canonical params, by broadcast comparisons against index grids."""
    if kind == "dense":
        return params.view(-1, 1, height, width) != 0
    rows = torch.arange(height, device=params.device).view(1, height, 1)
    cols = torch.arange(width, device=params.device).view(1, 1, width)
    if kind == "box":
        top, left, box_h, box_w = (p.view(-1, 1, 1) for p in params.unbind(1))
        mask = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
        return mask.unsqueeze(1)
    px, py = cols.float(), rows.float()
    mask = torch.zeros((params.shape[0], height, width), dtype=torch.bool, device=params.device)
    for stroke in params.unbind(1):  # S is small and static: a loop over strokes, not samples
        x0, y0, x1, y1, r = (p.view(-1, 1, 1) for p in stroke.unbind(-1))
        ex, ey = x1 - x0, y1 - y0
        dx, dy = px - x0, py - y0
        along = dx * ex + dy * ey  # projection onto the segment, times |e|²
        length2 = ex * ex + ey * ey
        r2 = r * r
        cross = (dx * ey - dy * ex).double()  # distance to the line, times |e|
        hit = torch.where(
            along <= 0,
            dx * dx + dy * dy <= r2,
            torch.where(
                along >= length2, (dx - ex) ** 2 + (dy - ey) ** 2 <= r2, cross * cross <= r2.double() * length2.double()
            ),
        )
        mask |= hit
    return mask.unsqueeze(1)


def mask_composite_ref(
    x: Tensor,
    params: Tensor,
    y: Tensor | None = None,
    *,
    kind: Kind = "box",
    fill: float = -2.0,
    noise: Tensor | None = None,
    noise_std: float | Tensor = 0.0,
) -> MaskComposite:
    """Plain-PyTorch twin of :func:`mask_composite`: same outputs, gradients from autograd."""
    params = _check_inputs(x, params, y, kind, noise, noise_std)
    m = _mask_ref(params, kind, x.shape[2], x.shape[3])
    masked = x.masked_fill(m, fill)
    mix = None
    if y is not None:
        mix = torch.where(m, y, x)
        if noise is not None:
            std = noise_std.float() if isinstance(noise_std, Tensor) else noise_std
            mix = (mix.float() + std * noise.float()).to(x.dtype)
    return MaskComposite(m.to(x.dtype), masked, mix)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mask_block(params_ptr, b, offs, inside, W, hw, KIND: tl.constexpr, NUM_STROKES: tl.constexpr):
        """The mask (True = masked) of the pixels ``offs`` (flat within the image) of sample b, from its parameters."""
        row = offs // W
        col = offs % W
        if KIND == 2:  # "dense" (_KINDS order: box 0, stroke 1, dense 2): the given mask's bytes
            mask = tl.load(params_ptr + b.to(tl.int64) * hw + offs, mask=inside, other=0) != 0
        elif KIND == 0:
            p = params_ptr + b * 4
            top = tl.load(p)
            left = tl.load(p + 1)
            box_h = tl.load(p + 2)
            box_w = tl.load(p + 3)
            mask = (row >= top) & (row < top + box_h) & (col >= left) & (col < left + box_w)
        else:
            px = col.to(tl.float32)
            py = row.to(tl.float32)
            mask = row < 0
            for s in tl.static_range(NUM_STROKES):
                p = params_ptr + (b * NUM_STROKES + s) * 5
                x0 = tl.load(p)
                y0 = tl.load(p + 1)
                ex = tl.load(p + 2) - x0
                ey = tl.load(p + 3) - y0
                r = tl.load(p + 4)
                r2 = r * r
                length2 = ex * ex + ey * ey
                r2_length2 = r2.to(tl.float64) * length2.to(tl.float64)
                dx = px - x0
                dy = py - y0
                along = dx * ex + dy * ey
                cross = (dx * ey - dy * ex).to(tl.float64)
                fx = dx - ex
                fy = dy - ey
                hit = tl.where(
                    along <= 0,
                    dx * dx + dy * dy <= r2,
                    tl.where(along >= length2, fx * fx + fy * fy <= r2, cross * cross <= r2_length2),
                )
                mask = mask | hit
        return mask

    @triton.jit
    def _mask_composite_fwd_kernel(
        x_ptr,
        y_ptr,
        noise_ptr,
        std_ptr,
        params_ptr,
        mask_ptr,
        masked_ptr,
        mix_ptr,
        C,
        H,
        W,
        fill,
        std_value,
        KIND: tl.constexpr,
        NUM_STROKES: tl.constexpr,
        HAS_Y: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        STD_IN_TENSOR: tl.constexpr,
        BLOCK: tl.constexpr,
        CHANNELS_LAST: tl.constexpr = False,
        C_BLOCK: tl.constexpr = 1,
    ):
        """Grid (pixel blocks, B): mask once per block, then every channel of x (and y) read once: NCHW a channel
        at a time; channels-last (B, H, W, C) as one (BLOCK pixels, C_BLOCK ≥ C channels) tile, contiguous in
        memory."""
        b = tl.program_id(1)
        hw = H * W
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < hw
        m = _mask_block(params_ptr, b, offs, inside, W, hw, KIND, NUM_STROKES)
        b64 = b.to(tl.int64)
        # via fp32: the interpreter converts int1 straight to bf16 bits (1 -> the smallest subnormal)
        tl.store(mask_ptr + b64 * hw + offs, tl.where(m, 1.0, 0.0).to(mask_ptr.dtype.element_ty), mask=inside)
        std = std_value
        if STD_IN_TENSOR:
            std = tl.load(std_ptr).to(tl.float32)
        if CHANNELS_LAST:
            channels = tl.arange(0, C_BLOCK)
            tile = inside[:, None] & (channels[None, :] < C)
            at = (b64 * hw + offs[:, None]) * C + channels[None, :]
            m2 = m[:, None]
            xv = tl.load(x_ptr + at, mask=tile).to(tl.float32)
            tl.store(masked_ptr + at, tl.where(m2, fill, xv).to(masked_ptr.dtype.element_ty), mask=tile)
            if HAS_Y:
                v = tl.where(m2, tl.load(y_ptr + at, mask=tile).to(tl.float32), xv)
                if HAS_NOISE:
                    v += std * tl.load(noise_ptr + at, mask=tile).to(tl.float32)
                tl.store(mix_ptr + at, v.to(mix_ptr.dtype.element_ty), mask=tile)
        else:
            for c in range(C):
                at = (b64 * C + c) * hw + offs
                xv = tl.load(x_ptr + at, mask=inside).to(tl.float32)
                tl.store(masked_ptr + at, tl.where(m, fill, xv).to(masked_ptr.dtype.element_ty), mask=inside)
                if HAS_Y:
                    v = tl.where(m, tl.load(y_ptr + at, mask=inside).to(tl.float32), xv)
                    if HAS_NOISE:
                        v += std * tl.load(noise_ptr + at, mask=inside).to(tl.float32)
                    tl.store(mix_ptr + at, v.to(mix_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _mask_composite_bwd_kernel(
        g_masked_ptr,
        g_mix_ptr,
        params_ptr,
        grad_x_ptr,
        grad_y_ptr,
        C,
        H,
        W,
        KIND: tl.constexpr,
        NUM_STROKES: tl.constexpr,
        HAS_G_MASKED: tl.constexpr,
        HAS_G_MIX: tl.constexpr,
        NEED_X: tl.constexpr,
        NEED_Y: tl.constexpr,
        BLOCK: tl.constexpr,
        CHANNELS_LAST: tl.constexpr = False,
        C_BLOCK: tl.constexpr = 1,
    ):
        """grad_x = (g_masked + g_mix)·(1−m), grad_y = g_mix·m, mask recomputed from the parameters (layouts as
        the forward's)."""
        b = tl.program_id(1)
        hw = H * W
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < hw
        m = _mask_block(params_ptr, b, offs, inside, W, hw, KIND, NUM_STROKES)
        b64 = b.to(tl.int64)
        if CHANNELS_LAST:
            channels = tl.arange(0, C_BLOCK)
            tile = inside[:, None] & (channels[None, :] < C)
            at = (b64 * hw + offs[:, None]) * C + channels[None, :]
            m2 = m[:, None]
            gx = tl.zeros([BLOCK, C_BLOCK], dtype=tl.float32)
            if HAS_G_MASKED:
                gx += tl.load(g_masked_ptr + at, mask=tile).to(tl.float32)
            if HAS_G_MIX:
                gm = tl.load(g_mix_ptr + at, mask=tile).to(tl.float32)
                gx += gm
                if NEED_Y:
                    tl.store(grad_y_ptr + at, tl.where(m2, gm, 0.0).to(grad_y_ptr.dtype.element_ty), mask=tile)
            if NEED_X:
                tl.store(grad_x_ptr + at, tl.where(m2, 0.0, gx).to(grad_x_ptr.dtype.element_ty), mask=tile)
        else:
            for c in range(C):
                at = (b64 * C + c) * hw + offs
                gx = tl.zeros([BLOCK], dtype=tl.float32)
                if HAS_G_MASKED:
                    gx += tl.load(g_masked_ptr + at, mask=inside).to(tl.float32)
                if HAS_G_MIX:
                    gm = tl.load(g_mix_ptr + at, mask=inside).to(tl.float32)
                    gx += gm
                    if NEED_Y:
                        tl.store(grad_y_ptr + at, tl.where(m, gm, 0.0).to(grad_y_ptr.dtype.element_ty), mask=inside)
                if NEED_X:
                    tl.store(grad_x_ptr + at, tl.where(m, 0.0, gx).to(grad_x_ptr.dtype.element_ty), mask=inside)

else:  # no kernels without triton: every impl resolves to the reference or an error
    _mask_composite_fwd_kernel = None


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _launch_config(hw: int, c_block: int = 1) -> tuple[int, int]:
    """(BLOCK, num_warps): large contiguous blocks, 16 elements per thread at 2048 × 4 warps.

    Tuned on an H100 for NCHW (``c_block`` = 1): 512-2048 elements per block are within a few % for boxes; 2048 ×
    4 warps is the best for strokes, whose fp64 products make 8 warps or 4096-element blocks slower. Channels-last
    tiles hold ``c_block`` channels per pixel: BLOCK pixels × c_block ≤ 2048 elements, the same per thread (not yet
    timed on a GPU).
    """
    block = min(max(2048 // c_block, 1), triton.next_power_of_2(hw))
    return block, 4 if block * c_block >= 1024 else 2


def _layout(t: Tensor) -> torch.memory_format:
    """The layout the kernels read ``t`` in and write its outputs in: channels-last when it is (and not NCHW too,
    as with C = 1 or 1×1 images, where both are one), else NCHW (a tensor in neither is copied)."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _tile(layout: torch.memory_format, channels: int) -> dict[str, int | bool]:
    """The kernels' layout constexprs."""
    channels_last = layout == torch.channels_last
    return {"CHANNELS_LAST": channels_last, "C_BLOCK": triton.next_power_of_2(channels) if channels_last else 1}


# ----------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------------------
# One opaque node each for torch.compile and CUDA graphs.


@torch.library.custom_op("gali::mask_composite", mutates_args=())
def _mask_composite_op(
    x: Tensor,
    params: Tensor,
    y: Tensor | None,
    noise: Tensor | None,
    noise_std_tensor: Tensor | None,
    kind: str,
    fill: float,
    noise_std: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward. Returns (mask, masked, mix) (masked and mix in x's layout); mix is an empty tensor when y is
    None."""
    layout = _layout(x)
    x = x.contiguous(memory_format=layout)
    B, C, H, W = x.shape
    mask = torch.empty((B, 1, H, W), dtype=x.dtype, device=x.device)
    masked = torch.empty_like(x, memory_format=layout)
    mix = torch.empty_like(masked) if y is not None else x.new_empty(0)
    tile = _tile(layout, C)
    block, num_warps = _launch_config(H * W, tile["C_BLOCK"])
    with device_guard(x):
        _mask_composite_fwd_kernel[(triton.cdiv(H * W, block), B)](
            x,
            x if y is None else y.contiguous(memory_format=layout),
            x if noise is None else noise.contiguous(memory_format=layout),
            x if noise_std_tensor is None else noise_std_tensor,
            params.contiguous(),
            mask,
            masked,
            mix,
            C,
            H,
            W,
            fill,
            noise_std,
            KIND=_KIND_CODE[kind],
            NUM_STROKES=params.shape[1] if kind == "stroke" else 1,
            HAS_Y=y is not None,
            HAS_NOISE=y is not None and noise is not None,
            STD_IN_TENSOR=noise_std_tensor is not None,
            BLOCK=block,
            **tile,
            num_warps=num_warps,
        )
    return mask, masked, mix


@_mask_composite_op.register_fake
def _mask_composite_fake(x, params, y, noise, noise_std_tensor, kind, fill, noise_std):
    B, _, H, W = x.shape
    masked = torch.empty_like(x, memory_format=_layout(x))
    mix = torch.empty_like(masked) if y is not None else x.new_empty(0)
    return x.new_empty((B, 1, H, W)), masked, mix


@torch.library.custom_op("gali::mask_composite_backward", mutates_args=())
def _mask_composite_backward_op(
    g_masked: Tensor | None,
    g_mix: Tensor | None,
    params: Tensor,
    kind: str,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor]:
    """Triton backward. Returns (grad_x, grad_y) in the first given gradient's layout; one not needed is an empty
    tensor."""
    ref = g_masked if g_masked is not None else g_mix
    layout = _layout(ref)
    B, C, H, W = ref.shape
    grad_x = torch.empty_like(ref, memory_format=layout) if need_x else ref.new_empty(0)
    grad_y = torch.empty_like(ref, memory_format=layout) if need_y else ref.new_empty(0)
    tile = _tile(layout, C)
    block, num_warps = _launch_config(H * W, tile["C_BLOCK"])
    with device_guard(ref):
        _mask_composite_bwd_kernel[(triton.cdiv(H * W, block), B)](
            ref if g_masked is None else g_masked.contiguous(memory_format=layout),
            ref if g_mix is None else g_mix.contiguous(memory_format=layout),
            params.contiguous(),
            grad_x,
            grad_y,
            C,
            H,
            W,
            KIND=_KIND_CODE[kind],
            NUM_STROKES=params.shape[1] if kind == "stroke" else 1,
            HAS_G_MASKED=g_masked is not None and need_x,
            HAS_G_MIX=g_mix is not None,
            NEED_X=need_x,
            NEED_Y=need_y,
            BLOCK=block,
            **tile,
            num_warps=num_warps,
        )
    return grad_x, grad_y


@_mask_composite_backward_op.register_fake
def _mask_composite_backward_fake(g_masked, g_mix, params, kind, need_x, need_y):
    ref = g_masked if g_masked is not None else g_mix
    grad_x = torch.empty_like(ref, memory_format=_layout(ref)) if need_x else ref.new_empty(0)
    grad_y = torch.empty_like(ref, memory_format=_layout(ref)) if need_y else ref.new_empty(0)
    return grad_x, grad_y


def _setup_context(ctx, inputs, output) -> None:
    _, params, y, _, _, kind, _, _ = inputs
    ctx.mark_non_differentiable(output[0])  # the mask is a function of params only
    ctx.save_for_backward(params)
    ctx.kind = kind
    ctx.has_y = y is not None
    ctx.set_materialize_grads(False)  # an unused output sends no zeros through the backward kernel


def _backward(ctx, _g_mask, g_masked, g_mix):
    (params,) = ctx.saved_tensors
    if not ctx.has_y:
        g_mix = None
    need_x = ctx.needs_input_grad[0] and (g_masked is not None or g_mix is not None)
    need_y = ctx.needs_input_grad[2] and g_mix is not None
    grad_x = grad_y = None
    if need_x or need_y:
        gx, gy = _mask_composite_backward_op(g_masked, g_mix, params, ctx.kind, need_x, need_y)
        grad_x = gx if need_x else None
        grad_y = gy if need_y else None
    return grad_x, None, grad_y, None, None, None, None, None


_mask_composite_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------


def mask_composite(
    x: Tensor,
    params: Tensor,
    y: Tensor | None = None,
    *,
    kind: Kind = "box",
    fill: float = -2.0,
    noise: Tensor | None = None,
    noise_std: float | Tensor = 0.0,
    impl: Impl = "auto",
) -> MaskComposite:
    """Mask x (and mix it with y) in one pass; see the module docstring for what is fused.

    Args:
        x: (B, C, H, W) float32/bfloat16/float16 image, e.g. real data or a generator output.
        params: per-sample mask parameters: int (B, 4) for kind='box', float (B, S, 5) for 'stroke'
            (from :func:`sample_box_params` / :func:`sample_stroke_params`), or the masks themselves,
            uint8/bool (B, H, W) or (B, 1, H, W), for 'dense'. No gradient.
        y: optional (B, C, H, W) image of x's dtype pasted inside the mask (GALI-mix's G(E(M(x)))).
        kind: 'box', 'stroke' or 'dense'.
        fill: value written into masked pixels of ``masked`` (−2, just outside tanh's range, docs/method.md §5 item 6).
        noise: optional (B, C, H, W) standard-normal draw added to ``mix`` as D's instance noise.
        noise_std: its scale, a float or a 0-d tensor on x's device (a tensor keeps a changing schedule
            capturable across CUDA-graph replays).
        impl: 'auto' (Triton on CUDA, the reference elsewhere), 'triton' or 'ref'.

    Returns:
        MaskComposite(mask, masked, mix); gradients flow to x (through masked and mix) and y (mix).
    """
    if not use_triton("mask_composite", impl, x, _FLOAT_DTYPES, _mask_composite_fwd_kernel):
        return mask_composite_ref(x, params, y, kind=kind, fill=fill, noise=noise, noise_std=noise_std)
    params = _check_inputs(x, params, y, kind, noise, noise_std)
    if x.shape[0] > 65535:
        raise ValueError(f"mask_composite(impl='triton'): batch must be <= 65535, got {x.shape[0]}; split it")
    std_tensor = noise_std if isinstance(noise_std, Tensor) else None
    std_value = 0.0 if std_tensor is not None else float(noise_std)
    mask, masked, mix = _mask_composite_op(x, params, y, noise, std_tensor, kind, float(fill), std_value)
    return MaskComposite(mask, masked, mix if y is not None else None)


# --- Input checks (every path) ---


def _check_inputs(
    x: Tensor,
    params: Tensor,
    y: Tensor | None,
    kind: str,
    noise: Tensor | None,
    noise_std: float | Tensor,
) -> Tensor:
    """Raise a clear error naming the bad argument; return params in their canonical dtype."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"mask_composite: x must be a 4-D (B, C, H, W) tensor, got {got}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mask_composite: x must be float32, bfloat16 or float16, got {x.dtype}")
    batch = x.shape[0]
    if kind not in _KINDS:
        raise ValueError(f"mask_composite: kind must be one of {_KINDS}, got {kind!r}")
    if not isinstance(params, Tensor):
        raise TypeError(f"mask_composite: params must be a tensor, got {type(params).__name__}")
    if params.device != x.device:
        raise ValueError(f"mask_composite: params is on {params.device} but x is on {x.device}")
    if kind == "box":
        if params.shape != (batch, 4):
            raise ValueError(
                f"mask_composite: params for kind='box' must have shape (B, 4) = ({batch}, 4) "
                f"[top, left, box_h, box_w], got {tuple(params.shape)}"
            )
        if params.dtype.is_floating_point or params.dtype.is_complex or params.dtype == torch.bool:
            raise TypeError(f"mask_composite: params for kind='box' must be an integer tensor, got {params.dtype}")
        params = params.to(torch.int32)
    elif kind == "dense":
        height, width = x.shape[2:]
        if params.shape not in ((batch, height, width), (batch, 1, height, width)):
            raise ValueError(
                f"mask_composite: params for kind='dense' must be the masks, shape (B, H, W) = ({batch}, {height}, "
                f"{width}) or (B, 1, H, W), got {tuple(params.shape)}"
            )
        if params.dtype not in (torch.uint8, torch.bool):
            raise TypeError(f"mask_composite: params for kind='dense' must be uint8 or bool masks, got {params.dtype}")
        params = params.reshape(batch, height, width).to(torch.uint8)
    else:
        if params.dim() != 3 or params.shape[0] != batch or params.shape[2] != 5 or params.shape[1] < 1:
            raise ValueError(
                f"mask_composite: params for kind='stroke' must have shape (B, S, 5) with B = {batch}, "
                f"S >= 1 [x0, y0, x1, y1, radius], got {tuple(params.shape)}"
            )
        if not params.dtype.is_floating_point:
            raise TypeError(f"mask_composite: params for kind='stroke' must be floating point, got {params.dtype}")
        params = params.to(torch.float32)
    if y is not None:
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"mask_composite: y must have x's shape {tuple(x.shape)}, got {got}")
        if y.dtype != x.dtype or y.device != x.device:
            raise ValueError(
                f"mask_composite: y must match x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({y.dtype}, {y.device})"
            )
    if noise is not None:
        if y is None:
            raise ValueError("mask_composite: noise is added to mix, which needs y; pass y or drop noise")
        if not isinstance(noise, Tensor) or noise.shape != x.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"mask_composite: noise must have x's shape {tuple(x.shape)}, got {got}")
        if not noise.dtype.is_floating_point or noise.device != x.device:
            raise ValueError(
                f"mask_composite: noise must be floating point on {x.device}, got ({noise.dtype}, {noise.device})"
            )
    if isinstance(noise_std, Tensor):
        if noise is None:
            raise ValueError("mask_composite: noise_std was given as a tensor but noise is None")
        if noise_std.dim() != 0 or not noise_std.dtype.is_floating_point or noise_std.device != x.device:
            raise ValueError(
                f"mask_composite: noise_std tensor must be a 0-d floating tensor on {x.device}, got shape "
                f"{tuple(noise_std.shape)}, {noise_std.dtype} on {noise_std.device}"
            )
    elif isinstance(noise_std, bool) or not isinstance(noise_std, int | float):
        raise TypeError(f"mask_composite: noise_std must be a float or a 0-d tensor, got {type(noise_std).__name__}")
    elif noise is None and noise_std != 0:
        raise ValueError(f"mask_composite: noise_std={noise_std} was given but noise is None")
    return params


# --- Mask parameter samplers (vectorised, on the device) ---


def _uniform_int(u: Tensor, low: int | Tensor, count: int | Tensor) -> Tensor:
    """Map u ~ U[0, 1) (float64) to integers uniform on {low, ..., low+count−1}.

    floor(u·count) ≤ count−1 holds exactly in float64 for every count below 2**52.
    """
    return low + (u * count).floor()


def _resolve_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def sample_box_params(
    n: int,
    height: int,
    width: int,
    *,
    min_size: int = 1,
    max_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n rectangular masks: int32 (n, 4) ``[top, left, box_h, box_w]``.

    box_h and box_w are each uniform on {min_size, ..., max_size} (max_size defaults to the side:
    height for box_h, width for box_w), and the corner is uniform over the positions where the box fits
    inside the image: top on {0, ..., height−box_h}, left on {0, ..., width−box_w}. This is the paper's
    training distribution (docs/method.md §2.3) without the authors' bugs (empty boxes; the column offset drawn
    with the height, §5 item 5). Evaluation masks are the same call with min_size=8, max_size=54 on 64² and a
    seeded generator. One RNG call and a few elementwise ops: no host sync, no per-sample loop.
    """
    _check_int("n", n, 1)
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    _check_int("min_size", min_size, 1, min(height, width))
    if max_size is None:
        max_h, max_w = height, width
    else:
        max_h = max_w = _check_int("max_size", max_size, min_size, min(height, width))
    u = torch.rand((n, 4), generator=generator, device=_resolve_device(generator, device), dtype=torch.float64)
    box_h = _uniform_int(u[:, 0], min_size, max_h - min_size + 1)
    box_w = _uniform_int(u[:, 1], min_size, max_w - min_size + 1)
    top = _uniform_int(u[:, 2], 0, height - box_h + 1)
    left = _uniform_int(u[:, 3], 0, width - box_w + 1)
    return torch.stack((top, left, box_h, box_w), dim=1).to(torch.int32)


def sample_stroke_params(
    n: int,
    height: int,
    width: int,
    *,
    num_strokes: int = 4,
    max_thickness: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n free-form masks of S = num_strokes thick segments: float32 (n, S, 5) ``[x0, y0, x1, y1, r]``.

    Endpoints are pixel centres, x uniform on {0, ..., width−1} and y on {0, ..., height−1}
    (independently, so a stroke may be a single disc); the stroke's thickness t is uniform on
    {1, ..., max_thickness} (default max(1, min(height, width) // 8)) and its radius r = t/2, so an
    axis-aligned stroke is about t pixels wide. Integer endpoints and half-integer radii make the mask
    test exact (see the module docstring).
    """
    _check_int("n", n, 1)
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    _check_int("num_strokes", num_strokes, 1)
    if max_thickness is None:
        max_thickness = max(1, min(height, width) // 8)
    _check_int("max_thickness", max_thickness, 1)
    u = torch.rand(
        (n, num_strokes, 5), generator=generator, device=_resolve_device(generator, device), dtype=torch.float64
    )
    x0, y0, x1, y1, t = u.unbind(-1)
    params = (
        _uniform_int(x0, 0, width),
        _uniform_int(y0, 0, height),
        _uniform_int(x1, 0, width),
        _uniform_int(y1, 0, height),
        _uniform_int(t, 1, max_thickness) / 2,
    )
    return torch.stack(params, dim=-1).to(torch.float32)
