"""The training step: chains → K tuples → one D call → K-way head → both updates.

The step is capturable: static shapes, noise drawn on the device, no ``.item()``, no host sync, no Python branching on
tensor values; the instance-noise std is a 0-d tensor, so a schedule can change it between CUDA-graph replays.
Statistics come back as detached device tensors. :meth:`GaliStep.update` is shared by :class:`GaliStep` (eager, the twin
and the CPU path) and :class:`gali.engine.step.graphed.GraphedStep` (static buffers, on CUDA one graph per phase).
Update rules (docs/method.md §3.6, §5 item 10): with n_dis = 1 (phase 'both') one forward, then ∂L_D/∂θ_D and
∂L_GE/∂θ_GE from the same graph by ``torch.autograd.grad``, each into its own parameters, then both optimizers step: the
G/E gradient sees D's pre-update parameters. With n_dis > 1 phases alternate: 'd' steps D only (chains without a graph
into G and E), 'ge' steps G and E only. With ``accumulate`` = N > 1 the update's batch is split into N
micro-batches, each with its own forward and backward (BatchNorm statistics per micro-batch, as BigGAN-PyTorch), their
gradients summed, then averaged over the ranks once per side: each side steps with the mean gradient of the N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.method.chains import ChainEvaluator
from gali.engine.method.config import MethodConfig
from gali.engine.method.losses import (
    loss_weights,
    misclassification_loss,
    reconstruction_loss,
    true_class_probability,
)
from gali.engine.method.tuple_spec import IMAGE, TupleSpec
from gali.engine.nets.feature_models import resize_to
from gali.engine.nets.inference import encoding_stats
from gali.engine.nets.networks import Networks
from gali.engine.ranges import annotate
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.optim import build_optimizers, trainable_parameters
from gali.engine.step.precision import fp32_spectral_norm, resolve_precision
from gali.engine.step.reduce import average_gradients
from gali.kernels.kway_head import kway_head, kway_head_grouped, kway_losses

PHASES = ("both", "d", "ge")


class GaliStep:
    """One GALI training step for a tuple spec, run eagerly; owns both optimizers (and scalers).

    ``step(x, noise_std, phase)`` returns detached device tensors: ``loss_d``, ``loss_ge``,
    ``p_true`` (K,) (D's mean probability for each class's own class), ``e_sigma`` / ``e_mu_spread``
    (E's mean σ and μ spread on the real batch: :func:`gali.engine.nets.inference.encoding_stats`), ``grad_norm_d`` /
    ``grad_norm_ge`` and ``skipped_d`` / ``skipped_ge`` (unscaled norms, and 1.0 where a non-finite
    loss or gradient skipped that side's update; for the side(s) the phase updates), for ALICE
    specs ``recon``, and for specs with cycle classes the pair head's ``cycle_d``, ``cycle_ge`` (unweighted; both
    losses include ``method.cycle_lambda`` times them) and ``p_true_cycle`` (K_c,). With ``world_size`` > 1 each
    side's gradients are averaged over the ranks. With ``accumulate`` = N, ``x`` (and ``masks``, ``labels``) is split
    into N equal micro-batches and the statistics are their means.

    Adam is the fused implementation; ``capturable`` (optimizer step counters on the device) is
    set with ``compute.cuda_graph``, on CPU as well, so the CPU twin runs the graph's optimizer.

    G's and E's BatchNorm running statistics keep what the step's forward did only when the step's
    update of them is taken (of D in a 'd' phase): a skipped step leaves them as they were, so a
    non-finite batch or loss never reaches a checkpoint through them.
    """

    def __init__(
        self,
        nets: Networks,
        spec: TupleSpec,
        method: MethodConfig,
        optim: OptimConfig,
        latent_dim: int,
        compute: ComputeConfig | None = None,
        *,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.nets = nets
        self.world_size = world_size
        self.accumulate = accumulate
        self.spec = spec
        self.method = method
        self.compute = compute or ComputeConfig()
        self.latent_dim = latent_dim
        self.chains = ChainEvaluator(nets, method, self.compute.kernel_impl)
        self.device = next(nets.D.parameters()).device
        self.precision = resolve_precision(self.compute.precision, self.device)
        # Every spectral-normalised weight (D's; BigGAN's G has them too) is computed once per step, in fp32.
        self.spectral_normed = nn.ModuleList([nets.G, nets.E, nets.D])
        self.d_params = trainable_parameters(nets.D)
        self.ge_params = trainable_parameters(nets.G, nets.E)
        self.bn_statistics = _batch_norm_statistics(nets.G, nets.E)
        # fused Adam is capturable on CPU too: the twin runs the graph's optimizer
        self.opt_d, self.opt_ge = build_optimizers(
            self.d_params, self.ge_params, optim, fused=True, capturable=self.compute.cuda_graph
        )
        scaled = self.precision.uses_scaler
        self.scaler_d = torch.amp.GradScaler(self.device.type) if scaled else None
        self.scaler_ge = torch.amp.GradScaler(self.device.type) if scaled else None
        w_true, w_pair = loss_weights(spec.num_classes, method.loss_weights, method.objective)
        self.w_true, self.w_pair = w_true.to(self.device), w_pair.to(self.device)
        if spec.cycle_classes:
            if not hasattr(nets.D, "pair_head"):
                raise ValueError(
                    f"tuple spec '{spec.name}' names cycle_classes but D has no pair head; build the networks with "
                    "build_networks (or build_models(..., pair_classes=spec.num_cycle_classes))"
                )
            w_true, w_pair = loss_weights(spec.num_cycle_classes, method.loss_weights, method.objective)
            self.w_true_cycle, self.w_pair_cycle = w_true.to(self.device), w_pair.to(self.device)

    def discriminate(
        self,
        x: Tensor,
        noise_std: Tensor,
        masks: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        chains_grad: bool = True,
    ) -> dict[str, Tensor]:
        """Forward only: chains, tuples, one D call (and one pair-head call), both losses (graph kept for the updates).

        ``masks``: the batch's masks (``method.mask_source = "pipeline"``), None to draw boxes in the step;
        ``labels``: the batch's labels for class-conditional networks (``model.label_classes``): every
        tuple row i, real or generated, carries label i, so all K classes see the data's label distribution.
        """
        batch = x.shape[0]
        k = self.spec.num_classes
        with fp32_spectral_norm(self.spectral_normed, self.device.type), self.precision.autocast():
            z = torch.randn(batch, self.latent_dim, device=x.device)
            with torch.set_grad_enabled(chains_grad and torch.is_grad_enabled()), annotate("gali/chains"):
                values = self.chains.evaluate(self.spec, x, z, masks, labels)
            slots = []  # each slot as K row blocks, one per class: D groups them by whether they need a gradient
            for position, kind in enumerate(self.spec.slot_kinds):
                blocks = [values[cls[position]] for cls in self.spec.classes]
                if kind == IMAGE:
                    blocks = [self._seen_by_d(block, noise_std) for block in blocks]
                slots.append(blocks)
            with annotate("gali/D"):
                features = self.nets.D.features(slots, labels)
            if self.spec.cycle_classes:  # K_c row blocks, each class's images concatenated on channels
                pairs = [
                    torch.cat([self._seen_by_d(values[expr], noise_std) for expr in cls], dim=1)
                    for cls in self.spec.cycle_classes
                ]
                with annotate("gali/pair_head"):
                    pair_logits = self.nets.D.pair_head(torch.cat(pairs))
            # The head's weight is the cached fp32 spectral-normalised one, cast to h's dtype; with unary heads
            # (BigBiGAN's D) it is three K-way heads over [h_x, h_z, h_joint], their losses summed.
            weight, bias, groups = self.nets.D.head_weight()
            weight, bias = weight.to(features.dtype), bias.to(features.dtype)
        labels = torch.arange(k, device=x.device).repeat_interleave(batch)
        with annotate("gali/head"):
            if groups == 1:
                loss_d, loss_ge = kway_head(
                    features, weight, bias, labels, self.w_true, self.w_pair, 1.0 / batch, impl=self.compute.kernel_impl
                )
            else:
                loss_d, loss_ge = kway_head_grouped(
                    features,
                    weight,
                    bias,
                    labels,
                    self.w_true,
                    self.w_pair,
                    1.0 / batch,
                    groups,
                    impl=self.compute.kernel_impl,
                )
        if self.method.objective == "misclassification":  # not a sum of CEs: its G/E loss is added on the logits
            logits = F.linear(features, weight, bias)
            loss_ge = sum(misclassification_loss(group, labels, k, 1.0 / batch) for group in logits.chunk(groups, 1))
        else:
            with torch.no_grad():
                logits = F.linear(features, weight, bias)
        # D's statistics are the joint head's (the last group)
        out = {"loss_d": loss_d, "loss_ge": loss_ge, "p_true": true_class_probability(logits[:, -k:], labels, k)}
        if self.chains.encoding is not None:
            out |= encoding_stats(*self.chains.encoding)
        if self.spec.reconstruction is not None:
            target, output = self.spec.reconstruction
            recon = reconstruction_loss(values[target], values[output])
            out["recon"] = recon
            out["loss_ge"] = out["loss_ge"] + self.method.alice_lambda * recon
        if self.spec.cycle_classes:
            out |= self._cycle_losses(pair_logits, batch)
            out["loss_d"] = out["loss_d"] + self.method.cycle_lambda * out["cycle_d"]
            out["loss_ge"] = out["loss_ge"] + self.method.cycle_lambda * out["cycle_ge"]
        return out

    def _seen_by_d(self, image: Tensor, noise_std: Tensor) -> Tensor:
        """An image as D sees it: at D's resolution, with instance noise, fresh per row."""
        image = resize_to(image, self.nets.D.resolution)
        return image + noise_std * _randn_in_layout(image)

    def _cycle_losses(self, logits: Tensor, batch: int) -> dict[str, Tensor]:
        """The pair head's K-way losses, by ``method.objective`` as the main head's (docs/method.md §2.6), and its
        mean true-class probabilities: ``cycle_d``, ``cycle_ge``, ``p_true_cycle`` (K_c,)."""
        k = self.spec.num_cycle_classes
        labels = torch.arange(k, device=logits.device).repeat_interleave(batch)
        loss_d, loss_ge = kway_losses(logits, labels, self.w_true_cycle, self.w_pair_cycle, 1.0 / batch)
        if self.method.objective == "misclassification":
            loss_ge = misclassification_loss(logits, labels, k, 1.0 / batch)
        return {"cycle_d": loss_d, "cycle_ge": loss_ge, "p_true_cycle": true_class_probability(logits, labels, k)}

    def step(
        self,
        x: Tensor,
        noise_std: Tensor,
        phase: str = "both",
        masks: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One update; ``phase`` is 'both' (simultaneous), 'd' or 'ge' (alternating); ``masks`` and ``labels``
        the batch's (see :meth:`discriminate`)."""
        check_phase(phase)
        if self.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with annotate("gali/step"):
            return self.update(x, noise_std, phase, masks, labels)

    def update(
        self, x: Tensor, noise_std: Tensor, phase: str, masks: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The capturable body: forward and gradients per micro-batch, one reduction and optimizer step per side.

        The spectral-norm weights are computed once for every forward and backward pass of the update (a block
        recomputed under activation checkpointing then sees the very weights of the forward). G's and E's
        BatchNorm statistics are restored where the step's update is skipped (:func:`_keep_if_taken`).
        """
        statistics_before = [buffer.clone() for buffer in self.bn_statistics]
        sides = [side for side in ("d", "ge") if phase in ("both", side)]
        sums: dict[str, list[Tensor]] = {}
        with fp32_spectral_norm(self.spectral_normed, self.device.type):
            micro_batches = _micro_batches(self.accumulate, x, masks, labels)
            outs = [
                self._micro_batch(*micro, noise_std, phase, sides, sums, last=i == len(micro_batches) - 1)
                for i, micro in enumerate(micro_batches)
            ]
            out = {name: torch.stack([o[name] for o in outs]).mean(0) for name in outs[0]}
            for side in sides:
                out.update(self._reduce(side, sums[side], out[f"loss_{side}"]))
        with annotate("gali/optim"):
            if "d" in sides:
                _optimizer_step(self.opt_d, self.scaler_d, out["skipped_d"])
            if "ge" in sides:
                _optimizer_step(self.opt_ge, self.scaler_ge, out["skipped_ge"])
            _keep_if_taken(self.bn_statistics, statistics_before, out[f"skipped_{sides[-1]}"])
        return {name: value.detach() for name, value in out.items()}

    def _micro_batch(
        self,
        x: Tensor,
        masks: Tensor | None,
        labels: Tensor | None,
        noise_std: Tensor,
        phase: str,
        sides: Sequence[str],
        sums: dict[str, list[Tensor]],
        *,
        last: bool,
    ) -> dict[str, Tensor]:
        """One micro-batch's forward and gradients, added into ``sums``; its statistics, detached (its graph goes
        when this returns). Every backward but the update's last keeps the graph: the spectral-norm weights, computed
        once per update, are in every micro-batch's."""
        out = self.discriminate(x, noise_std, masks, labels, chains_grad=phase != "d")
        for side in sides:
            with annotate(f"gali/backward_{side.upper()}"):
                retain = not (last and side == sides[-1])
                grads = self._micro_gradients(side, out[f"loss_{side}"], retain_graph=retain)
            if side in sums:
                torch._foreach_add_(sums[side], grads)
            else:
                sums[side] = list(grads)
        return {name: value.detach() for name, value in out.items()}

    def _micro_gradients(self, side: str, loss: Tensor, *, retain_graph: bool) -> Sequence[Tensor]:
        """∂(loss / accumulate)/∂θ_side for one micro-batch (scaled under fp16): summed over the micro-batches,
        the mean gradient."""
        params, scaler = (self.d_params, self.scaler_d) if side == "d" else (self.ge_params, self.scaler_ge)
        loss = loss / self.accumulate
        scaled = loss if scaler is None else scaler.scale(loss)
        return torch.autograd.grad(scaled, params, retain_graph=retain_graph)

    def _reduce(self, side: str, grads: Sequence[Tensor], loss: Tensor) -> dict[str, Tensor]:
        """The update's gradients averaged over the ranks (one all-reduce) into ``.grad``, and that side's statistics.

        ``skipped_<side>`` is 1.0 when any rank's loss or the mean gradient is not finite: the optimizer step then
        leaves that side's weights and Adam state as they were, on every rank alike (on the device, no sync). A
        rank's own non-finite loss reaches the others as a NaN added to its gradient before the all-reduce.
        """
        params, scaler = (self.d_params, self.scaler_d) if side == "d" else (self.ge_params, self.scaler_ge)
        loss = loss.detach()
        grads[0].add_(loss - loss)  # 0 for a finite loss, NaN for an infinite or NaN one
        grads = average_gradients(grads, self.world_size)
        _set_grads(params, grads)
        norm = torch.nn.utils.get_total_norm(grads)
        if scaler is not None:  # scale(1) is the current scale as a device tensor (get_scale() would sync)
            norm = norm / scaler.scale(torch.ones((), device=norm.device))
        skipped = (~torch.isfinite(norm)).float()
        return {f"grad_norm_{side}": norm, f"skipped_{side}": skipped}

    def state_dict(self) -> dict[str, Any]:
        """Optimizer (and GradScaler) state, for checkpoints."""
        state = {"opt_d": self.opt_d.state_dict(), "opt_ge": self.opt_ge.state_dict()}
        if self.scaler_d is not None and self.scaler_ge is not None:
            state |= {"scaler_d": self.scaler_d.state_dict(), "scaler_ge": self.scaler_ge.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote (a resumed run); the scalers' state only under fp16.

        Adam's moments and step counts come from the checkpoint; its settings (lr, betas, capturable, fused)
        stay this run's config's, so ``optim.lr=...`` given on resume takes effect and a resume may turn on
        ``compute.cuda_graph``.
        """
        for optimizer, saved in ((self.opt_d, state["opt_d"]), (self.opt_ge, state["opt_ge"])):
            settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(saved)
            for group, configured in zip(optimizer.param_groups, settings, strict=True):
                group.update(configured)
                if configured.get("capturable") or configured.get("fused"):  # counters as these modes keep them
                    for param in group["params"]:
                        if "step" in optimizer.state.get(param, {}):
                            step = optimizer.state[param]["step"]
                            optimizer.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)
        if self.scaler_d is not None and self.scaler_ge is not None and "scaler_d" in state:
            self.scaler_d.load_state_dict(state["scaler_d"])
            self.scaler_ge.load_state_dict(state["scaler_ge"])


def check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def _micro_batches(
    count: int, x: Tensor, masks: Tensor | None, labels: Tensor | None
) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
    """``x``, ``masks`` and ``labels`` split along the batch into ``count`` equal micro-batches (views, no copy)."""
    rows, rest = divmod(x.shape[0], count)
    if rest or not rows:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split into {count} equal micro-batches")
    return list(
        zip(
            x.split(rows),
            [None] * count if masks is None else masks.split(rows),
            [None] * count if labels is None else labels.split(rows),
            strict=True,
        )
    )


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, skipped: Tensor) -> None:
    """Fused Adam skips the step on the device where ``found_inf`` is 1 (weights and state untouched)."""
    if scaler is None:
        optimizer.found_inf = skipped  # read by the fused kernel, as GradScaler does under fp16
        optimizer.step()
        return
    scaler.step(optimizer)  # fused Adam takes the scale and found-inf on the device: no sync
    scaler.update()


def _batch_norm_statistics(*modules: nn.Module) -> list[Tensor]:
    """Every BatchNorm running statistic (running_mean, running_var, num_batches_tracked) of ``modules``."""
    return [
        buffer
        for module in modules
        for sub in module.modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm)
        for buffer in sub.buffers(recurse=False)
    ]


def _keep_if_taken(statistics: Sequence[Tensor], before: Sequence[Tensor], skipped: Tensor) -> None:
    """Put ``before`` back into ``statistics`` where ``skipped`` is 1, on the device (no sync, capturable).

    ``torch.where``, not a lerp: a statistic the skipped forward made NaN must not leak into the blend.
    """
    skip = skipped.bool()
    for buffer, old in zip(statistics, before, strict=True):
        buffer.copy_(torch.where(skip, old, buffer))


def _randn_in_layout(t: Tensor) -> Tensor:
    """``randn_like(t)`` drawn as one flat buffer viewed in t's layout.

    On the CPU, ``randn_like`` of a channels-last (200, 3, 32, 32) tensor took 10× as long as a
    flat draw of the same size (2-core development machine); independent normals are the same
    noise whichever layout they are viewed in.
    """
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return torch.randn_like(t)
    return torch.randn(t.numel(), device=t.device, dtype=t.dtype).as_strided(t.shape, t.stride())


def _set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
