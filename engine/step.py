"""The training step: chains → K tuples → one D call → K-way head → both updates.

The step is small and capturable: static shapes, noise drawn on the device, no ``.item()``, no
host sync and no Python branching on tensor values. The instance-noise std arrives as a 0-d
tensor so a schedule can change it between CUDA-graph replays. Statistics (losses, per-class
p_true, gradient norms, fp16 skipped updates) come back as detached device tensors; the training
loop reads them once per tick.

Two runners share one update function, :meth:`GaliStep.update`:
  * :class:`GaliStep` calls it eagerly on whatever batch it gets (the twin, and the CPU path);
  * :class:`GraphedStep` copies each batch into static buffers and, on CUDA, replays a CUDA graph
    of it captured after warm-up (one graph per phase); on a CPU it runs the same function on the
    same static buffers without capture, so tests compare the graph-ready path with the twin.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.config import ComputeConfig, MethodConfig, OptimConfig
from gali.engine.errors import GaliError
from gali.engine.losses import loss_weights, reconstruction_loss, true_class_probability
from gali.engine.precision import fp32_spectral_norm, resolve_precision
from gali.engine.profiling import annotate
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
        with annotate("gali/mask_composite"):
            if op.startswith("mask"):
                return mask_composite(args[0], params, fill=self.method.mask_fill, impl=impl).masked
            # Under autocast G's output may be bf16 while x is fp32: the composite takes x's dtype.
            y = args[1].to(args[0].dtype)
            return mask_composite(args[0], params, y=y, fill=self.method.mask_fill, impl=impl).mix

    def _feature_input(self, image: Tensor) -> Tensor:
        size = self.method.feature_input_size
        if not size or size == image.shape[-1]:
            return image
        mode = self.method.feature_resize
        return F.interpolate(image, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


class GaliStep:
    """One GALI training step for a tuple spec, run eagerly; owns both optimizers (and scalers).

    ``step(x, noise_std, phase)`` returns detached device tensors: ``loss_d``, ``loss_ge``,
    ``p_true`` (K,) (D's mean probability for each class's own class), ``grad_norm_d`` /
    ``grad_norm_ge`` (unscaled, for the side(s) the phase updates), for ALICE specs ``recon``,
    and under fp16 ``skipped_d`` / ``skipped_ge`` (1.0 when the GradScaler skipped that update).

    Adam is the fused implementation; ``capturable`` (optimizer step counters on the device) is
    set with ``compute.cuda_graph``, on CPU as well, so the CPU twin runs the graph's optimizer.
    """

    def __init__(self, nets: Networks, spec: TupleSpec, method: MethodConfig, optim: OptimConfig,
                 latent_dim: int, compute: ComputeConfig | None = None) -> None:
        self.nets = nets
        self.spec = spec
        self.method = method
        self.compute = compute or ComputeConfig()
        self.latent_dim = latent_dim
        self.chains = ChainEvaluator(nets, method)
        self.device = next(nets.D.parameters()).device
        self.precision = resolve_precision(self.compute.precision, self.device)
        self.d_params = [p for p in nets.D.parameters() if p.requires_grad]
        self.ge_params = [p for m in (nets.G, nets.E) for p in m.parameters() if p.requires_grad]
        betas = (optim.beta1, optim.beta2)
        capturable = self.compute.cuda_graph  # fused Adam is capturable on CPU too: the twin matches the graph
        self.opt_d = torch.optim.Adam(self.d_params, lr=optim.lr, betas=betas, fused=True, capturable=capturable)
        self.opt_ge = torch.optim.Adam(self.ge_params, lr=optim.lr, betas=betas, fused=True, capturable=capturable)
        scaled = self.precision.uses_scaler
        self.scaler_d = torch.amp.GradScaler(self.device.type) if scaled else None
        self.scaler_ge = torch.amp.GradScaler(self.device.type) if scaled else None
        w_true, w_pair = loss_weights(spec.num_classes, method.loss_weights)
        self.w_true, self.w_pair = w_true.to(self.device), w_pair.to(self.device)

    def discriminate(self, x: Tensor, noise_std: Tensor, *, chains_grad: bool = True) -> dict[str, Tensor]:
        """Forward only: chains, tuples, one D call, both losses (graph kept for the updates)."""
        batch = x.shape[0]
        k = self.spec.num_classes
        with fp32_spectral_norm(self.nets.D, self.device.type), self.precision.autocast():
            z = torch.randn(batch, self.latent_dim, device=x.device)
            with torch.set_grad_enabled(chains_grad and torch.is_grad_enabled()), annotate("gali/chains"):
                values = self.chains.evaluate(self.spec, x, z)
            slots = []  # each slot as K row blocks, one per class: D groups them by whether they need a gradient
            for position, kind in enumerate(self.spec.slot_kinds):
                blocks = [values[cls[position]] for cls in self.spec.classes]
                if kind == IMAGE:  # instance noise on every image D sees, fresh per row
                    blocks = [block + noise_std * _randn_in_layout(block) for block in blocks]
                slots.append(blocks)
            with annotate("gali/D"):
                features = self.nets.D.features(slots)
            # The head's weight is the cached fp32 spectral-normalised one, cast to h's dtype.
            weight = self.nets.D.head.weight.to(features.dtype)
            bias = self.nets.D.head.bias.to(features.dtype)
        labels = torch.arange(k, device=x.device).repeat_interleave(batch)
        with annotate("gali/head"):
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
        check_phase(phase)
        if self.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with annotate("gali/step"):
            return self.update(x, noise_std, phase)

    def update(self, x: Tensor, noise_std: Tensor, phase: str) -> dict[str, Tensor]:
        """The capturable body: forward, both gradients, both optimizer steps; no host sync."""
        out = self.discriminate(x, noise_std, chains_grad=phase != "d")
        steps_d, steps_ge = phase in ("both", "d"), phase in ("both", "ge")
        if steps_d:
            with annotate("gali/backward_D"):
                out.update(self._gradients("d", out["loss_d"], retain_graph=phase == "both"))
        if steps_ge:
            with annotate("gali/backward_GE"):
                out.update(self._gradients("ge", out["loss_ge"], retain_graph=False))
        with annotate("gali/optim"):
            if steps_d:
                _optimizer_step(self.opt_d, self.scaler_d)
            if steps_ge:
                _optimizer_step(self.opt_ge, self.scaler_ge)
        return {name: value.detach() for name, value in out.items()}

    def _gradients(self, side: str, loss: Tensor, *, retain_graph: bool) -> dict[str, Tensor]:
        """∂loss/∂θ_side into ``.grad`` (scaled under fp16) and that side's statistics."""
        params, scaler = (self.d_params, self.scaler_d) if side == "d" else (self.ge_params, self.scaler_ge)
        if scaler is not None:
            loss = scaler.scale(loss)
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph)
        _set_grads(params, grads)
        norm = torch.nn.utils.get_total_norm(grads)
        stats = {}
        if scaler is not None:
            # scale(1) is the current scale as a device tensor (get_scale() would sync).
            norm = norm / scaler.scale(torch.ones((), device=norm.device))
            stats[f"skipped_{side}"] = (~torch.isfinite(norm)).float()  # what GradScaler.step will skip
        stats[f"grad_norm_{side}"] = norm
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Optimizer (and GradScaler) state, for checkpoints."""
        state = {"opt_d": self.opt_d.state_dict(), "opt_ge": self.opt_ge.state_dict()}
        if self.scaler_d is not None and self.scaler_ge is not None:
            state |= {"scaler_d": self.scaler_d.state_dict(), "scaler_ge": self.scaler_ge.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote (a resumed run); the scalers' state only under fp16."""
        self.opt_d.load_state_dict(state["opt_d"])
        self.opt_ge.load_state_dict(state["opt_ge"])
        if self.scaler_d is not None and self.scaler_ge is not None and "scaler_d" in state:
            self.scaler_d.load_state_dict(state["scaler_d"])
            self.scaler_ge.load_state_dict(state["scaler_ge"])


