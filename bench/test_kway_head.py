"""kway_head benchmarks: fused Triton head vs its reference twin vs the authors' per-term cross-entropies.

Run: ``pytest bench/test_kway_head.py``. On CUDA, docs/architecture.md's 8192 rows × 1536 features, K = 4 and 8 (G = 1,
and G = 3 grouped), bf16; elsewhere tiny shapes in Triton's CPU interpreter (a harness check). A timed call is a step's
forward, ``autograd.grad(loss_d, (h, W, b))`` and ``autograd.grad(loss_ge, h)``, then a sync.
impl: ``triton`` (:func:`kway_head` / :func:`kway_head_grouped`); ``triton-graph``, the same step replayed from a CUDA
graph; ``triton-fwd-graph``, the fused forward alone, graphed (what the architecture target times); ``ref`` and
``ref-graph``, the plain-PyTorch twins; ``eager-16-ce``, the authors' K + K(K-1) ``F.cross_entropy`` calls per group.
``extra_info["GB/s"]`` is one byte count over the median for every impl: 3·N·F·s + 2·C·F·s + small terms (s bytes per
element, C = G·K), what an ideal fused step must move. The ``*-graph`` impls run on CUDA only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from gali.kernels.kway_head import _kway_head_fwd, kway_head_grouped, kway_head_grouped_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (K, groups G, rows per class B, features F); N = K·B rows, G·K logit columns.
SHAPES = (
    [(4, 1, 2048, 1536), (8, 1, 1024, 1536), (4, 3, 2048, 1536), (8, 3, 1024, 1536)]
    if CUDA
    else [(4, 1, 16, 64), (8, 1, 8, 96), (4, 3, 16, 64)]
)
IMPLS = ["triton", "ref", "eager-16-ce"]
if CUDA:
    IMPLS += ["triton-graph", "triton-fwd-graph", "ref-graph"]


def eager_per_term_ce(h, weight, bias, labels, w_true, w_pair, inv_batch, num_groups) -> tuple[Tensor, Tensor]:
    """The authors' formulation (rows class-major, B = 1/inv_batch rows per class), once per group."""
    k = w_true.shape[0]
    batch = h.shape[0] // k
    targets = [torch.full((batch,), j, device=h.device) for j in range(k)]
    loss_d = loss_ge = 0.0
    for group in F.linear(h, weight, bias).float().chunk(num_groups, dim=1):
        logits = group.split(batch)
        loss_d = loss_d + sum(w_true[i] * F.cross_entropy(logits[i], targets[i]) for i in range(k))
        loss_ge = loss_ge + sum(
            w_pair[i, j] * F.cross_entropy(logits[i], targets[j]) for i in range(k) for j in range(k) if i != j
        )
    return loss_d, loss_ge


def make_inputs(k: int, groups: int, batch: int, f: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = k * batch
    w_true = torch.full((k,), 2.0 / k)
    w_pair = torch.full((k, k), 2.0 / (k * (k - 1)))
    w_pair.fill_diagonal_(0.0)
    return {
        "h": torch.randn(n, f, generator=g).to(DEVICE, DTYPE).requires_grad_(),
        "weight": (torch.randn(groups * k, f, generator=g) / f**0.5).to(DEVICE, DTYPE).requires_grad_(),
        "bias": torch.zeros(groups * k).to(DEVICE, DTYPE).requires_grad_(),
        "labels": torch.arange(k).repeat_interleave(batch).to(DEVICE),
        "w_true": w_true.to(DEVICE),
        "w_pair": w_pair.to(DEVICE),
        "inv_batch": 1.0 / batch,
        "num_groups": groups,
    }


def essential_bytes(k: int, groups: int, n: int, f: int) -> int:
    s = torch.finfo(DTYPE).bits // 8
    c = groups * k
    return 3 * n * f * s + 2 * c * f * s + 2 * c * s + 8 * n + 4 * (k + k * k)


def make_step(impl: str, inputs: dict):
    fn = {"triton": lambda **kw: kway_head_grouped(**kw, impl="triton"), "ref": kway_head_grouped_ref}.get(
        impl, eager_per_term_ce
    )
    h, weight, bias = inputs["h"], inputs["weight"], inputs["bias"]

    def step() -> None:
        loss_d, loss_ge = fn(**inputs)
        torch.autograd.grad(loss_d, (h, weight, bias), retain_graph=True)
        torch.autograd.grad(loss_ge, h)

    return step


def make_fwd(inputs: dict):
    args = [inputs[name].detach() for name in ("h", "weight", "bias", "labels", "w_true", "w_pair")]

    def fwd() -> None:
        _kway_head_fwd(*args, inputs["inv_batch"], inputs["num_groups"])

    return fwd


def shape_id(k: int, groups: int, batch: int, f: int) -> str:
    """K4-N8192-F1536 for one group (the ids of earlier runs), K4-G3-N8192-F1536 for three."""
    return f"K{k}-N{k * batch}-F{f}" if groups == 1 else f"K{k}-G{groups}-N{k * batch}-F{f}"


@pytest.mark.parametrize(("k", "groups", "batch", "f"), SHAPES, ids=[shape_id(*shape) for shape in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_kway_head(benchmark, cuda_graphed, impl: str, k: int, groups: int, batch: int, f: int) -> None:
    inputs = make_inputs(k, groups, batch, f)
    if impl == "triton-fwd-graph":
        work = cuda_graphed(make_fwd(inputs))
    elif impl.endswith("-graph"):
        work = cuda_graphed(make_step(impl.removesuffix("-graph"), inputs))
    else:
        work = make_step(impl, inputs)

    def timed() -> None:
        work()
        if CUDA:
            torch.cuda.synchronize()

    timed()  # compile / warm up outside the measurement
    benchmark(timed)
    n = k * batch
    nbytes = essential_bytes(k, groups, n, f)
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
            "dtype": str(DTYPE),
            "groups": groups,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "bytes": nbytes,
        }
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
