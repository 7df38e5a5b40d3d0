"""kway_head and kway_head_grouped: Triton kernel vs reference twin, forward and every gradient; hand-checked values.

Runs on CUDA when present, else in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 before the kernel is
imported), on small shapes. Tolerances, the same for the grouped form:
- fp32: Triton vs reference within the rounding of their longest sum (tests/tolerance.py: rtol = 8·eps·√n with n the
  larger of the rows and the features, atol scaled to the tensor's magnitude; only the summation order differs);
- bf16/fp16 (flash-attention's rule): the Triton path's error against the fp64 reference is at most twice the
  low-precision reference's own error, plus an atol of LOWP_ATOL × the largest magnitude, which covers entries the
  reference gets almost exact by luck while the kernel still rounds its 16-bit inputs to the dot products.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gali.kernels import _launch
from gali.kernels.kway_head import kway_head, kway_head_grouped, kway_head_grouped_ref, kway_head_ref
from tests.tolerance import assert_twins_close

pytestmark = pytest.mark.numerics  # parity of twins: run again under a second CPU kernel path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOWP_ATOL = {torch.bfloat16: 2e-3, torch.float16: 3e-4}  # relative to the largest magnitude; see above
NAMES = ("loss_d", "loss_ge", "dh_d", "dw_d", "db_d", "dh_ge", "dh_sum", "dw_sum", "db_sum")


def paper_weights(k: int) -> tuple[Tensor, Tensor]:
    """w_true = 2/K, w_pair = 2/(K(K-1)) off the diagonal (docs/method.md §1.6)."""
    w_true = torch.full((k,), 2.0 / k)
    w_pair = torch.full((k, k), 2.0 / (k * (k - 1)))
    w_pair.fill_diagonal_(0.0)
    return w_true, w_pair


def precedence_bug_weights(k: int) -> tuple[Tensor, Tensor]:
    """The authors' GALI-4 losses as written (docs/method.md §5 item 1): only the first term of each sum scaled."""
    w_true = torch.ones(k)
    w_true[0] = 2.0 / k
    w_pair = torch.ones(k, k)
    w_pair.fill_diagonal_(0.0)
    w_pair[0, 1] = 2.0 / (k * (k - 1))
    return w_true, w_pair


def make_case(
    batch: int,
    k: int,
    f: int,
    dtype: torch.dtype = torch.float32,
    weights: str = "paper",
    seed: int = 0,
    shuffle: bool = True,
) -> dict:
    """A head input: K classes of ``batch`` rows each (shuffled unless told), features of width f."""
    g = torch.Generator().manual_seed(seed)
    n = batch * k
    h = torch.randn(n, f, generator=g)
    weight = torch.randn(k, f, generator=g) * (2.0 / math.sqrt(f))
    bias = 0.5 * torch.randn(k, generator=g)
    labels = torch.arange(k).repeat_interleave(batch)
    if shuffle:
        labels = labels[torch.randperm(n, generator=g)]
    if weights == "paper":
        w_true, w_pair = paper_weights(k)
    elif weights == "minimax":  # the rejected objective of docs/method.md §1.4: L_GE = −L_D
        w_true, w_pair = paper_weights(k)
        w_pair = -torch.diag(w_true)
    elif weights == "bug":
        w_true, w_pair = precedence_bug_weights(k)
    else:
        w_true, w_pair = torch.rand(k, generator=g), torch.rand(k, k, generator=g)
    return {
        "h": h.to(DEVICE, dtype),
        "weight": weight.to(DEVICE, dtype),
        "bias": bias.to(DEVICE, dtype),
        "labels": labels.to(DEVICE),
        "w_true": w_true.to(DEVICE),
        "w_pair": w_pair.to(DEVICE),
        "inv_batch": 1.0 / batch,
    }


def as_dtype(case: dict, dtype: torch.dtype) -> dict:
    return {**case, **{name: case[name].to(dtype) for name in ("h", "weight", "bias")}}


