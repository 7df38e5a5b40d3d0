"""What tests/test_distributed.py runs on every rank under torchrun (not a test module itself).

torchrun --nproc-per-node 2 tests/distributed_worker.py train OUT section.key=value ...
    trains, dumping each rank's networks and optimizer state at every checkpoint to
    OUT/rank<r>-<images>.pt, and the number of gradient reductions per step to OUT/rank<r>.json;
torchrun --nproc-per-node 2 tests/distributed_worker.py gradients OUT
    one 2-rank step next to the same step taken alone on each rank's batch, their gradients to
    OUT/gradients-rank<r>.pt;
torchrun --nproc-per-node 2 tests/distributed_worker.py slow-data OUT section.key=value ...
    trains with every batch 2 s late (a slow data pipeline on purpose);
torchrun --nproc-per-node 2 tests/distributed_worker.py infinite-loss OUT
    one 2-rank step in which rank 1's losses alone are infinite (their gradients finite), each rank's skip
    flags and whether its weights moved to OUT/infinite-loss-rank<r>.json.
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gali.engine.loop import checkpoint as checkpoint_module
from gali.engine.loop import train as train_module
from gali.engine.loop.config import load_config
from gali.engine.loop.train import train
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step import eager
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep


def record_training(out: Path, overrides: list[str]) -> None:
    rank = int(os.environ["RANK"])
    reductions: list[int] = []
    average = eager.average_gradients

    def counting(grads, world_size):
        reductions.append(world_size)
        return average(grads, world_size)

    save = checkpoint_module.Checkpoint.save

    def save_and_dump(self, path, writer=None):
        # the dump first: state_dict() is collective, and after the write it would make rank 1 wait for it
        state = {k: v for k, v in self.state_dict().items() if k not in ("rng", "rng_ranks")}
        torch.save(state, out / f"rank{rank}-{self.progress.images_seen:010d}.pt")
        return save(self, path, writer)

    eager.average_gradients = counting
    checkpoint_module.Checkpoint.save = save_and_dump
    if rank == 0:  # a slow disk under rank 0's writes: rank 1 must still wait for the last checkpoint
        sync = os.fsync
        os.fsync = lambda fd: (time.sleep(0.2), sync(fd))[1]
    result = train(load_config("demo", overrides), log=print)
    checkpoints = sorted(p.name for p in result.run_dir.glob("checkpoint-*.pt"))  # what rank 0 wrote, at return
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "reductions": len(reductions),
                "run_dir": str(result.run_dir),
                "images": int(result.kimg * 1000),
                "checkpoints_at_return": checkpoints,
            }
        )
    )


def _two_rank_step_parts() -> tuple[int, Networks, tuple]:
    """This rank, the same tiny networks on both ranks, and GaliStep's arguments after them."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    spec = load_spec("gali4")
    G, E, D = build_models(
        ModelConfig(latent_dim=8, width=0.125), slot_kinds=spec.slot_kinds, num_classes=spec.num_classes
    )
    return (
        dist.get_rank(),
        Networks(G=G, E=E, D=D),
        (spec, MethodConfig(), OptimConfig(lr=1e-3), 8, ComputeConfig(kernel_impl="ref")),
    )


def record_gradients(out: Path) -> None:
    rank, nets, args = _two_rank_step_parts()
    together = GaliStep(nets, *args, world_size=2)
    alone = GaliStep(copy.deepcopy(nets), *args, world_size=1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank)) * 2 - 1
    for step in (alone, together):  # the same random draws in both
        torch.manual_seed(100 + rank)
        step.step(x, torch.tensor(0.1))
    torch.save(
        {
            "alone": [p.grad for p in alone.d_params + alone.ge_params],
            "together": [p.grad for p in together.d_params + together.ge_params],
        },
        out / f"gradients-rank{rank}.pt",
    )
    dist.destroy_process_group()


def train_on_slow_data(overrides: list[str]) -> None:
    batches_from = train_module._batches_from

    def late(*args):
        for item in batches_from(*args):
            time.sleep(2.0)
            yield item

    train_module._batches_from = late
    train(load_config("demo", overrides), log=print)


def record_infinite_loss(out: Path) -> None:
    rank, nets, args = _two_rank_step_parts()
    if rank == 1:
        head = eager.kway_head

        def infinite_losses(*head_args, **kwargs):
            loss_d, loss_ge = head(*head_args, **kwargs)
            return loss_d + float("inf"), loss_ge + float("inf")  # a constant: the gradients stay finite

        eager.kway_head = infinite_losses
    step = GaliStep(nets, *args, world_size=2)
    before = [p.detach().clone() for p in step.d_params + step.ge_params]
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank)) * 2 - 1
    out_stats = step.step(x, torch.tensor(0.1))
    moved = [not torch.equal(p, b) for p, b in zip(step.d_params + step.ge_params, before, strict=True)]
    record = {"skipped_d": out_stats["skipped_d"].item(), "skipped_ge": out_stats["skipped_ge"].item()}
    (out / f"infinite-loss-rank{rank}.json").write_text(json.dumps(record | {"moved": any(moved)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    modes = {
        "train": lambda: record_training(folder, sys.argv[3:]),
        "gradients": lambda: record_gradients(folder),
        "infinite-loss": lambda: record_infinite_loss(folder),
        "slow-data": lambda: train_on_slow_data(sys.argv[3:]),
    }
    modes[mode]()
