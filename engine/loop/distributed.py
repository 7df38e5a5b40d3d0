"""Runs over several processes: torchrun's ranks, their process group, and what the ranks must agree on.

``torchrun --nproc-per-node N -m gali train ...`` (or ``--nnodes``, ``--rdzv-backend c10d`` and
``--rdzv-endpoint`` across nodes) starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
their environment; :func:`init_world` turns that into a process group (NCCL on GPUs, gloo on CPUs) and
the rank's device (``cuda:LOCAL_RANK``). A plain ``gali train`` is a world of one: no process group, no
collective anywhere. ``run.batch_size`` stays the global batch; each rank takes ``batch_size / world``.

Everything here runs outside the step, at most once per tick or snapshot, except :meth:`World.any`,
the stop-flag agreement every ``run.stop_check_steps`` steps, which runs on a CPU (gloo) group so that it never waits
on the GPU.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from gali.engine.errors import ConfigError, GaliError
from gali.engine.loop.runtime import derived_seed, resolve_device


@dataclass
class World:
    """This process's place among the ranks of a run; ``size == 1`` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    cpu_group: Any = None  # a gloo group for host-side agreement (the default group on CPU runs)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes logs, grids, metrics and checkpoints."""
        return self.rank == 0

    def any(self, flag: bool, *, step: int = 0, every: int = 1) -> bool:
        """Whether ``flag`` is set on any rank: in a world of one, ``flag`` itself, at once; else agreed (one small
        all-reduce on the CPU group) at the steps where ``step``, the same count on every rank, is a multiple of
        ``every``, and False between them, with no collective."""
        if self.size == 1:
            return flag
        if step % every:
            return False
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(value.item())

    def mean(self, values: Tensor) -> Tensor:
        """``values`` averaged over the ranks, in place (one all-reduce; unchanged in a world of one)."""
        if self.size > 1:
            dist.all_reduce(values)
            values /= self.size
        return values

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.cpu_group)
        return out

    def gather_to_main(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on rank 0; an empty list on the others (for
        values that only rank 0 combines: nothing travels to the other ranks)."""
        if self.size == 1:
            return [value]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self.cpu_group)
        return out or []

    def broadcast_tensor(self, tensor: Tensor) -> Tensor:
        """Rank 0's values of ``tensor`` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def seed_rank_streams(self, seed: int) -> None:
        """Seed this rank's generators from (seed, rank), so that its random draws differ from the others'."""
        if self.size > 1:
            torch.manual_seed(derived_seed(seed, self.rank))

    def barrier(self) -> None:
        """Wait until every rank is here (on the CPU group; nothing in a world of one)."""
        if self.size > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_world(device_name: str) -> tuple[World, torch.device]:
    """This process's :class:`World` and device, from torchrun's environment (a world of one without it).

    ``run.device`` 'auto' takes ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; the backend
    is NCCL on CUDA and gloo on the CPU. Under torchrun the process group is made even for one rank
    (a 1-GPU ``torchrun`` smoke run starts NCCL); its collectives are skipped while ``size`` is 1.
    Asking for CUDA without a GPU, or for more ranks on a node than it has GPUs, stops here with a
    message.
    """
    _env_from_srun()
    if "RANK" not in os.environ:  # neither torchrun nor srun started ranks
        return World(), resolve_device(device_name)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                "run.device",
                f"rank {rank} has LOCAL_RANK {local_rank}, but this node has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per node "
                "(torchrun --nproc-per-node), or set run.device=cpu",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, shared by every restart
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"gali/{_launch_token(agent_store, rank, size, timeout)}/", agent_store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return World(rank=rank, size=size, local_rank=local_rank, cpu_group=cpu_group), device


def _launch_token(store: dist.Store, rank: int, size: int, timeout: timedelta) -> str:
    """A name that this launch of the ranks alone uses in torchrun's store.

    torchrun keeps one store for the whole job and hands it to every restart of the ranks, so a restarted
    group would read the keys of the group before it (its ranks' addresses: gloo's "connectFullMesh failed
    ... Connection refused", NCCL's old unique id; pytorch/pytorch#135712), and TORCHELASTIC_RESTART_COUNT
    differs between nodes. Rank 0 draws a new token; every other rank asks for it under a key named by its
    own random nonce, which no earlier launch can have written, and acknowledges it under the token.
    """
    if rank == 0:
        token, answered = uuid.uuid4().hex, {}
        waiting, deadline = set(range(1, size)), time.monotonic() + timeout.total_seconds()
        while waiting:
            for other in sorted(waiting):
                if store.check([f"gali/ack/{token}/{other}"]):
                    waiting.discard(other)
                elif store.check([f"gali/ask/{other}"]):
                    nonce = store.get(f"gali/ask/{other}").decode()
                    if answered.get(other) != nonce:  # an earlier launch's nonce is answered too, harmlessly
                        store.set(f"gali/answer/{nonce}", token)
                        answered[other] = nonce
            if time.monotonic() > deadline:
                raise GaliError(f"ranks {sorted(waiting)} did not join rank 0 within {timeout}")
            time.sleep(0.02)
        return token
    nonce = uuid.uuid4().hex
    store.set(f"gali/ask/{rank}", nonce)
    token = store.get(f"gali/answer/{nonce}").decode()  # waits up to the store's timeout
    store.set(f"gali/ack/{token}/{rank}", "1")
    return token


def _env_from_srun() -> None:
    """Ranks started by SLURM's srun alone (no torchrun): torchrun's variables from SLURM's, so that the
    scheduler's signals reach every rank directly. Only inside an srun step of several tasks
    (``SLURM_STEP_NUM_TASKS``): a batch script's own process is a world of one. The rendezvous is the job's
    first host, at ``MASTER_PORT`` or a port derived from the job id."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "RANK" in os.environ or tasks < 2 or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ["SLURM_PROCID"], str(tasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
    os.environ.setdefault("MASTER_ADDR", first_host(nodes))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[07-09,12],gpu1' → 'node07', 'a,b' → 'a'."""
    prefix, bracket, rest = nodelist.partition("[")
    if "," in prefix or not bracket:
        return prefix.split(",")[0]
    return prefix + rest.split(",")[0].split("-")[0].rstrip("]")


def local_batch_size(batch_size: int, world: World, accumulate: int = 1) -> int:
    """Each rank's share of the global ``run.batch_size`` per update, ``accumulate`` micro-batches of equal size;
    a batch that the ranks and micro-batches cannot share evenly is refused with sizes that work."""
    parts = world.size * accumulate
    if batch_size % parts:
        lower = batch_size - batch_size % parts
        sizes = ", ".join(str(b) for b in (lower, lower + parts) if b > 0)
        if accumulate == 1:
            raise ConfigError(
                "run.batch_size",
                f"got {batch_size}, which {world.size} ranks cannot share evenly; "
                f"the global batch must be a multiple of the world size, e.g. {sizes}",
            )
        raise ConfigError(
            "run.accumulate",
            f"got {accumulate}, but run.batch_size={batch_size} cannot be split into {world.size} rank(s) x "
            f"{accumulate} micro-batches of equal size; use a run.batch_size that is a multiple of {parts}, "
            f"e.g. {sizes}, or another run.accumulate",
        )
    return batch_size // world.size


def average_buffers(world: World, modules: Iterable[torch.nn.Module]) -> None:
    """Set every floating-point buffer (BatchNorm's running statistics) to its mean over the ranks.

    Each rank normalises over its own batch, as the paper does per call, so the running statistics
    drift apart; before a snapshot measures with them and a checkpoint stores them, they are averaged
    (one all-reduce over all of them).
    """
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if world.size == 1 or not buffers:
        return
    flat = world.mean(_flatten_dense_tensors(buffers))
    for buffer, mean in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
        buffer.copy_(mean)


def check_same_state(world: World, named: Iterable[tuple[str, Tensor]]) -> None:
    """Stop the run if any tensor is not finite on some rank, or differs from rank 0's, naming the first that does.

    Per tensor, an all-finite flag and a checksum (sum and sum of squares in float64) are computed on
    the device and all-gathered in one transfer; only on a checksum mismatch is each differing tensor
    compared in full against rank 0's (StyleGAN's ``check_ddp_consistency``, cheap enough to run before
    every checkpoint). Every rank decides from the same gathered values, so all of them stop together.
    """
    named = list(named)
    if world.size == 1:  # finiteness only: one norm per tensor in one foreach call, each exact check only if flagged
        _check_finite(named)
        return
    checks = torch.stack([_check_values(tensor) for _, tensor in named]).cpu()
    everyone = world.gather(checks)
    for i, (name, _) in enumerate(named):
        ranks = [rank for rank, other in enumerate(everyone) if not other[i, 0]]
        if ranks:
            raise _diverged(name, f" on rank {', '.join(map(str, ranks))}")
    differing = [i for i in range(len(named)) if any(not torch.equal(other[i], everyone[0][i]) for other in everyone)]
    for i in differing:
        name, tensor = named[i]
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not world.any(not torch.equal(reference, tensor)):
            continue  # equal sums from different summation orders would not differ here; the tensors agree
        raise GaliError(
            f"ranks diverged: {name} differs between rank 0 and another rank (checked before a "
            "checkpoint); the ranks no longer train one model. Check that every rank runs the same "
            "code and config, then resume from the last checkpoint"
        )


def _diverged(name: str, where: str = "") -> GaliError:
    return GaliError(
        f"checkpoint refused: {name} holds non-finite values (NaN or inf){where}; the run has "
        "diverged. Lower the learning rate (optim.lr) and resume from an earlier checkpoint "
        "(gali train --resume <run folder>/checkpoint-<images>.pt optim.lr=<lower>)"
    )


def _check_finite(named: list[tuple[str, Tensor]]) -> None:
    """Raise naming the first floating tensor that holds a NaN or inf. A non-finite entry makes its tensor's norm
    non-finite, so the norms flag every such tensor (and, by overflow, perhaps a finite one, checked exactly)."""
    floating = [(name, tensor.detach()) for name, tensor in named if tensor.is_floating_point()]
    if not floating:
        return
    norms = torch._foreach_norm([tensor for _, tensor in floating])
    flagged = (~torch.isfinite(torch.stack([norm.float() for norm in norms]))).nonzero().flatten().tolist()
    for i in flagged:
        name, tensor = floating[i]
        if not torch.isfinite(tensor).all():
            raise _diverged(name)


def _check_values(tensor: Tensor) -> Tensor:
    """``[all finite, sum, sum of squares]`` of ``tensor``, in float64 on its device (no sync)."""
    values = tensor.detach().double()
    return torch.stack([torch.isfinite(tensor).all().double(), values.sum(), values.square().sum()])