def run(fn, case: dict) -> dict[str, Tensor]:
    """Losses and every gradient the training step takes: D w.r.t. (h, W, b), G/E w.r.t. h, and the
    combined backward of loss_d + loss_ge w.r.t. (h, W, b)."""
    leaves = [case[name].detach().requires_grad_() for name in ("h", "weight", "bias")]
    args = {**case, "h": leaves[0], "weight": leaves[1], "bias": leaves[2]}
    loss_d, loss_ge = fn(**args)
    dh_d, dw_d, db_d = torch.autograd.grad(loss_d, leaves, retain_graph=True)
    (dh_ge,) = torch.autograd.grad(loss_ge, leaves[0], retain_graph=True)
    dh_sum, dw_sum, db_sum = torch.autograd.grad(loss_d + loss_ge, leaves)
    values = (loss_d, loss_ge, dh_d, dw_d, db_d, dh_ge, dh_sum, dw_sum, db_sum)
    return {name: v.detach() for name, v in zip(NAMES, values, strict=True)}


def triton_fn(**kw) -> tuple[Tensor, Tensor]:
    return kway_head(**kw, impl="triton")


def assert_fp32_close(out: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    reduction = max(ref["dh_d"].shape)  # logits sum over the features, W's gradient over the rows
    for name in NAMES:
        assert_twins_close(out[name], ref[name], reduction=reduction, msg=name)


def assert_lowp_within_rule(out: dict[str, Tensor], ref: dict[str, Tensor], exact: dict[str, Tensor], dtype) -> None:
    """The bf16/fp16 rule of the module docstring: error vs fp64 <= 2 × the reference's + LOWP_ATOL · max."""
    for name in NAMES:
        assert out[name].dtype == ref[name].dtype, name
        truth = exact[name].double()
        ref_err = (ref[name].double() - truth).abs().max().item()
        err = (out[name].double() - truth).abs().max().item()
        bound = 2 * ref_err + LOWP_ATOL[dtype] * truth.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


# ----------------------------------------------------------------------------------------------------------
# Triton vs reference
# ----------------------------------------------------------------------------------------------------------

# (rows per class, K, F): batch 1 per class, K = 2..16, prime F, F across several 64-wide tiles, N across
# several 16-row blocks.
SHAPES = [(1, 2, 7), (3, 3, 13), (5, 4, 37), (2, 8, 29), (1, 16, 17), (7, 5, 131), (13, 4, 64), (4, 16, 67)]


@pytest.mark.parametrize(("batch", "k", "f"), SHAPES)
def test_fp32_matches_ref(batch: int, k: int, f: int) -> None:
    case = make_case(batch, k, f)
    assert_fp32_close(run(triton_fn, case), run(kway_head_ref, case))


@pytest.mark.parametrize("weights", ["bug", "random", "minimax"])
@pytest.mark.parametrize(("batch", "k", "f"), [(3, 2, 23), (3, 4, 23), (2, 8, 41)])
def test_non_uniform_weights_match_ref(batch: int, k: int, f: int, weights: str) -> None:
    case = make_case(batch, k, f, weights=weights)
    assert_fp32_close(run(triton_fn, case), run(kway_head_ref, case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "k", "f"), [(1, 2, 7), (5, 4, 37), (2, 8, 29), (4, 16, 67), (7, 5, 131)])
def test_low_precision_within_twice_ref_error(batch: int, k: int, f: int, dtype: torch.dtype) -> None:
    case = make_case(batch, k, f, dtype=dtype)
    exact = run(kway_head_ref, as_dtype(case, torch.float64))
    ref = run(kway_head_ref, case)
    assert_lowp_within_rule(run(triton_fn, case), ref, exact, dtype)


def test_output_dtypes_and_shapes() -> None:
    case = make_case(2, 4, 19, dtype=torch.bfloat16)
    out = run(triton_fn, case)
    assert out["loss_d"].shape == out["loss_ge"].shape == ()
    assert out["loss_d"].dtype == out["loss_ge"].dtype == torch.float32
    for name in ("dh_d", "dw_d", "db_d", "dh_ge"):
        assert out[name].dtype == torch.bfloat16, name


# ----------------------------------------------------------------------------------------------------------
# Grouped form: G groups of K logits, one softmax per group, losses summed over the groups
# ----------------------------------------------------------------------------------------------------------


def make_grouped_case(
    batch: int, k: int, groups: int, f: int, dtype: torch.dtype = torch.float32, weights: str = "paper"
) -> dict:
    """make_case's rows, labels and class weights with a (G·K, F) weight and (G·K,) bias."""
    case = make_case(batch, k, f, dtype=dtype, weights=weights)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(groups * k, f, generator=g) * (2.0 / math.sqrt(f))
    bias = 0.5 * torch.randn(groups * k, generator=g)
    return {**case, "weight": weight.to(DEVICE, dtype), "bias": bias.to(DEVICE, dtype), "num_groups": groups}


def triton_grouped_fn(**kw) -> tuple[Tensor, Tensor]:
    return kway_head_grouped(**kw, impl="triton")


# (rows per class, K, G, F): BigBiGAN's three groups with K = 4 and 8 (24 columns) at batch 1 per class and
# prime F; several row blocks and F tiles; 10 columns padded to 16; the 32-column maximum; G = 1.
GROUPED_SHAPES = [(1, 4, 3, 13), (1, 8, 3, 29), (5, 4, 3, 67), (2, 2, 5, 17), (1, 16, 2, 11), (3, 3, 1, 7)]


@pytest.mark.parametrize(("batch", "k", "groups", "f"), GROUPED_SHAPES)
def test_grouped_fp32_matches_ref(batch: int, k: int, groups: int, f: int) -> None:
    case = make_grouped_case(batch, k, groups, f)
    assert_fp32_close(run(triton_grouped_fn, case), run(kway_head_grouped_ref, case))


@pytest.mark.parametrize("weights", ["bug", "random"])
def test_grouped_non_uniform_weights_match_ref(weights: str) -> None:
    case = make_grouped_case(2, 4, 3, 23, weights=weights)
    assert_fp32_close(run(triton_grouped_fn, case), run(kway_head_grouped_ref, case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "k", "groups", "f"), [(1, 4, 3, 13), (1, 8, 3, 29), (5, 4, 3, 67)])
def test_grouped_low_precision_within_twice_ref_error(batch: int, k: int, groups: int, f: int, dtype) -> None:
    case = make_grouped_case(batch, k, groups, f, dtype=dtype)
    exact = run(kway_head_grouped_ref, as_dtype(case, torch.float64))
    assert_lowp_within_rule(run(triton_grouped_fn, case), run(kway_head_grouped_ref, case), exact, dtype)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_grouped_with_one_group_is_kway_head(impl: str) -> None:
    case = make_case(3, 5, 19)
    out = run(lambda **kw: kway_head_grouped(**kw, num_groups=1, impl=impl), case)
    ref = run(lambda **kw: kway_head(**kw, impl=impl), case)
    for name in NAMES:
        assert torch.equal(out[name], ref[name]), name


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_grouped_is_the_sum_over_groups_of_kway_head(impl: str) -> None:
    """The definition: group g is kway_head on all of h with rows [g·K, (g+1)·K) of weight and bias."""
    k, groups = 4, 3
    case = make_grouped_case(2, k, groups, 11)
    out = run(lambda **kw: kway_head_grouped(**kw, impl=impl), case)

    def summed(h, weight, bias, num_groups, **kw):
        terms = [kway_head_ref(h, w, b, **kw) for w, b in zip(weight.split(k), bias.split(k), strict=True)]
        return sum(t[0] for t in terms), sum(t[1] for t in terms)

    assert_fp32_close(out, run(summed, case))


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_grouped_block_diagonal_weight_is_three_separate_heads(impl: str) -> None:
    """BigBiGAN-style unary-x, unary-z and joint scores: h = [h_x | h_z | h_j], weight = block_diag(W_x, W_z,
    W_j). Losses and every gradient of the leaves equal those of three kway_head calls on the blocks."""
    k, batch, widths = 4, 2, (7, 5, 11)
    base = make_case(batch, k, 1)
    g = torch.Generator().manual_seed(2)
    blocks = [
        (
            torch.randn(k * batch, f, generator=g),
            torch.randn(k, f, generator=g) / math.sqrt(f),
            torch.randn(k, generator=g),
        )
        for f in widths
    ]
    leaves = [t.to(DEVICE).requires_grad_() for block in blocks for t in block]
    hs, ws, bs = leaves[0::3], leaves[1::3], leaves[2::3]
    shared = {name: base[name] for name in ("labels", "w_true", "w_pair", "inv_batch")}

    def grads(loss_d: Tensor, loss_ge: Tensor) -> list[Tensor]:
        d = torch.autograd.grad(loss_d, leaves, retain_graph=True)
        ge = torch.autograd.grad(loss_ge, hs, retain_graph=True)
        ge_wb = torch.autograd.grad(loss_ge, ws + bs, allow_unused=True)
        assert all(t is None or not t.any() for t in ge_wb)
        return [loss_d.detach(), loss_ge.detach(), *d, *ge]

    grouped = kway_head_grouped(
        torch.cat(hs, 1), torch.block_diag(*ws), torch.cat(bs), **shared, num_groups=3, impl=impl
    )
    separate = [kway_head(h, w, b, **shared, impl=impl) for h, w, b in zip(hs, ws, bs, strict=True)]
    want = grads(sum(t[0] for t in separate), sum(t[1] for t in separate))
    reduction = max(torch.cat(hs, 1).shape)
    for i, (got, expected) in enumerate(zip(grads(*grouped), want, strict=True)):
        assert_twins_close(got, expected, reduction=reduction, msg=f"output {i}")


def test_grouped_logit_gradients_are_per_group_softmax() -> None:
    """F = G·K, W = I, b = 0: dh is the logit gradient, each group's K columns that of its own softmax."""
    k, groups, batch = 3, 3, 2
    case = make_grouped_case(batch, k, groups, k * groups, weights="random")
    case["weight"] = torch.eye(k * groups, device=DEVICE)
    case["bias"] = torch.zeros(k * groups, device=DEVICE)
    out = run(triton_grouped_fn, case)
    y = case["labels"]
    w_pair = case["w_pair"][y]
    for g, cols in enumerate(case["h"].split(k, dim=1)):
        p = cols.softmax(dim=1)
        expected_d = case["inv_batch"] * case["w_true"][y, None] * (p - F.one_hot(y, k))
        expected_ge = case["inv_batch"] * (w_pair.sum(dim=1, keepdim=True) * p - w_pair)
        torch.testing.assert_close(out["dh_d"][:, g * k : (g + 1) * k], expected_d, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["dh_ge"][:, g * k : (g + 1) * k], expected_ge, rtol=1e-5, atol=1e-7)


def _with(case: dict, **changes) -> dict:
    return {**case, **changes}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: _with(c, num_groups=0), "num_groups must be a Python int >= 1, got 0"),
        (lambda c: _with(c, num_groups=-3), "num_groups must be a Python int >= 1, got -3"),
        (lambda c: _with(c, num_groups=3.0), "num_groups must be a Python int >= 1, got 3.0"),
        (lambda c: _with(c, num_groups=True), "num_groups must be a Python int >= 1, got True"),
        (lambda c: _with(c, num_groups=torch.tensor(3)), "num_groups must be a Python int >= 1"),
        (lambda c: _with(c, num_groups=4), r"weight.shape\[0\] = 9 must be a multiple of num_groups = 4"),
        (lambda c: _with(c, num_groups=9), r"K \(weight.shape\[0\] / num_groups\) must be in \[2, 16\], got 1"),
        (lambda c: _with(c, weight=c["weight"][:, :-1]), r"weight must have shape \(num_groups·K = 3·K, F=5\)"),
        (
            lambda c: _with(c, weight=c["weight"].repeat(4, 1), bias=c["bias"].repeat(4)),
            r"num_groups·K = 3·12 = 36 logit columns exceed the supported maximum 32",
        ),
        (lambda c: _with(c, bias=c["bias"][:3]), r"bias must have shape \(9,\), got \(3,\)"),
        (lambda c: _with(c, w_true=c["w_true"].repeat(3)), r"w_true must have shape \(3,\), got \(9,\)"),
        (lambda c: _with(c, w_pair=torch.zeros(9, 9, device=DEVICE)), r"w_pair must have shape \(3, 3\)"),
    ],
)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_grouped_bad_inputs_name_the_argument(change, match: str, impl: str) -> None:
    case = change(make_grouped_case(1, 3, 3, 5))
    with pytest.raises(ValueError, match=f"^kway_head_grouped: {match}"):
        kway_head_grouped(**case, impl=impl)
    if impl == "ref":
        with pytest.raises(ValueError, match=f"^kway_head_grouped: {match}"):
            kway_head_grouped_ref(**case)


