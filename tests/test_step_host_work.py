"""The host work around the step (issue 22, item 4): one foreach call per moving-average update and per tick sum, and
the ranks' stop agreement every ``run.stop_check_steps`` steps instead of every step."""

import contextlib
import copy
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from gali.engine.loop.config import load_config
from gali.engine.loop.distributed import World
from gali.engine.loop.ema import WeightAverage
from gali.engine.loop.ticks import TickStats
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.networks import build_networks


class CountOps(TorchDispatchMode):
    """The aten ops dispatched inside, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _demo_nets():
    cfg = load_config("demo", [])
    torch.manual_seed(0)
    return build_networks(
        cfg.model, cfg.method, load_spec(cfg.method.tuples), resolution=32, device=torch.device("cpu")
    )


@torch.no_grad()
def _per_buffer_update(averaged: dict, live: dict, weight: float) -> None:
    """The update before issue 22 item 4: a foreach lerp per network and a ``copy_`` per buffer."""
    for name, net in live.items():
        torch._foreach_lerp_(list(averaged[name].parameters()), list(net.parameters()), weight)
        for mine, theirs in zip(averaged[name].buffers(), net.buffers(), strict=True):
            mine.copy_(theirs)


def test_moving_average_update_is_two_foreach_calls_bit_identical_to_the_per_buffer_update():
    nets = _demo_nets()
    ema = WeightAverage(nets, ema_kimg=0.5, rampup=0.05, start_kimg=0.1)
    reference = copy.deepcopy(ema.averaged)
    generator = torch.Generator().manual_seed(1)
    for step, images_seen in enumerate((64, 128, 192, 256, 10_000, 10_064)):
        with torch.no_grad():  # the live networks move, buffers (BatchNorm statistics, counters) included
            for tensor in [*nets.G.parameters(), *nets.E.parameters(), *nets.G.buffers(), *nets.E.buffers()]:
                tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        _per_buffer_update(reference, ema.live, 1.0 - ema.beta(images_seen, 64))
        with CountOps() as counted:
            ema.update(images_seen, 64)
        assert counted.ops == ["_foreach_lerp_", "_foreach_copy_"], counted.ops
        for name in ("G", "E"):
            want, got = reference[name].state_dict(), ema.averaged[name].state_dict()
            assert all(torch.equal(got[key], want[key]) for key in want), (step, name)
    # loads write into the averaged tensors the update holds: a restart makes the average the live weights
    ema.restart()
    ema.update(10_128, 64)
    assert torch.equal(ema.G.output_bias, torch.lerp(nets.G.output_bias, nets.G.output_bias, 0.5))


def _old_tick_sums(steps: list[dict]) -> dict:
    sums, counts = {}, {}
    for stats in steps:
        for name, value in stats.items():
            sums[name] = sums[name] + value if name in sums else value.clone()
            counts[name] = counts.get(name, 0) + 1
    return {name: (value / counts[name]).float().reshape(-1).tolist() for name, value in sums.items()}


def _step_stats(phase: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    sides = {"both": ("d", "ge"), "d": ("d",), "ge": ("ge",)}[phase]
    stats = {"loss_d": torch.randn((), generator=generator), "p_true": torch.rand(4, generator=generator)}
    for side in sides:
        stats[f"grad_norm_{side}"] = torch.rand((), generator=generator)
        stats[f"skipped_{side}"] = (torch.rand((), generator=generator) > 0.5).float()
    return stats


@pytest.mark.parametrize("phases", [["both"] * 6, ["d", "d", "ge", "d", "d", "ge", "d"]])
def test_tick_sums_are_one_foreach_add_per_step_with_the_same_means(phases):
    generator = torch.Generator().manual_seed(0)
    steps = [_step_stats(phase, generator) for phase in phases]
    stats = TickStats()
    for tick in range(2):  # the second tick starts from fresh sums
        for i, step in enumerate(steps):
            outputs = {name: value.clone() for name, value in step.items()}  # a CUDA graph's static outputs
            with CountOps() as counted:
                stats.add(outputs)
            if phases[i] in phases[:i]:  # this set of names seen before: one foreach add, nothing else
                assert counted.ops == ["_foreach_add_"], counted.ops
            for value in outputs.values():
                value.fill_(1e6)  # the next replay overwrites the static outputs: the sums hold no alias of them
        means = stats.read_means()
        want = _old_tick_sums(steps)
        assert list(means) == list(want), tick
        for name, value in means.items():
            assert (value if isinstance(value, list) else [value]) == want[name], (tick, name)


def _agree(rank: int, size: int, store_path: str, out: str) -> None:
    """One rank of a 2-rank gloo world: rank 1 raises its flag at step 5; World.any every 4 steps."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, size), rank=rank, world_size=size)
    world = World(rank=rank, size=size)
    reduce, calls = dist.all_reduce, []
    dist.all_reduce = lambda *args, **kwargs: (calls.append(1), reduce(*args, **kwargs))[1]
    answers = [world.any(rank == 1 and step >= 5, step=step, every=4) for step in range(1, 10)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"answers": answers, "collectives": len(calls)}, f)
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_every_n_steps_and_a_single_process_at_once(tmp_path):
    assert [World().any(step == 3, step=step, every=10) for step in range(1, 5)] == [False, False, True, False]
    torch.multiprocessing.spawn(_agree, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # steps 1..9: agreed at steps 4 and 8 only; rank 1's flag from step 5 reaches both ranks at step 8
        assert got == {"answers": [False] * 7 + [True, False], "collectives": 2}, (rank, got)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


class _FakeInner:
    """Stands for a GaliStep: the graphed runner needs its device, compute settings and update."""

    device = torch.device("cpu")

    class compute:  # the attribute GraphedStep reads
        channels_last = False

    def update(self, x, noise_std, phase, masks, labels):
        return {"loss": x.sum() + noise_std}


def test_every_phase_graph_is_captured_into_one_memory_pool(monkeypatch):
    """n_dis > 1 captures a graph per phase; all go into the one pool made at the first capture (CUDA calls faked:
    the capture itself needs a GPU)."""
    from gali.engine.step.graphed import GraphedStep

    pools, handles = [], []

    class Stream:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def wait_stream(self, other) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            pass

    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        pools.append(pool)
        return contextlib.nullcontext()

    def graph_pool_handle():
        handles.append(object())
        return handles[-1]

    for name, value in {
        "Stream": Stream,
        "stream": lambda s: contextlib.nullcontext(),
        "current_stream": lambda device=None: Stream(),
        "CUDAGraph": Graph,
        "graph": graph,
        "graph_pool_handle": graph_pool_handle,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    runner = GraphedStep(_FakeInner(), warmup=1)
    runner.captures = True
    for phase in ("d", "d", "ge", "d", "d", "ge", "d", "d", "ge"):  # n_dis = 2: warm-up, capture, then replays
        runner.step(torch.ones(2, 3, 4, 4), torch.tensor(0.1), phase)
    assert set(runner._graphs) == {"d", "ge"} and len(handles) == 1 and pools == [handles[0], handles[0]]
