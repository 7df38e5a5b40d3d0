"""kway_head: the discriminator's last linear layer fused with GALI's K-way losses and their gradients.

One Triton launch computes the logits h @ W^T + b in fp32, the D loss, the G/E product-of-terms loss and, in the
same pass, their gradients (docs/method.md §1.3-1.6); a second sums per-row-block partials in a fixed order (no
atomics: bit-reproducible); backward only scales the stored gradients. Small batches split the gradient pass over
the features so that the programs fill the GPU (see :func:`_launch_config`). With p the softmax over each group of K
columns, 1/B = ``inv_batch``: loss_d = 1/B Σ_rows w_true[y]·(−log p_y), loss_ge = 1/B Σ_rows,j w_pair[y, j]·(−log p_j).
Bytes (s per element of h, C = G·K columns, P row blocks): at least 3·N·F·s + 2·C·F·s + 8·N, plus fp32 partials
P·(C·F + C + 2)·4 (rows padded to 64 bytes) written and read back, plus L2 re-reads of h where the features are
split; backward moves 2·N·F·s per loss backpropagated on its own.
Limits: 2 <= K <= 16, G·K <= 32 (wider raises ValueError), any N, F; fp32/bf16/fp16 (the reference also fp64); fp32
math (IEEE, no TF32), fp32 losses, gradients in the input dtype. Labels are not checked: Triton gives rows outside
[0, K) zero weight, the reference raises or asserts. No host sync: CUDA-graph capturable (eager calls are host-bound).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gali.kernels._launch import device_guard, tl, triton, use_triton

__all__ = ["kway_head", "kway_head_grouped", "kway_head_grouped_ref", "kway_head_ref", "kway_losses"]

K_MAX = 16  # classes per group
COLS_MAX = 32  # logit columns in all (G·K)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REF_DTYPES = (*_TRITON_DTYPES, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Reference twin
# ----------------------------------------------------------------------------------------------------------


def kway_losses(
    logits: Tensor, labels: Tensor, w_true: Tensor, w_pair: Tensor, inv_batch: float
) -> tuple[Tensor, Tensor]:
    """``(loss_d, loss_ge)`` from logits (N, K) of class-grouped rows: the math every path must match.

    Log-softmax runs in fp32 (fp64 for fp64 logits); both losses come from the same logits.
    """
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=1)
    loss_d = -inv_batch * (w_true[labels] * logp.gather(1, labels[:, None]).squeeze(1)).sum()
    loss_ge = -inv_batch * (w_pair[labels] * logp).sum()
    return loss_d, loss_ge


def kway_head_ref(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of :func:`kway_head`: same arguments (less ``impl``), same gradient semantics.

    Logits come from ``F.linear`` in the input dtype, :func:`kway_losses` does the rest, and autograd
    derives every gradient. ``loss_ge`` is built from logits computed with ``weight.detach()`` and
    ``bias.detach()``, so it has a gradient w.r.t. h only.
    """
    _check_inputs("kway_head", h, weight, bias, labels, w_true, w_pair, inv_batch, 1, _REF_DTYPES)
    return _ref_losses(h, weight, bias, labels, w_true, w_pair, inv_batch, 1)