def test_grouped_opcheck_and_compile() -> None:
    case = make_grouped_case(1, 4, 3, 9)
    args = (case["h"].requires_grad_(), case["weight"].requires_grad_(), case["bias"].requires_grad_(),
            case["labels"], case["w_true"], case["w_pair"], case["inv_batch"], 3)  # fmt: skip
    torch.library.opcheck(torch.ops.gali.kway_head_fwd.default, args)

    def step(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        loss_d, loss_ge = kway_head_grouped(torch.tanh(h), weight, bias, *args[3:], impl="triton")
        return 2.0 * loss_d + loss_ge

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*args[:3]), args[:3])
    for got, want in zip(grads, torch.autograd.grad(step(*args[:3]), args[:3]), strict=True):
        assert_twins_close(got, want, reduction=max(args[0].shape))


# ----------------------------------------------------------------------------------------------------------
# Gradient semantics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [triton_fn, kway_head_ref], ids=["triton", "ref"])
def test_loss_ge_has_no_weight_or_bias_gradient(fn) -> None:
    case = make_case(2, 4, 11)
    weight = case["weight"].requires_grad_()
    bias = case["bias"].requires_grad_()
    _, loss_ge = fn(**{**case, "h": case["h"].requires_grad_()})
    for grad in torch.autograd.grad(loss_ge, (weight, bias), allow_unused=True):
        assert grad is None or not grad.any()


