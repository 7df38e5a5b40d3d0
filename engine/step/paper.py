"""The paper-structured step: the authors' code's structure, the baseline every step benchmark beats.

Same tuples, losses and update rule as :class:`gali.engine.step.eager.GaliStep`, built as the authors' scripts build
them (docs/method.md §3.6): one D call per tuple class (each with its own spectral-norm power iterations); K + K(K−1)
separate ``F.cross_entropy`` calls; box masks painted one sample at a time in a Python loop (each box read back to the
host); fp32, no CUDA graph, unfused Adam; the networks given it set to their reference layers
(``set_layer_impl(..., 'ref')``: every layer an ``nn.Conv2d``/``nn.ConvTranspose2d`` call); two full backward passes,
``loss_d.backward(retain_graph=True)`` then ``loss_ge.backward()``, keeping D's gradient from the first and G/E's from
the second. A measuring stick, not a training path: ``bench/test_step.py`` times it beside the fast step,
``tests/test_paper_step.py`` checks both compute the same update. Specs with cycle classes (D's pair head) are
refused: the authors' code has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gali.engine.errors import ConfigError
from gali.engine.method.chains import ChainEvaluator
from gali.engine.method.config import MethodConfig
from gali.engine.method.losses import loss_weights
from gali.engine.method.tuple_spec import IMAGE, Expr, TupleSpec
from gali.engine.nets.layers import set_layer_impl
from gali.engine.nets.networks import Networks
from gali.engine.step.config import OptimConfig
from gali.engine.step.optim import build_optimizers, trainable_parameters


class _PerSampleMaskChains(ChainEvaluator):
    """Chains whose mask and mix ops paint each sample's box in a Python loop."""

    def apply(self, node: Expr, args: list[Tensor], x: Tensor, z: Tensor, masks: dict[int, Tensor]) -> Tensor:
        if not node.op.startswith(("mask", "mix")):
            return super().apply(node, args, x, z, masks)
        image = args[0]
        mask = torch.zeros_like(image[:, :1])
        for i, (top, left, box_h, box_w) in enumerate(masks[int(node.op[-1])].tolist()):
            mask[i, :, top : top + box_h, left : left + box_w] = 1.0
        if node.op.startswith("mask"):
            return image * (1 - mask) + self.method.mask_fill * mask
        return image * (1 - mask) + args[1] * mask


class PaperStep:
    """The authors' step structure for any tuple spec; ``step(x, noise_std)`` returns the losses."""

    def __init__(
        self, nets: Networks, spec: TupleSpec, method: MethodConfig, optim: OptimConfig, latent_dim: int
    ) -> None:
        if spec.cycle_classes:
            raise ConfigError(
                "method.tuples",
                f"tuple spec '{spec.name}' names cycle_classes (D's pair head, docs/method.md §2.6), which the "
                "paper-structured step does not run (the authors' code has no pair head); train it with the eager "
                "or graphed step (gali.engine.step.build.build_step), or measure a spec without cycle_classes",
            )
        self.nets = nets
        for net in (nets.G, nets.E, nets.D):
            set_layer_impl(net, "ref")
        self.spec = spec
        self.latent_dim = latent_dim
        self.chains = _PerSampleMaskChains(nets, method)
        self.d_params = trainable_parameters(nets.D)
        self.ge_params = trainable_parameters(nets.G, nets.E)
        self.opt_d, self.opt_ge = build_optimizers(self.d_params, self.ge_params, optim)  # torch's default Adam
        self.w_true, self.w_pair = loss_weights(spec.num_classes, method.loss_weights)
        self.w_true, self.w_pair = self.w_true.tolist(), self.w_pair.tolist()
        self.alice_lambda = method.alice_lambda

    def losses(self, x: Tensor, noise_std: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss_d, loss_ge)`` from K separate D calls and K·K cross-entropy calls."""
        batch = x.shape[0]
        z = torch.randn(batch, self.latent_dim, device=x.device)
        values = self.chains.evaluate(self.spec, x, z)
        loss_d = loss_ge = torch.zeros((), device=x.device)
        for k, cls in enumerate(self.spec.classes):
            slots = []
            for expr, kind in zip(cls, self.spec.slot_kinds, strict=True):
                slot = values[expr]
                slots.append(slot + noise_std * torch.randn_like(slot) if kind == IMAGE else slot)
            groups = self.nets.D.head_weight()[2]  # BigBiGAN's D: unary image, unary latent and joint heads
            for logits in self.nets.D(slots).chunk(groups, dim=1):
                for j in range(self.spec.num_classes):
                    target = torch.full((batch,), j, dtype=torch.long, device=x.device)
                    if j == k:
                        loss_d = loss_d + self.w_true[k] * F.cross_entropy(logits, target)
                    else:
                        loss_ge = loss_ge + self.w_pair[k][j] * F.cross_entropy(logits, target)
        if self.spec.reconstruction is not None:
            target_expr, output_expr = self.spec.reconstruction
            loss_ge = loss_ge + self.alice_lambda * F.mse_loss(values[output_expr], values[target_expr])
        return loss_d, loss_ge

    def step(self, x: Tensor, noise_std: Tensor) -> dict[str, Tensor]:
        """One simultaneous update with two full backward passes."""
        loss_d, loss_ge = self.losses(x, noise_std)
        self.opt_d.zero_grad()
        self.opt_ge.zero_grad()
        loss_d.backward(retain_graph=True)
        d_grads = [p.grad.clone() for p in self.d_params]
        self.opt_d.zero_grad()
        self.opt_ge.zero_grad()
        loss_ge.backward()
        for param, grad in zip(self.d_params, d_grads, strict=True):
            param.grad = grad
        self.opt_d.step()
        self.opt_ge.step()
        return {"loss_d": loss_d.detach(), "loss_ge": loss_ge.detach()}