def kway_head_grouped_ref(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of :func:`kway_head_grouped`: :func:`kway_losses` on each group's K columns of
    the ``F.linear`` logits, summed over the groups; gradients as in :func:`kway_head_ref`."""
    _check_inputs("kway_head_grouped", h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups, _REF_DTYPES)
    return _ref_losses(h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups)


def _ref_losses(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
) -> tuple[Tensor, Tensor]:
    """(loss_d, loss_ge) summed over the groups, loss_ge through detached weight and bias."""

    def summed(logits: Tensor, which: int) -> Tensor:
        losses = [kway_losses(group, labels, w_true, w_pair, inv_batch)[which] for group in logits.chunk(num_groups, 1)]
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total.float()

    loss_d = summed(F.linear(h, weight, bias), 0)
    loss_ge = summed(F.linear(h, weight.detach(), bias.detach()), 1)
    return loss_d, loss_ge


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 -> ``dtype`` with round-to-nearest-even. Triton's CPU interpreter truncates fp32 -> bf16, so
        there the rounding is done on the bits first (making the final cast exact)."""
        if INTERPRET and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _kway_head_fwd_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        labels_ptr,
        w_true_ptr,
        w_pair_ptr,
        grad_h_d_ptr,
        grad_h_ge_ptr,
        partial_ptr,
        n_rows,
        n_feat,
        n_cls,
        inv_batch,
        stride_partial,
        n_split,
        f_per_split,
        NUM_GROUPS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_C: tl.constexpr,
        F_ALIGN: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Program (row block r, feature split s), pid = r·n_split + s: BLOCK_N rows. Pass 1 over all of
        n_feat builds the NUM_GROUPS·n_cls logit columns; the per-group softmax, both losses and both logit
        gradients follow in registers (the n_split programs of a row block compute the same values; they run
        side by side, so all but the first read their rows from L2); pass 2 over features
        [s·f_per_split, (s+1)·f_per_split) writes grad_h_d, grad_h_ge and that slice of row block r's partial dW.
        Column c is class c % n_cls of group c // n_cls. Partial row r (n_col = NUM_GROUPS·n_cls, row stride a
        multiple of 16): [dW (n_col·n_feat) | db (n_col) | loss_d | loss_ge], all fp32; split 0 writes db and
        the losses. F_ALIGN: a power of two that divides n_feat (at most 16), so that rows start aligned."""
        pid = tl.program_id(0)
        pid_f = pid % n_split
        pid = pid // n_split
        if F_ALIGN > 1 and F_ALIGN < 16:  # (a multiple of 16 is specialised by Triton itself)
            n_feat = n_feat // F_ALIGN * F_ALIGN  # the same value, known to the compiler as a multiple of F_ALIGN
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        row_off = rows.to(tl.int64) * n_feat
        n_col = NUM_GROUPS * n_cls
        cs = tl.arange(0, BLOCK_C)
        c_ok = cs < n_col
        grp = cs // n_cls  # padded columns get a group >= NUM_GROUPS, so no group's masks select them
        cls = cs % n_cls
        fs = tl.arange(0, BLOCK_F)
        dtype = h_ptr.dtype.element_ty
        # Triton's CPU interpreter multiplies bf16 tiles as raw integers, so it feeds tl.dot fp32 copies
        # (products of 16-bit floats are exact in fp32: the same numbers as the GPU's fp32 accumulation).
        dot_dtype = tl.float32 if INTERPRET else dtype

        # Pass 1: logits = h @ W^T + b, fp32 accumulation. h is asked to stay in L2 for pass 2, whose
        # gradient stores stream past it.
        logits = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for f0 in range(0, n_feat, BLOCK_F):
            f = f0 + fs
            f_ok = f < n_feat
            hmask = row_ok[:, None] & f_ok[None, :]
            hv = tl.load(h_ptr + row_off[:, None] + f[None, :], mask=hmask, other=0.0, eviction_policy="evict_last")
            wv = tl.load(w_ptr + cs[:, None] * n_feat + f[None, :], mask=c_ok[:, None] & f_ok[None, :], other=0.0)
            logits = tl.dot(hv.to(dot_dtype), tl.trans(wv.to(dot_dtype)), logits, input_precision="ieee")
        logits += tl.load(b_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(c_ok[None, :], logits, float("-inf"))

        # Segmented softmax and log-sum-exp: each group's row max and sum by a masked reduction, broadcast
        # back over the group's columns. Padded columns keep m = 0, s = 1, so they get p = 0.
        m = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_g = (grp == g)[None, :]
            m = tl.where(in_g, tl.max(tl.where(in_g, logits, float("-inf")), axis=1)[:, None], m)
        e = tl.exp(logits - m)
        s = tl.full((BLOCK_N, BLOCK_C), 1.0, dtype=tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_g = (grp == g)[None, :]
            s = tl.where(in_g, tl.sum(tl.where(in_g, e, 0.0), axis=1)[:, None], s)
        p = e / s
        lse = m + tl.log(s)

        # Per-row weights, the same for every group. Padded rows and rows with an out-of-range label get zero
        # weight, which zeroes their losses and gradients.
        y = tl.load(labels_ptr + rows, mask=row_ok, other=0)
        y_ok = row_ok & (y >= 0) & (y < n_cls)
        wt = tl.load(w_true_ptr + y, mask=y_ok, other=0.0)
        wp = tl.load(w_pair_ptr + y[:, None] * n_cls + cls[None, :], mask=y_ok[:, None] & c_ok[None, :], other=0.0)
        s_y = tl.sum(tl.where((grp == 0)[None, :], wp, 0.0), axis=1)  # one group's row sum of w_pair
        onehot = (cls[None, :] == y[:, None]) & c_ok[None, :]

        ce = tl.where(c_ok[None, :], lse - logits, 0.0)
        loss_d = tl.sum(wt * tl.sum(tl.where(onehot, ce, 0.0), axis=1), axis=0) * inv_batch
        loss_ge = tl.sum(tl.sum(wp * ce, axis=1), axis=0) * inv_batch

        # Logit gradients without the 1/B factor (|u| <= the class weights), so that the cast to a 16-bit
        # dtype for tl.dot keeps them normal numbers; 1/B is applied to the fp32 dot products.
        u_d = wt[:, None] * (p - tl.where(onehot, 1.0, 0.0))
        u_ge = s_y[:, None] * p - wp
        u_d_c = _round_to(u_d, dtype, INTERPRET).to(dot_dtype)
        u_ge_c = _round_to(u_ge, dtype, INTERPRET).to(dot_dtype)

        part = partial_ptr + pid.to(tl.int64) * stride_partial
        # Split 0 of the row block writes db and the losses (the masks are vectors: the CPU interpreter rejects a
        # scalar comparison in a store mask).
        tl.store(part + n_col * n_feat + cs, tl.sum(u_d, axis=0) * inv_batch, mask=c_ok & (cs * 0 + pid_f == 0))
        two = tl.arange(0, 2)
        tl.store(part + n_col * n_feat + n_col + two, tl.where(two == 0, loss_d, loss_ge), mask=two * 0 + pid_f == 0)

        # Pass 2: B·grad_h = u @ W for both losses (summing over all groups' columns), stored without the 1/B
        # (the backward applies it with the upstream gradient: under fp16 that is the loss scale, so a small
        # gradient is never rounded to a 16-bit subnormal before it is scaled), and partial dW = u_d^T @ h / B.
        f_lo = pid_f * f_per_split
        for f0 in range(f_lo, tl.minimum(f_lo + f_per_split, n_feat), BLOCK_F):
            f = f0 + fs
            f_ok = f < n_feat
            wv = tl.load(w_ptr + cs[:, None] * n_feat + f[None, :], mask=c_ok[:, None] & f_ok[None, :], other=0.0)
            wv = wv.to(dot_dtype)
            hmask = row_ok[:, None] & f_ok[None, :]
            gh_d = tl.dot(u_d_c, wv, input_precision="ieee")
            gh_d = _round_to(gh_d, dtype, INTERPRET)
            tl.store(grad_h_d_ptr + row_off[:, None] + f[None, :], gh_d, mask=hmask, cache_modifier=".cs")
            gh_ge = tl.dot(u_ge_c, wv, input_precision="ieee")
            gh_ge = _round_to(gh_ge, dtype, INTERPRET)
            tl.store(grad_h_ge_ptr + row_off[:, None] + f[None, :], gh_ge, mask=hmask, cache_modifier=".cs")
            hv = tl.load(h_ptr + row_off[:, None] + f[None, :], mask=hmask, other=0.0, eviction_policy="evict_first")
            gw = tl.dot(tl.trans(u_d_c), hv.to(dot_dtype), input_precision="ieee") * inv_batch
            tl.store(part + cs[:, None] * n_feat + f[None, :], gw, mask=c_ok[:, None] & f_ok[None, :])

    @triton.jit
    def _kway_head_reduce_kernel(
        partial_ptr,
        grad_w_ptr,
        grad_b_ptr,
        loss_d_ptr,
        loss_ge_ptr,
        n_part,
        n_wf,
        n_col,
        stride_partial,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Sum the n_part per-program partial rows column-wise (fixed order, deterministic) and scatter the
        sums into grad_W (input dtype), grad_b (input dtype) and the two fp32 losses."""
        pid = tl.program_id(0)
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < stride_partial  # the padded row: aligned loads; the tail is summed and never stored
        ps = tl.arange(0, BLOCK_P)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, n_part, BLOCK_P):
            p = p0 + ps
            v = tl.load(
                partial_ptr + p.to(tl.int64)[:, None] * stride_partial + cols[None, :],
                mask=(p < n_part)[:, None] & c_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(v, axis=0)
        is_w = cols < n_wf
        w_val = _round_to(acc, grad_w_ptr.dtype.element_ty, INTERPRET)
        tl.store(grad_w_ptr + tl.where(is_w, cols, 0), w_val, mask=is_w)
        is_b = (cols >= n_wf) & (cols < n_wf + n_col)
        b_val = _round_to(acc, grad_b_ptr.dtype.element_ty, INTERPRET)
        tl.store(grad_b_ptr + tl.where(is_b, cols - n_wf, 0), b_val, mask=is_b)
        tl.store(loss_d_ptr + cols * 0, acc, mask=cols == n_wf + n_col)
        tl.store(loss_ge_ptr + cols * 0, acc, mask=cols == n_wf + n_col + 1)

    @triton.jit
    def _scale_sum_kernel(
        out_ptr,
        a_ptr,
        ga_ptr,
        b_ptr,
        gb_ptr,
        numel,
        HAS_B: tl.constexpr,
        BLOCK: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """out = ga·a (+ gb·b) in fp32, rounded once to out's dtype; ga and gb are 0-d fp32 device tensors
        (grad_outputs), read in the kernel so that no host sync is needed."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(ga_ptr)
        if HAS_B:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(gb_ptr)
        tl.store(out_ptr + offs, _round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)

else:  # no kernels without triton: every impl resolves to the reference or an error
    _kway_head_fwd_kernel = None


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


class _HeadConfig(NamedTuple):
    """How :func:`_launch_config` launches the fused forward for one shape."""

    block_n: int
    block_f: int
    block_c: int
    num_warps: int
    num_stages: int
    f_align: int  # F_ALIGN: the largest power of two (at most 16) that divides F
    row_blocks: int  # programs along the rows, one partial row each
    n_split: int  # programs along the features per row block (pass 2 split)
    f_per_split: int  # features of one split, a multiple of block_f
    stride_partial: int  # partial row stride: C·F + C + 2 rounded up to a multiple of 16 (64-byte rows)

    @property
    def grid(self) -> int:
        return self.row_blocks * self.n_split


@functools.cache
def _sm_count(index: int | None) -> int:
    """Streaming multiprocessors of CUDA device ``index``; 132 (H100/H200 SXM) where no device can be asked."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 132


def _launch_config(n: int, f: int, n_col: int, dtype: torch.dtype, device: torch.device) -> _HeadConfig:
    """The forward's tiles, warps, stages and feature split for N = ``n`` rows of F = ``f`` features.

    CUDA (issue 22 item 3; registers, spills, shared memory and CTAs/SM of each choice from bench/kernel_compile.py
    for sm_90, in bench/reports/). Roofline: the head is memory-bound at every shape (about 8·G·K FLOP per 6 bytes
    moved, against a bf16 balance of a few hundred); it moves about 3·N·F·s bytes of h and gradients plus one fp32
    dW partial row (G·K·F·4 bytes, written and read back) per row block; at N = 400 its floor is the two launches'
    latency, so what counts there is short programs on every SM.
    - Rows: 64-row tiles, 8 warps (the best of a sweep on an H100 at N = 8192, F = 1536, bf16; 1 CTA/SM) wherever
      the 64-row blocks times the feature tiles reach one program per SM; a smaller batch takes 16-row tiles,
      4 warps (at least 2 CTAs/SM in every compiled configuration), to shorten each program's serial work.
    - Features: pass 2 is split over the features, in whole BLOCK_F tiles, until the programs fill the resident
      slots (SMs × CTAs/SM). The split adds only L2 re-reads of h in pass 1, where smaller row tiles would add
      partial rows; at N = 8192 (128 blocks of 64 rows) there is no split.
    - BLOCK_F: bf16/fp16 256 (512 bytes of a row), 4 stages (3 with a 32-column W tile, G·K > 16). fp32 (FFMA,
      no tensor cores) 32, 128 bytes of a row: with 64 or 128 ptxas sits at 255 registers and spills in some
      specialisations, with 32 no fp32 configuration spills. Rows that do not start 16-byte aligned
      (F_ALIGN·s < 16, e.g. F = 307) cannot use 16-byte asynchronous copies, and their register-staged loads
      spill at 256: they take 64 (128 bytes). F_ALIGN tells the compiler how aligned the rows are (F = 1000: 8),
      so 16-byte aligned rows keep the pipelined, vectorised loads.
    The CPU interpreter gets small tiles (its cost grows with tile size) and splits over up to 8 programs, so that
    the twin tests run the split and its ragged last tile.
    """
    block_c = max(16, triton.next_power_of_2(n_col))
    f_align = min(16, f & -f)
    if device.type == "cpu":
        block_n, block_f_cap, num_warps, num_stages = 16, 32, 1, 1
        slots = 8
    else:
        block_f_cap = 256 if dtype.itemsize == 2 else 32
        if f_align * dtype.itemsize < 16:
            block_f_cap = min(block_f_cap, 128 // dtype.itemsize)
        num_stages = 4 if block_c <= 16 else 3
        n_sm = _sm_count(device.index)
        f_tiles = triton.cdiv(f, min(block_f_cap, max(16, triton.next_power_of_2(f))))
        if triton.cdiv(n, 64) * f_tiles >= n_sm:
            block_n, num_warps, slots = 64, 8, n_sm
        else:
            block_n, num_warps, slots = 16, 4, 2 * n_sm
    block_f = min(block_f_cap, max(16, triton.next_power_of_2(f)))
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    row_blocks = triton.cdiv(n, block_n)
    f_tiles = triton.cdiv(f, block_f)
    per_split = triton.cdiv(f_tiles, max(1, min(f_tiles, slots // row_blocks)))  # feature tiles per split
    stride_partial = triton.cdiv(n_col * f + n_col + 2, 16) * 16
    return _HeadConfig(
        block_n, block_f, block_c, num_warps, num_stages, f_align, row_blocks,
        triton.cdiv(f_tiles, per_split), per_split * block_f, stride_partial,
    )  # fmt: skip


def _reduce_config(n_part: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the partial reduction over ``n_part`` partial rows: narrow column blocks on CUDA
    so that enough programs share the read of the (n_part, C·F + C + 2) partials."""
    return min(64, triton.next_power_of_2(n_part)), (64 if device.type == "cuda" else 1024)


def _kway_head_fwd_triton(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the fused forward (one program per BLOCK_N rows and feature split) and the partial reduction."""
    h, weight, bias = h.contiguous(), weight.contiguous(), bias.contiguous()
    labels, w_true, w_pair = labels.contiguous(), w_true.contiguous(), w_pair.contiguous()
    n, f = h.shape
    n_col = weight.shape[0]
    cfg = _launch_config(n, f, n_col, h.dtype, h.device)
    interpret = h.device.type == "cpu"
    partial = torch.empty((cfg.row_blocks, cfg.stride_partial), dtype=torch.float32, device=h.device)
    grad_h_d = torch.empty_like(h)
    grad_h_ge = torch.empty_like(h)
    with device_guard(h):
        _kway_head_fwd_kernel[(cfg.grid,)](
            h, weight, bias, labels, w_true, w_pair, grad_h_d, grad_h_ge, partial,
            n, f, n_col // num_groups, inv_batch, cfg.stride_partial, cfg.n_split, cfg.f_per_split,
            NUM_GROUPS=num_groups, BLOCK_N=cfg.block_n, BLOCK_F=cfg.block_f, BLOCK_C=cfg.block_c,
            F_ALIGN=cfg.f_align, INTERPRET=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        grad_w = torch.empty_like(weight)
        grad_b = torch.empty_like(bias)
        loss_d = torch.empty((), dtype=torch.float32, device=h.device)
        loss_ge = torch.empty((), dtype=torch.float32, device=h.device)
        block_p, block_c = _reduce_config(cfg.row_blocks, h.device)
        _kway_head_reduce_kernel[(triton.cdiv(cfg.stride_partial, block_c),)](
            partial, grad_w, grad_b, loss_d, loss_ge, cfg.row_blocks, n_col * f, n_col, cfg.stride_partial,
            BLOCK_P=block_p, BLOCK_C=block_c, INTERPRET=interpret,
        )  # fmt: skip
    return loss_d, loss_ge, grad_h_d, grad_h_ge, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------------------
# Opaque to torch.compile and CUDA graphs; autograd scales the stored gradients.


@torch.library.custom_op("gali::kway_head_fwd", mutates_args=())
def _kway_head_fwd(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_d, loss_ge, B·grad_h_d, B·grad_h_ge, grad_w_d, grad_b_d), the gradients those of the losses (h's
    without the 1/B, see the kernel); ``num_groups`` groups of weight.shape[0] / num_groups classes (1:
    :func:`kway_head`)."""
    return _kway_head_fwd_triton(h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups)


@_kway_head_fwd.register_fake
def _(h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups=1):
    loss = h.new_empty((), dtype=torch.float32)
    grads = torch.empty_like(h), torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)
    return loss, torch.empty_like(loss), *grads


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[2:])
    ctx.inv_batch = inputs[6]
    ctx.mark_non_differentiable(*output[2:])
    # A loss that is not backpropagated arrives as None rather than a zero tensor, so its stored
    # gradient is never read.
    ctx.set_materialize_grads(False)


@torch.library.custom_op("gali::kway_head_scale", mutates_args=())
def _kway_head_scale(a: Tensor, ga: Tensor, b: Tensor | None, gb: Tensor | None) -> Tensor:
    """ga·a + gb·b (b, gb optional) for the stored h gradients: one pass at copy speed, where eager
    ``a * ga`` with a 0-d device tensor runs at half of it (stride-0 operand, not vectorised)."""
    out = torch.empty_like(a)
    block, num_warps = (1024, 4) if a.is_cuda else (8192, 1)
    with device_guard(a):
        _scale_sum_kernel[(triton.cdiv(a.numel(), block),)](
            out, a, ga.float(), a if b is None else b, ga.float() if gb is None else gb.float(), a.numel(),
            HAS_B=b is not None, BLOCK=block, INTERPRET=not a.is_cuda, num_warps=num_warps,
        )  # fmt: skip
    return out


@_kway_head_scale.register_fake
def _(a, ga, b, gb):
    return torch.empty_like(a)


def _backward(ctx, g_d: Tensor | None, g_ge: Tensor | None, *_unused: Tensor | None):
    grad_h_d, grad_h_ge, grad_w_d, grad_b_d = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = grad_w = grad_b = None
    if need_h:  # the stored B·grad_h, times the upstream gradient over B
        g_h_d, g_h_ge = (None if g is None else g * ctx.inv_batch for g in (g_d, g_ge))
        if g_h_d is not None:
            grad_h = _kway_head_scale(grad_h_d, g_h_d, None if g_h_ge is None else grad_h_ge, g_h_ge)
        elif g_h_ge is not None:
            grad_h = _kway_head_scale(grad_h_ge, g_h_ge, None, None)
    if g_d is not None:
        grad_w = grad_w_d * g_d if need_w else None
        grad_b = grad_b_d * g_d if need_b else None
    return grad_h, grad_w, grad_b, None, None, None, None, None


_kway_head_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------


def kway_head(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused K-way discriminator head: ``(loss_d, loss_ge)`` of GALI (see the module docstring).

    Args:
        h: (N, F) features from the discriminator trunk, fp32/bf16/fp16.
        weight: (K, F) head weight, 2 <= K <= 16, same dtype and device as h.
        bias: (K,) head bias, same dtype as h.
        labels: (N,) int64, each row's true class in [0, K) (not checked: see the module docstring).
        w_true: (K,) fp32, weight of the D term of a class-y row (paper: 2/K).
        w_pair: (K, K) fp32, w_pair[y, j] weighs CE(logits of a class-y row, j) in the G/E loss
            (paper: 2/(K(K-1)) off the diagonal, 0 on it; the authors' precedence bug is other weights).
        inv_batch: 1/B, B the rows per class (``nn.CrossEntropyLoss`` averages over the batch); a float.
        impl: 'auto' (Triton on CUDA tensors, the reference elsewhere), 'triton' or 'ref'.

    Returns:
        0-d fp32 ``loss_d`` and ``loss_ge``.

    Gradients: ``loss_d`` is differentiable w.r.t. h, weight and bias (the D update). ``loss_ge`` is
    differentiable w.r.t. h only (the G/E update reaches G and E through h; it never uses a gradient of
    the G/E loss w.r.t. D's head), so autograd gets None for weight and bias from it. Both losses come
    from one autograd node: pass ``retain_graph=True`` to the first of two ``torch.autograd.grad`` calls.
    """
    return _head("kway_head", h, weight, bias, labels, w_true, w_pair, inv_batch, 1, impl)


def kway_head_grouped(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused K-way head with ``num_groups`` groups of K logits, in one launch (see the module docstring).

    Group g's logits are columns [g·K, (g+1)·K) of ``h @ weight.T + bias``, each group with its own
    softmax over its K classes. All groups share ``labels``, ``w_true`` and ``w_pair``, and the losses are
    summed over the groups: ``loss_d = sum_g loss_d(group g)``, ``loss_ge = sum_g loss_ge(group g)``, each
    term as :func:`kway_head` computes it. ``num_groups = 1`` is :func:`kway_head`.

    BigBiGAN-style heads (unary-x, unary-z and joint scores, each from its own features) are this op over
    ``h = torch.cat([h_x, h_z, h_j], 1)`` with ``weight = torch.block_diag(W_x, W_z, W_j)`` (each group's
    rows zero outside its own block of features) and ``bias = torch.cat([b_x, b_z, b_j])``; autograd through
    ``cat`` and ``block_diag`` gives each block its own gradient, the same as three :func:`kway_head` calls
    summed.

    Args:
        h: (N, F) features, fp32/bf16/fp16.
        weight: (G·K, F), G = num_groups, 2 <= K <= 16 and G·K <= 32; same dtype and device as h.
        bias: (G·K,), same dtype as h.
        labels, w_true (K,), w_pair (K, K), inv_batch, impl: as in :func:`kway_head`, shared by all groups.
        num_groups: G >= 1, a Python int.

    Returns and gradients: as in :func:`kway_head` (``loss_d`` w.r.t. h, weight and bias; ``loss_ge``
    w.r.t. h only).
    """
    return _head("kway_head_grouped", h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups, impl)


def _head(
    name: str,
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """The one path behind :func:`kway_head` (num_groups = 1) and :func:`kway_head_grouped`."""
    if not use_triton(name, impl, h, _TRITON_DTYPES, _kway_head_fwd_kernel):
        _check_inputs(name, h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups, _REF_DTYPES)
        return _ref_losses(h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups)
    _check_inputs(name, h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups, _TRITON_DTYPES)
    loss_d, loss_ge, *_ = _kway_head_fwd(h, weight, bias, labels, w_true, w_pair, float(inv_batch), num_groups)
    return loss_d, loss_ge


# --- Input checks (every path) ---


def _check_inputs(
    name: str,
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    w_true: Tensor,
    w_pair: Tensor,
    inv_batch: float,
    num_groups: int,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    """Shape, dtype and device checks on metadata only (no host sync); errors name the op and the argument.
    num_groups = 1 (:func:`kway_head`) words the weight's shape as (K, F), more groups as (G·K, F)."""

    def fail(msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        fail(f"num_groups must be a Python int >= 1, got {num_groups!r}")
    if h.dim() != 2:
        fail(f"h must be 2-D (N, F), got shape {tuple(h.shape)}")
    if h.dtype not in dtypes:
        fail(f"h must have a dtype in {[str(d) for d in dtypes]}, got {h.dtype}")
    n, f = h.shape
    rows = "K" if num_groups == 1 else f"num_groups·K = {num_groups}·K"
    if weight.dim() != 2 or weight.shape[1] != f:
        fail(f"weight must have shape ({rows}, F={f}), got {tuple(weight.shape)}")
    n_col = weight.shape[0]
    if n_col % num_groups:
        fail(f"weight.shape[0] = {n_col} must be a multiple of num_groups = {num_groups}")
    k = n_col // num_groups
    if not 2 <= k <= K_MAX:
        where = "weight.shape[0]" if num_groups == 1 else "weight.shape[0] / num_groups"
        fail(f"K ({where}) must be in [2, {K_MAX}], got {k}")
    if n_col > COLS_MAX:
        fail(f"num_groups·K = {num_groups}·{k} = {n_col} logit columns exceed the supported maximum {COLS_MAX}")
    expected = {"weight": (weight, (n_col, f)), "bias": (bias, (n_col,)), "labels": (labels, (n,)),
                "w_true": (w_true, (k,)), "w_pair": (w_pair, (k, k))}  # fmt: skip
    for arg, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            fail(f"{arg} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != h.device:
            fail(f"{arg} must be on h's device {h.device}, got {t.device}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t.dtype != h.dtype:
            fail(f"{arg} must have h's dtype {h.dtype}, got {t.dtype}")
    if labels.dtype != torch.int64:
        fail(f"labels must be torch.int64, got {labels.dtype}")
    for arg, t in (("w_true", w_true), ("w_pair", w_pair)):
        if t.dtype != torch.float32:
            fail(f"{arg} must be torch.float32, got {t.dtype}")
    if isinstance(inv_batch, Tensor) or not isinstance(inv_batch, int | float) or not inv_batch > 0:
        fail(f"inv_batch must be a positive Python float (1/B), got {inv_batch!r}")