def test_backward_scales_by_grad_output() -> None:
    case = make_case(3, 4, 21)
    h = case["h"].requires_grad_()
    loss_d, loss_ge = triton_fn(**{**case, "h": h})
    (grad,) = torch.autograd.grad(3.0 * loss_d - 0.5 * loss_ge, h)
    base = run(kway_head_ref, case)
    assert_twins_close(grad, 3.0 * base["dh_d"] - 0.5 * base["dh_ge"], reduction=max(h.shape))


def test_fp16_h_gradient_keeps_its_precision_under_a_loss_scale() -> None:
    """Issue 22, finding 15: at a large batch and small head weights, grad_h = u·W/B lies below fp16's normal range
    (6.1e-5). The kernel keeps B·grad_h and divides by B with the upstream gradient (the loss scale under fp16), so
    the scaled gradient keeps fp16's relative precision instead of a subnormal's."""
    case = make_case(3, 4, 64, weights="paper", seed=3)
    case = {**case, "weight": case["weight"] * 0.05, "inv_batch": 1.0 / 4096}  # B = 4096 rows per class
    exact = run(
        lambda **kw: tuple(65536.0 * loss for loss in kway_head_ref(**kw)), {**case, **as_dtype(case, torch.float64)}
    )
    out = run(lambda **kw: tuple(65536.0 * loss for loss in triton_fn(**kw)), as_dtype(case, torch.float16))
    for name in ("dh_d", "dh_ge", "dh_sum"):
        truth = exact[name]
        assert truth.abs().max() / 65536 < 6.1e-5  # unscaled, every entry of grad_h is fp16-subnormal
        err = (out[name].double() - truth).abs().max() / truth.abs().max()
        assert err < 4e-3, f"{name}: relative error {err:.2g}"  # a few fp16 roundings (eps 9.8e-4)


