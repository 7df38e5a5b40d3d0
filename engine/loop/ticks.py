"""The loop's clock and cadences, and the tick: step statistics read once per ``run.tick_kimg``.

Step statistics stay on the device between ticks (:class:`TickStats`); a tick reads their means with
one host sync and reports them with the images/s of the steps since the last tick (time spent in
snapshots and checkpoints does not count: :class:`StepClock`), where counted the model FLOPs
utilisation (``mfu``: img/s × FLOPs per real image over the ranks' peak), and the loop's own timing,
kept on the host: the fraction of the tick spent waiting for the next batch (``data_wait``), the
steps' wall times over every rank (``step_ms_p50`` / ``step_ms_p95``; on CUDA the host runs ahead
of the device until its queue is full, so these are the device's pace once it is) and, on CUDA, the
peak device memory of the tick over the ranks (``max_memory_gib``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gali.engine.errors import GaliError
from gali.engine.loop.distributed import World


class Cadence:
    """Due at the step that crosses a multiple of ``every`` images, and at the last step of the run.

    It holds no position, so a resumed run keeps the uninterrupted run's cadence without restoring any.
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, images_seen: int, step_images: int, done: bool) -> bool:
        """Whether the step that took the count from ``images_seen - step_images`` to ``images_seen`` is one."""
        return done or images_seen // self.every > (images_seen - step_images) // self.every


class StepClock:
    """Seconds spent training: wall time since the start, less the time inside :meth:`paused`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start = time.perf_counter()
        self._paused = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time; the device's queued steps are counted before it starts."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start


class TickStats:
    """The step's device statistics summed since the last tick; read back with one host sync.

    Each statistic keeps its own count (under n_dis > 1 a side's gradient norm exists only in the
    phases that update it). A statistic's first value is cloned, so a CUDA graph's static outputs can
    be overwritten by the next replay; after it, a step's statistics are added into those sums in
    place, all in one foreach add.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._lists: dict[tuple[str, ...], list[torch.Tensor]] = {}  # the sums of a step's names, in its order

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        names = tuple(stats)
        sums = self._lists.get(names)
        if sums is None:
            for name, value in stats.items():  # this tick's first step with these names
                if name in self.sums:  # seen in a step with other names (another n_dis phase)
                    self.sums[name].add_(value)
                else:
                    self.sums[name], self.counts[name] = value.clone(), 0
                self.counts[name] += 1
            self._lists[names] = [self.sums[name] for name in names]
            return
        torch._foreach_add_(sums, list(stats.values()))
        for name in names:
            self.counts[name] += 1

    def read_means(self, average: Callable[[Tensor], Tensor] | None = None) -> dict[str, float | list[float]]:
        """Means since the last call (scalars as floats, vectors as lists), then reset.

        ``average`` combines the means of every rank (one collective on the concatenated means).
        """
        if not self.sums:
            return {}
        means = [(value / self.counts[name]).float().reshape(-1) for name, value in self.sums.items()]
        flat = torch.cat(means)
        flat = (flat if average is None else average(flat)).tolist()  # one device-to-host copy for all
        out: dict[str, float | list[float]] = {}
        offset = 0
        for (name, value), mean in zip(self.sums.items(), means, strict=True):
            out[name] = flat[offset] if value.dim() == 0 else flat[offset : offset + mean.numel()]
            offset += mean.numel()
        self.sums, self.counts, self._lists = {}, {}, {}
        return out


class Ticks:
    """The ``run.tick_kimg`` cadence: collects each step's statistics, and at a tick makes its record.

    The record's statistics are the means over the tick's steps and over the ranks; ``images_per_s``
    counts the images of all ranks (the global batch).
    """

    def __init__(
        self, every_images: int, clock: StepClock, images_seen: int, world: World, flops_per_peak: float | None = None
    ) -> None:
        self.cadence = Cadence(every_images)
        self.flops_per_peak = flops_per_peak  # model FLOPs per real image over the ranks' summed peak FLOP/s
        self.clock = clock
        self.world = world
        self.stats = TickStats()
        self._images, self._seconds = images_seen, clock.seconds()
        self._step_end, self._step_seconds, self._data_seconds = self._seconds, [], 0.0
        self.bad_ticks = 0  # ticks in a row with skipped (non-finite) steps

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time inside counts as the loop waiting for its next batch."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._data_seconds += time.perf_counter() - start

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """One step's statistics; the step's wall time is the training time since the previous step's end."""
        self.stats.add(stats)
        end = self.clock.seconds()
        self._step_seconds.append(end - self._step_end)
        self._step_end = end

    def due(self, images_seen: int, step_images: int, done: bool) -> bool:
        return self.cadence.due(images_seen, step_images, done)

    def record(self, images_seen: int, *, epoch: int, iteration: int, noise_std: float) -> dict[str, Any]:
        """The tick's record: where the run is, the images/s since the last tick, the statistics' means."""
        means = self.stats.read_means(self.world.mean)  # the one host sync (and collective) of the tick
        seconds = self.clock.seconds()
        tick_seconds = max(seconds - self._seconds, 1e-9)
        speed = (images_seen - self._images) / tick_seconds
        self._images, self._seconds = images_seen, seconds
        self.bad_ticks = self.bad_ticks + 1 if means.get("skipped_d") or means.get("skipped_ge") else 0
        return {
            "kimg": images_seen / 1000,
            "epoch": epoch,
            "iteration": iteration,
            "images_per_s": speed,
            "noise_std": noise_std,
            **({"mfu": speed * self.flops_per_peak} if self.flops_per_peak else {}),
            **self._timing(tick_seconds),
            **means,
        }

    def _timing(self, tick_seconds: float) -> dict[str, float]:
        """The tick's data wait, step times and peak memory over the ranks (one gather of host values), then reset."""
        device = self.clock.device
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ranks = self.world.gather((self._data_seconds / tick_seconds, self._step_seconds, memory))
        steps_ms = 1000 * np.concatenate([np.asarray(steps, dtype=np.float64) for _, steps, _ in ranks])
        timing = {
            "data_wait": float(np.mean([wait for wait, _, _ in ranks])),
            "step_ms_p50": float(np.percentile(steps_ms, 50)) if steps_ms.size else 0.0,
            "step_ms_p95": float(np.percentile(steps_ms, 95)) if steps_ms.size else 0.0,
        }
        if memory is not None:
            timing["max_memory_gib"] = max(peak for _, _, peak in ranks)
            torch.cuda.reset_peak_memory_stats(device)
        self._step_seconds, self._data_seconds = [], 0.0
        return timing

    def stop_after_bad_ticks(self, max_bad_ticks: int, run_dir: Path) -> None:
        """Stop the run after ``max_bad_ticks`` (``run.max_bad_ticks``; 0 = never) bad ticks in a row."""
        if max_bad_ticks and self.bad_ticks >= max_bad_ticks:
            raise GaliError(
                f"{self.bad_ticks} ticks in a row had steps with a non-finite loss or gradient "
                f"(skipped_d / skipped_ge in {run_dir / 'metrics.jsonl'}); stopped, keeping the "
                "checkpoints written before them. Lower optim.lr, or try compute.precision=fp32, then "
                "resume from one of them (run.max_bad_ticks=0 never stops)"
            )
