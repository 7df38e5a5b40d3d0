"""The chain evaluator: a tuple spec's chain variables for one batch, each distinct expression once.

``E(...)`` is the stochastic encoder's sample μ + σ·ε with its own ε per call, ``mu(...)`` its mean μ (one encoder
forward per distinct input, shared by ``E(img)`` and ``mu(img)``); ``G(...)`` the
generator; ``M(...)`` the frozen feature model (which resizes its input itself); ``mask<n>(img)`` and
``mix<n>(img, fill)`` the fused :func:`gali.kernels.mask_composite.mask_composite` with one box draw
per sample for each n, shared by every use of that n within the step; or, where the batch brings its
masks (``method.mask_source = "pipeline"``: uint8 (B, M, H, W), one per n in order), mask n is the
batch's, read by the op's dense kind.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import ENCODER_OPS, Expr, TupleSpec
from gali.engine.ranges import annotate
from gali.kernels.mask_composite import mask_composite, sample_box_params


class ChainNetworks(Protocol):
    """What the chains call: the encoder E (image -> (μ, log σ)), the generator G and the feature model M."""

    G: nn.Module
    E: nn.Module
    M: nn.Module | None


class ChainEvaluator:
    """Evaluates a spec's chain variables for one batch (x, z), each distinct expression once.

    ``encoding`` holds E's (μ, log σ) of the first E call on the real batch (E(x), or E of a masked
    x: an argument that does not depend on z) from the last :meth:`evaluate`, None if the spec has
    none: the step's diagnostics of whether E encodes.
    """

    def __init__(self, nets: ChainNetworks, method: MethodConfig, kernel_impl: str = "auto") -> None:
        self.nets = nets
        self.method = method
        self.kernel_impl = kernel_impl
        self.encoding: tuple[Tensor, Tensor] | None = None
        self.mask_kind = "box"  # of the masks of the last evaluate: 'box' (drawn here) or 'dense' (the batch's)
        self.labels: Tensor | None = None  # the labels of the last evaluate, for G
        self._encoded: dict[Expr, tuple[Tensor, Tensor]] = {}  # E's (μ, log σ) by input expression, per evaluate

    def evaluate(
        self, spec: TupleSpec, x: Tensor, z: Tensor, masks: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[Expr, Tensor]:
        """Every chain variable of ``spec``; ``masks`` (B, M, H, W) are the batch's, None draws boxes here;
        ``labels`` (B,) go to every G call (a class-conditional G's; an unconditional one ignores them)."""
        self.encoding = None
        self.labels = labels
        self._encoded = {}
        if masks is None:
            side = x.shape[-1]
            self.mask_kind = "box"
            drawn = {
                n: sample_box_params(
                    x.shape[0],
                    side,
                    side,
                    min_size=self.method.mask_min_size,
                    max_size=self.method.mask_max_size or side,
                    device=x.device,
                )
                for n in spec.mask_indices
            }
        else:
            if masks.shape[1] != len(spec.mask_indices):
                raise ValueError(
                    f"the batch has {masks.shape[1]} masks per image but tuple spec needs "
                    f"{len(spec.mask_indices)} (mask{list(spec.mask_indices)})"
                )
            self.mask_kind = "dense"
            drawn = {n: masks[:, slot] for slot, n in enumerate(spec.mask_indices)}
        values: dict[Expr, Tensor] = {}
        for node in spec.variables():
            values[node] = self.apply(node, [values[a] for a in node.args], x, z, drawn)
        self._encoded = {}  # the step's graph is not kept alive past it
        return values

    def apply(self, node: Expr, args: list[Tensor], x: Tensor, z: Tensor, masks: dict[int, Tensor]) -> Tensor:
        """One chain variable from its arguments' values; ``masks`` maps n to mask n (of ``mask_kind``)."""
        op = node.op
        if op == "x":
            return x
        if op == "z":
            return z
        if op in ENCODER_OPS:
            mu, log_sigma = self._encode(node.args[0], args[0])
            return mu if op == "mu" else mu + log_sigma.exp() * torch.randn_like(mu)
        if op == "G":
            return self.nets.G(args[0], self.labels)
        if op == "M":
            assert self.nets.M is not None, "a spec with M(...) needs the networks' feature model"
            return self.nets.M(args[0])
        params = masks[int(op[-1])]
        with annotate("gali/mask_composite"):
            if op.startswith("mask"):
                return mask_composite(
                    args[0], params, kind=self.mask_kind, fill=self.method.mask_fill, impl=self.kernel_impl
                ).masked
            # Under autocast G's output may be bf16 while x is fp32: the composite takes x's dtype.
            y = args[1].to(args[0].dtype)
            return mask_composite(
                args[0], params, y=y, kind=self.mask_kind, fill=self.method.mask_fill, impl=self.kernel_impl
            ).mix

    def _encode(self, expr: Expr, image: Tensor) -> tuple[Tensor, Tensor]:
        """E's (μ, log σ) of ``image`` (the value of ``expr``): one forward per distinct input within an evaluate."""
        if expr not in self._encoded:
            self._encoded[expr] = self.nets.E(image)
            if self.encoding is None and all(leaf.op != "z" for leaf in expr.walk()):
                self.encoding = self._encoded[expr]
        return self._encoded[expr]