# ----------------------------------------------------------------------------------------------------------
# Values checked by hand and invariants
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_hand_computed_values(impl: str) -> None:
    """K = 2, F = 1, W = [[1], [0]], b = 0: logits (h, 0). Row 0 (class 0) h = ln 3, p = (3/4, 1/4); row 1
    (class 1) h = 0, p = (1/2, 1/2). Paper weights for K = 2 are all 1; inv_batch = 1/2.
    loss_d  = 1/2 (ln 4/3 + ln 2) = 1/2 ln 8/3;  loss_ge = 1/2 (ln 4 + ln 2) = 1/2 ln 8.
    dlogit_d = 1/2 [(-1/4, 1/4), (1/2, -1/2)]  -> dh_d = 1/2 (-1/4, 1/2), dW_d = 1/2 (-ln3/4, ln3/4),
                                                   db_d = 1/2 (1/4, -1/4).
    dlogit_ge = 1/2 [(3/4, -3/4), (-1/2, 1/2)] -> dh_ge = 1/2 (3/4, -1/2)."""
    w_true, w_pair = paper_weights(2)
    case = {
        "h": torch.tensor([[math.log(3.0)], [0.0]], device=DEVICE),
        "weight": torch.tensor([[1.0], [0.0]], device=DEVICE),
        "bias": torch.zeros(2, device=DEVICE),
        "labels": torch.tensor([0, 1], device=DEVICE),
        "w_true": w_true.to(DEVICE),
        "w_pair": w_pair.to(DEVICE),
        "inv_batch": 0.5,
    }
    out = run(lambda **kw: kway_head(**kw, impl=impl), case)
    ln3 = math.log(3.0)
    expected = {
        "loss_d": torch.tensor(0.5 * math.log(8.0 / 3.0)),
        "loss_ge": torch.tensor(0.5 * math.log(8.0)),
        "dh_d": torch.tensor([[-0.125], [0.25]]),
        "dw_d": torch.tensor([[-ln3 / 8], [ln3 / 8]]),
        "db_d": torch.tensor([0.125, -0.125]),
        "dh_ge": torch.tensor([[0.375], [-0.25]]),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out[name].cpu(), value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("weights", ["paper", "random"])
def test_logit_gradients_match_formula_and_sum_to_zero(weights: str) -> None:
    """With F = K and W = I, b = 0 the logits are h itself, so dh is the logit gradient: it must equal
    1/B w_true[y] (p - onehot(y)) and 1/B (S_y p - w_pair[y]), and each row must sum to zero."""
    k, batch = 5, 3
    case = make_case(batch, k, k, weights=weights)
    case["weight"] = torch.eye(k, device=DEVICE)
    case["bias"] = torch.zeros(k, device=DEVICE)
    out = run(triton_fn, case)
    p = case["h"].softmax(dim=1)
    y = case["labels"]
    w_pair = case["w_pair"][y]
    expected_d = case["inv_batch"] * case["w_true"][y, None] * (p - F.one_hot(y, k))
    expected_ge = case["inv_batch"] * (w_pair.sum(dim=1, keepdim=True) * p - w_pair)
    torch.testing.assert_close(out["dh_d"], expected_d, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["dh_ge"], expected_ge, rtol=1e-5, atol=1e-7)
    eps = torch.finfo(torch.float32).eps
    for name in ("dh_d", "dh_ge"):  # zero up to a few fp32 roundings of the row's entries
        row_sums = out[name].sum(dim=1).abs()
        assert (row_sums <= 8 * eps * out[name].abs().sum(dim=1)).all(), (name, row_sums)
    # Summed over classes, the bias gradient vanishes too (a sum of zero-sum rows).
    assert out["db_d"].sum().abs() <= 1e-6 * out["db_d"].abs().max()


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_k2_paper_weights_are_the_standard_gan_losses(impl: str) -> None:
    """K = 2 with paper weights (all 1) is ALI: with s = logit_0 - logit_1, loss_d is BCE-with-logits of s
    against 1 on class-0 rows and 0 on class-1 rows (each averaged over its B rows), and loss_ge is the
    non-saturating G loss, the same with the labels swapped (docs/method.md §1.2)."""
    batch = 6
    case = make_case(batch, 2, 17, shuffle=False)
    out = run(lambda **kw: kway_head(**kw, impl=impl), case)
    h = case["h"].detach().requires_grad_()
    logits = F.linear(h, case["weight"], case["bias"])
    s = logits[:, 0] - logits[:, 1]
    real, fake = s[:batch], s[batch:]
    bce = F.binary_cross_entropy_with_logits
    loss_d = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    loss_g = bce(real, torch.zeros_like(real)) + bce(fake, torch.ones_like(fake))
    (dh_d,) = torch.autograd.grad(loss_d, h, retain_graph=True)
    (dh_g,) = torch.autograd.grad(loss_g, h)
    torch.testing.assert_close(out["loss_d"], loss_d, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_ge"], loss_g, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["dh_d"], dh_d, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out["dh_ge"], dh_g, rtol=1e-5, atol=1e-8)


def authors_formulation(h: Tensor, weight: Tensor, bias: Tensor, w_true: Tensor, w_pair: Tensor, batch: int):
    """The authors' code: one CE call per (class, target) pair on class-major rows (docs/method.md §1.3, §1.5)."""
    k = weight.shape[0]
    logits = F.linear(h, weight, bias).split(batch)
    loss_d = sum(w_true[i] * F.cross_entropy(logits[i], torch.full((batch,), i)) for i in range(k))
    loss_ge = sum(
        w_pair[i, j] * F.cross_entropy(logits[i], torch.full((batch,), j)) for i in range(k) for j in range(k) if j != i
    )
    return loss_d, loss_ge


@pytest.mark.parametrize("weights", ["paper", "bug"])
def test_matches_the_authors_per_term_cross_entropies(weights: str) -> None:
    batch = 3
    case = make_case(batch, 4, 10, weights=weights, shuffle=False)
    cpu = {name: v.cpu() if isinstance(v, Tensor) else v for name, v in case.items()}
    loss_d, loss_ge = authors_formulation(cpu["h"], cpu["weight"], cpu["bias"], cpu["w_true"], cpu["w_pair"], batch)
    out = run(triton_fn, case)
    torch.testing.assert_close(out["loss_d"].cpu(), loss_d, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_ge"].cpu(), loss_ge, rtol=1e-5, atol=0)


def test_rows_with_out_of_range_labels_contribute_nothing() -> None:
    """Documented Triton-path behaviour (labels are not checked, to avoid a host sync)."""
    case = make_case(3, 4, 13)
    bad = {**case, "labels": case["labels"].clone()}
    bad["labels"][[2, 5]] = torch.tensor([-1, 4], device=DEVICE)
    keep = torch.ones(12, dtype=torch.bool, device=DEVICE)
    keep[[2, 5]] = False
    good = {**case, "h": case["h"][keep], "labels": case["labels"][keep]}
    out_bad, out_good = run(triton_fn, bad), run(triton_fn, good)
    for name in ("loss_d", "loss_ge", "dw_d", "db_d"):
        assert_twins_close(out_bad[name], out_good[name], reduction=max(case["h"].shape), msg=name)
    assert not out_bad["dh_d"][~keep].any() and not out_bad["dh_ge"][~keep].any()


def test_deterministic() -> None:
    case = make_case(5, 8, 37)
    first, second = run(triton_fn, case), run(triton_fn, case)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


def test_auto_picks_triton_on_cuda_only() -> None:
    case = make_case(2, 3, 9)
    out, ref = run(kway_head, case), run(kway_head_ref, case)
    if DEVICE.type == "cpu":
        for name in NAMES:
            assert torch.equal(out[name], ref[name]), name
    else:
        assert_fp32_close(out, ref)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(h=c["h"][0]), "h must be 2-D"),
        (lambda c: c.update(h=c["h"].double()), "h must have a dtype"),
        (lambda c: c.update(weight=c["weight"][:, :-1]), r"weight must have shape \(K, F=9\)"),
        (lambda c: c.update(weight=c["weight"][:1], bias=c["bias"][:1]), r"K \(weight.shape\[0\]\) must be in"),
        (lambda c: c.update(weight=c["weight"].repeat(6, 1)), r"K \(weight.shape\[0\]\) must be in \[2, 16\], got 18"),
        (lambda c: c.update(bias=c["bias"][:-1]), r"bias must have shape \(3,\), got \(2,\)"),
        (lambda c: c.update(bias=c["bias"].half()), "bias must have h's dtype"),
        (lambda c: c.update(labels=c["labels"].int()), "labels must be torch.int64, got torch.int32"),
        (lambda c: c.update(labels=c["labels"][:-1]), r"labels must have shape \(6,\)"),
        (lambda c: c.update(w_true=c["w_true"].double()), "w_true must be torch.float32"),
        (lambda c: c.update(w_pair=c["w_pair"][:, :2]), r"w_pair must have shape \(3, 3\)"),
        (lambda c: c.update(inv_batch=torch.tensor(0.5)), "inv_batch must be a positive Python float"),
        (lambda c: c.update(inv_batch=0.0), "inv_batch must be a positive Python float"),
    ],
)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_bad_inputs_name_the_argument(change, match: str, impl: str) -> None:
    case = make_case(2, 3, 9)
    change(case)
    if impl == "ref" and match == "h must have a dtype":
        match = "weight must have h's dtype"  # the reference takes fp64 h (the tests' ground truth)
    with pytest.raises(ValueError, match=match):
        kway_head(**case, impl=impl)