class GraphedStep:
    """The graph-ready runner: static input buffers, one CUDA graph per phase, the eager twin on CPU.

    Each call checks the batch's shape, dtype and device against the first batch (a CUDA graph
    replays fixed addresses and shapes) and copies it into the static buffer. On CUDA the first
    ``warmup`` calls of a phase run eagerly on a side stream (they are real training steps that
    also create the optimizer state), the next one captures :meth:`GaliStep.update` and replays
    it, and every later call only replays. Random draws (z, ε, masks, instance noise) use the
    default CUDA generator, whose philox offset advances on every replay, so each replay draws
    fresh noise. The returned tensors are the graph's static outputs: read or accumulate them
    before the next call, which overwrites them.

    On a CPU there is nothing to capture: the same update runs on the same static buffers, which
    makes this class the testable twin of the graphed path.
    """

    def __init__(self, inner: GaliStep, *, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer state is created eagerly), got {warmup}")
        self.inner = inner
        self.warmup = warmup
        self.captures = inner.device.type == "cuda"
        self._x: Tensor | None = None
        self._noise_std: Tensor | None = None
        self._eager_calls: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[str, dict[str, Tensor]] = {}

    def step(self, x: Tensor, noise_std: Tensor, phase: str = "both") -> dict[str, Tensor]:
        check_phase(phase)
        self._load(x, noise_std)
        assert self._x is not None and self._noise_std is not None
        with annotate("gali/step"):
            if phase in self._graphs:
                self._graphs[phase].replay()
                return self._outputs[phase]
            if not self.captures:
                return self.inner.update(self._x, self._noise_std, phase)
            if self._eager_calls[phase] < self.warmup:
                self._eager_calls[phase] += 1
                side = torch.cuda.Stream(self.inner.device)
                side.wait_stream(torch.cuda.current_stream(self.inner.device))
                with torch.cuda.stream(side):
                    out = self.inner.update(self._x, self._noise_std, phase)
                torch.cuda.current_stream(self.inner.device).wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._outputs[phase] = self.inner.update(self._x, self._noise_std, phase)
            self._graphs[phase] = graph
            graph.replay()  # capture records without running: this replay is the step itself
            return self._outputs[phase]

    def _load(self, x: Tensor, noise_std: Tensor) -> None:
        if self._x is None:
            layout = torch.channels_last if self.inner.compute.channels_last else torch.contiguous_format
            self._x = torch.empty_like(x, device=self.inner.device, memory_format=layout)
            self._noise_std = torch.zeros((), device=self.inner.device)
        want = (tuple(self._x.shape), self._x.dtype, self._x.device)
        got = (tuple(x.shape), x.dtype, x.device)
        if got != want:
            raise GaliError(
                f"graphed step: batch x is {_describe(*got)} but the step was built for {_describe(*want)}; "
                "a CUDA graph replays one static shape, so every batch must have it (pipelines drop the last "
                "partial batch; keep run.batch_size and data.resolution fixed), or set compute.cuda_graph=false"
            )
        if noise_std.dim() != 0 or not noise_std.dtype.is_floating_point:
            raise GaliError(f"graphed step: noise_std must be a 0-d float tensor, got shape "
                            f"{tuple(noise_std.shape)} {noise_std.dtype}")
        self._x.copy_(x)
        self._noise_std.copy_(noise_std)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def compile_networks(nets: Networks) -> None:
    """torch.compile G, E and D's feature trunk in place (state-dict keys unchanged).

    D is called through ``features`` (the head is the fused kernel), so that method is what is
    compiled; the kernels are custom ops, opaque to the compiler. AOTAutograd's compiled backward
    computes the gradient of every input that requires one, whatever ``autograd.grad`` asked for
    (checked on a two-conv function: two convolution backwards for one weight's gradient, against
    one in eager), so each of the step's two gradient passes runs all of D's backward: on the
    2-core CPU the compiled step is slower than eager (bench/reports/2026-11-30-cpu-step-2.md).
    """
    nets.G.compile()
    nets.E.compile()
    nets.D.features = torch.compile(nets.D.features)


