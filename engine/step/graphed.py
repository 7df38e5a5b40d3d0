"""The graph-ready runner of the step: static input buffers, one CUDA graph per phase (one memory pool for all), the
eager twin on CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gali.engine.errors import GaliError
from gali.engine.ranges import annotate
from gali.engine.step.eager import PHASES, GaliStep, check_phase


class GraphedStep:
    """The graph-ready runner: static input buffers, one CUDA graph per phase, the eager twin on CPU.

    Each call checks the batch's shape, dtype and device against the first batch (a CUDA graph
    replays fixed addresses and shapes) and copies it into the static buffer. On CUDA the first
    ``warmup`` calls of a phase run eagerly on a side stream (they are real training steps that
    also create the optimizer state), the next one captures :meth:`GaliStep.update` and replays
    it, and every later call only replays. Random draws (z, ε, masks, instance noise) use the
    default CUDA generator, whose philox offset advances on every replay, so each replay draws
    fresh noise. The returned tensors are the graph's static outputs: read or accumulate them
    before the next call, which overwrites them. With gradient accumulation (``GaliStep.accumulate`` = N) the static
    buffers hold the update's whole batch and one graph per phase captures all N micro-batches' passes, the single
    reduction and the optimizer steps: an update is still one replay. With n_dis > 1 the phases' graphs share one
    memory pool: the graphs replay one at a time on one stream, so a phase's activations can reuse the memory of
    another's (one phase's worth of activation memory, not one per phase). Another phase's replay may therefore
    overwrite a phase's static outputs too: the same rule, read them before the next call.

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
        self._masks: Tensor | None = None
        self._labels: Tensor | None = None
        self._eager_calls: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[str, dict[str, Tensor]] = {}
        self._pool: Any = None  # every phase's graph's memory pool (a graph_pool_handle, made at the first capture)

    def step(
        self,
        x: Tensor,
        noise_std: Tensor,
        phase: str = "both",
        masks: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        check_phase(phase)
        self._load(x, noise_std, masks, labels)
        assert self._x is not None and self._noise_std is not None
        with annotate("gali/step"):
            if phase in self._graphs:
                self._graphs[phase].replay()
                return self._outputs[phase]
            if not self.captures:
                return self.inner.update(self._x, self._noise_std, phase, self._masks, self._labels)
            if self._eager_calls[phase] < self.warmup:
                self._eager_calls[phase] += 1
                side = torch.cuda.Stream(self.inner.device)
                side.wait_stream(torch.cuda.current_stream(self.inner.device))
                with torch.cuda.stream(side):
                    out = self.inner.update(self._x, self._noise_std, phase, self._masks, self._labels)
                torch.cuda.current_stream(self.inner.device).wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: the DataLoader's pin-memory thread and DALI's threads keep making CUDA calls mid-epoch,
            # which the default "global" mode counts as errors that invalidate the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._outputs[phase] = self.inner.update(self._x, self._noise_std, phase, self._masks, self._labels)
            self._graphs[phase] = graph
            graph.replay()  # capture records without running: this replay is the step itself
            return self._outputs[phase]

    def _load(self, x: Tensor, noise_std: Tensor, masks: Tensor | None, labels: Tensor | None) -> None:
        if self._x is None:
            layout = torch.channels_last if self.inner.compute.channels_last else torch.contiguous_format
            self._x = torch.empty_like(x, device=self.inner.device, memory_format=layout)
            self._noise_std = torch.zeros((), device=self.inner.device)
            self._masks = None if masks is None else torch.empty_like(masks, device=self.inner.device)
            self._labels = None if labels is None else torch.empty_like(labels, device=self.inner.device)
        want = (tuple(self._x.shape), self._x.dtype, self._x.device)
        got = (tuple(x.shape), x.dtype, x.device)
        if got != want:
            raise GaliError(
                f"graphed step: batch x is {_describe_tensor(*got)} but the step was built for "
                f"{_describe_tensor(*want)}; "
                "a CUDA graph replays one static shape, so every batch must have it (pipelines drop the last "
                "partial batch; keep run.batch_size and data.resolution fixed), or set compute.cuda_graph=false"
            )
        if noise_std.dim() != 0 or not noise_std.dtype.is_floating_point:
            raise GaliError(
                f"graphed step: noise_std must be a 0-d float tensor, got shape "
                f"{tuple(noise_std.shape)} {noise_std.dtype}"
            )
        for name, given, static in (("masks", masks, self._masks), ("labels", labels, self._labels)):
            if (given is None) != (static is None) or (
                given is not None and (given.shape, given.dtype) != (static.shape, static.dtype)
            ):
                raise GaliError(
                    f"graphed step: batch {name} are {None if given is None else tuple(given.shape)} but "
                    f"the step was built for {None if static is None else tuple(static.shape)}; a CUDA "
                    "graph replays one static shape (every batch has them, or none does)"
                )
            if given is not None:
                static.copy_(given)
        self._x.copy_(x)
        self._noise_std.copy_(noise_std)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _describe_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str:
    return f"shape {shape} {str(dtype).removeprefix('torch.')} on {device}"