def test_bad_impl() -> None:
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'ref'\), got 'cuda'"):
        kway_head(**make_case(1, 2, 4), impl="cuda")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(_launch, "InterpretedFunction", type("NotTheKernelsType", (), {}))
    cpu_case = {name: v.cpu() if isinstance(v, Tensor) else v for name, v in make_case(1, 2, 4).items()}
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*impl='ref'"):
        kway_head(**cpu_case, impl="triton")


def test_triton_missing_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(_launch, "triton", None)
    with pytest.raises(RuntimeError, match=r"needs the triton package.*impl='ref'"):
        kway_head(**make_case(1, 2, 4), impl="triton")
    loss_d, _ = kway_head(**make_case(1, 2, 4), impl="auto")  # auto falls back to the reference
    assert torch.isfinite(loss_d)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ----------------------------------------------------------------------------------------------------------


def test_opcheck() -> None:
    case = make_case(2, 3, 9)
    args = (case["h"].requires_grad_(), case["weight"].requires_grad_(), case["bias"].requires_grad_(),
            case["labels"], case["w_true"], case["w_pair"], case["inv_batch"])  # fmt: skip
    torch.library.opcheck(torch.ops.gali.kway_head_fwd.default, args)
    a, b = case["h"].detach(), case["h"].detach().flip(0)
    ga, gb = torch.tensor(0.5, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    torch.library.opcheck(torch.ops.gali.kway_head_scale.default, (a, ga, b, gb))
    torch.library.opcheck(torch.ops.gali.kway_head_scale.default, (a, ga, None, None))
    torch.testing.assert_close(torch.ops.gali.kway_head_scale(a, ga, b, gb), 0.5 * a - 2.0 * b)


def _compiled_step(h: Tensor, weight: Tensor, bias: Tensor, case: dict) -> Tensor:
    features = torch.tanh(h)
    loss_d, loss_ge = kway_head(features, weight, bias, case["labels"], case["w_true"], case["w_pair"],
                                case["inv_batch"], impl="triton")  # fmt: skip
    return 2.0 * loss_d + loss_ge


def _compile_check(backend: str) -> None:
    case = make_case(3, 4, 12)
    leaves = [case[name].requires_grad_() for name in ("h", "weight", "bias")]
    compiled = torch.compile(_compiled_step, backend=backend, fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves, case), leaves)
    expected = torch.autograd.grad(_compiled_step(*leaves, case), leaves)
    for got, want in zip(grads, expected, strict=True):
        assert_twins_close(got, want, reduction=max(case["h"].shape))


def test_torch_compile_aot_eager_fullgraph() -> None:
    """Dynamo + AOTAutograd see the custom op as one node (fullgraph: no graph break), fake and autograd
    registrations included."""
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    """Inductor compiles the surrounding code (C++ on CPU, ~20 s on 2 cores) around the opaque op."""
    _compile_check("inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture() -> None:
    """Forward and both backward calls of the training step capture into one CUDA graph (no host sync)."""
    case = make_case(8, 4, 96)
    h, weight, bias = (case[name].requires_grad_() for name in ("h", "weight", "bias"))

    def step() -> tuple[Tensor, ...]:
        loss_d, loss_ge = triton_fn(**case)
        grads = torch.autograd.grad(loss_d, (h, weight, bias), retain_graph=True)
        return loss_d, loss_ge, *grads, *torch.autograd.grad(loss_ge, h)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles the kernels) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        h.mul_(-0.5)  # new values in the static input: the replay must match an eager step on them
    graph.replay()
    for got, want in zip(captured, step(), strict=True):
        assert torch.equal(got, want)
