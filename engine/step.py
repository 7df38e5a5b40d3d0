"""The training step: chains → K tuples → one D call → K-way head → both updates.

The step is small and capturable: static shapes, noise drawn on the device, no ``.item()``, no
host sync and no Python branching on tensor values. The instance-noise std arrives as a 0-d
tensor so a schedule can change it between CUDA-graph replays. Statistics come back as detached
device tensors; the training loop reads them once per tick.

Update rules (GALI.md §3.6, §5 item 10):
  * n_dis = 1, phase 'both': the simultaneous update. One forward; ∂L_D/∂θ_D and ∂L_GE/∂θ_GE
    are taken from the same graph with ``torch.autograd.grad`` (each only into its own
    parameters), then both optimizers step. The G/E gradient therefore sees D's pre-update
    parameters, which is what the authors' code meant, without its in-place-modification error.
  * n_dis > 1: alternating phases; 'd' steps D only (chains evaluated without a graph into G and
    E), 'ge' steps G and E only. The loop picks the phase from its iteration counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.config import MethodConfig, OptimConfig
from gali.engine.losses import loss_weights, reconstruction_loss, true_class_probability
from gali.engine.tuples import IMAGE, Expr, TupleSpec
from gali.kernels.kway_head import kway_head
from gali.kernels.mask_composite import mask_composite, sample_box_params

PHASES = ("both", "d", "ge")


@dataclass
class Networks:
    """The three trained networks and the optional frozen feature model M."""

    G: nn.Module
    E: nn.Module
    D: nn.Module
    M: nn.Module | None = None
    extra_dim: int | None = None  # width of M's features, the size of D's extra slots


class ChainEvaluator:
    """Evaluates a spec's chain variables for one batch, each distinct expression once.

    Every E(...) draws its own ε; every mask<n> is one fresh box draw per sample shared by all
    uses of that n within the step. Call counters let tests check the cost of a spec.
    """

    def __init__(self, nets: Networks, method: MethodConfig) -> None:
        self.nets = nets
        self.method = method
        self.calls = {"E": 0, "G": 0, "M": 0}

    def evaluate(self, spec: TupleSpec, x: Tensor, z: Tensor) -> dict[Expr, Tensor]:
        side = x.shape[-1]
        max_size = self.method.mask_max_size or side
        masks = {
            n: sample_box_params(x.shape[0], side, side, min_size=self.method.mask_min_size,
                                 max_size=max_size, device=x.device)
            for n in spec.mask_indices
        }
        values: dict[Expr, Tensor] = {}
        for node in spec.variables():
            values[node] = self._apply(node, [values[a] for a in node.args], x, z, masks)
        return values

    def _apply(self, node: Expr, args: list[Tensor], x: Tensor, z: Tensor, masks: dict[int, Tensor]) -> Tensor:
        op = node.op
        if op == "x":
            return x
        if op == "z":
            return z
        if op in self.calls:
            self.calls[op] += 1
        if op == "E":
            mu, log_sigma = self.nets.E(args[0])
            return mu + log_sigma.exp() * torch.randn_like(mu)
        if op == "G":
            return self.nets.G(args[0])
        if op == "M":
            return self.nets.M(self._feature_input(args[0])).flatten(1)
        impl = self.method.kernel_impl
        params = masks[int(op[-1])]
        if op.startswith("mask"):
            return mask_composite(args[0], params, fill=self.method.mask_fill, impl=impl).masked
        return mask_composite(args[0], params, y=args[1], fill=self.method.mask_fill, impl=impl).mix

    def _feature_input(self, image: Tensor) -> Tensor:
        size = self.method.feature_input_size
        if not size or size == image.shape[-1]:
            return image
        mode = self.method.feature_resize
        return F.interpolate(image, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


class GaliStep:
    """One GALI training step for a tuple spec; owns both optimizers.

    ``step(x, noise_std, phase)`` returns detached device tensors: ``loss_d``, ``loss_ge``,
    ``p_true`` (K,) (D's mean probability for each class's own class) and, for ALICE specs,
    ``recon``.
    """

    def __init__(self, nets: Networks, spec: TupleSpec, method: MethodConfig, optim: OptimConfig,
                 latent_dim: int) -> None:
        self.nets = nets
        self.spec = spec
        self.method = method
        self.latent_dim = latent_dim
        self.chains = ChainEvaluator(nets, method)
        self.d_params = [p for p in nets.D.parameters() if p.requires_grad]
        self.ge_params = [p for m in (nets.G, nets.E) for p in m.parameters() if p.requires_grad]
        betas = (optim.beta1, optim.beta2)
        self.opt_d = torch.optim.Adam(self.d_params, lr=optim.lr, betas=betas)
        self.opt_ge = torch.optim.Adam(self.ge_params, lr=optim.lr, betas=betas)
        device = next(nets.D.parameters()).device
        w_true, w_pair = loss_weights(spec.num_classes, method.loss_weights)
        self.w_true, self.w_pair = w_true.to(device), w_pair.to(device)

    def discriminate(self, x: Tensor, noise_std: Tensor, *, chains_grad: bool = True) -> dict[str, Tensor]:
        """Forward only: chains, tuples, one D call, both losses (graph kept for the updates)."""
        batch = x.shape[0]
        k = self.spec.num_classes
        z = torch.randn(batch, self.latent_dim, device=x.device)
        with torch.set_grad_enabled(chains_grad and torch.is_grad_enabled()):
            values = self.chains.evaluate(self.spec, x, z)
        slots = []
        for position, kind in enumerate(self.spec.slot_kinds):
            slot = torch.cat([values[cls[position]] for cls in self.spec.classes])
            if kind == IMAGE:  # instance noise on every image D sees, fresh per row
                slot = slot + noise_std * torch.randn_like(slot)
            slots.append(slot)
        labels = torch.arange(k, device=x.device).repeat_interleave(batch)
        features = self.nets.D.features(slots)
        # Read the spectral-normalised weight once: each read runs a power iteration.
        weight, bias = self.nets.D.head.weight, self.nets.D.head.bias
        loss_d, loss_ge = kway_head(features, weight, bias, labels, self.w_true, self.w_pair, 1.0 / batch,
                                    impl=self.method.kernel_impl)
        with torch.no_grad():
            logits = F.linear(features, weight, bias)
        out = {"loss_d": loss_d, "loss_ge": loss_ge, "p_true": true_class_probability(logits, labels, k)}
        if self.spec.reconstruction is not None:
            target, output = self.spec.reconstruction
            recon = reconstruction_loss(values[target], values[output])
            out["recon"] = recon
            out["loss_ge"] = loss_ge + self.method.alice_lambda * recon
        return out

    def step(self, x: Tensor, noise_std: Tensor, phase: str = "both") -> dict[str, Tensor]:
        """One update; ``phase`` is 'both' (simultaneous), 'd' or 'ge' (alternating)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        out = self.discriminate(x, noise_std, chains_grad=phase != "d")
        if phase in ("both", "d"):
            grads = torch.autograd.grad(out["loss_d"], self.d_params, retain_graph=phase == "both")
            _set_grads(self.d_params, grads)
        if phase in ("both", "ge"):
            grads = torch.autograd.grad(out["loss_ge"], self.ge_params)
            _set_grads(self.ge_params, grads)
        if phase in ("both", "d"):
            self.opt_d.step()
        if phase in ("both", "ge"):
            self.opt_ge.step()
        return {name: value.detach() for name, value in out.items()}


def _set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad


def instance_noise_std(method: MethodConfig, epoch: int, num_epochs: int) -> float:
    """σ for a 1-based ``epoch`` of ``num_epochs``: the authors' linear decay or a constant."""
    if method.noise_schedule == "constant":
        return method.instance_noise
    return method.instance_noise * max(num_epochs - epoch, 0) / num_epochs