def build_step(nets: Networks, spec: TupleSpec, method: MethodConfig, optim: OptimConfig, latent_dim: int,
               compute: ComputeConfig) -> GaliStep | GraphedStep:
    """The step runner ``compute`` asks for: channels-last and compiled networks, graphed or eager.

    ``compute.cuda_graph`` on a CPU device gives the eager twin (there is nothing to capture).
    """
    if compute.channels_last:
        for net in (nets.G, nets.E, nets.D):
            net.to(memory_format=torch.channels_last)
    if compute.compile:
        compile_networks(nets)
    step = GaliStep(nets, spec, method, optim, latent_dim, compute)
    if compute.cuda_graph and step.device.type == "cuda":
        return GraphedStep(step)
    return step


def _describe(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str:
    return f"shape {shape} {str(dtype).removeprefix('torch.')} on {device}"


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)  # fused Adam takes the scale and found-inf on the device: no sync
    scaler.update()


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


def instance_noise_std(method: MethodConfig, epoch: int, num_epochs: int) -> float:
    """σ for a 1-based ``epoch`` of ``num_epochs``: the authors' linear decay or a constant."""
    if method.noise_schedule == "constant":
        return method.instance_noise
    return method.instance_noise * max(num_epochs - epoch, 0) / num_epochs
