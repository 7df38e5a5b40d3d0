"""Gradient accumulation (``run.accumulate``): N micro-batches per update, one reduction per side, resumable."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gali.engine.loop.checkpoint as checkpoint_module
from gali.engine.cli import main
from gali.engine.errors import ConfigError
from gali.engine.loop.checkpoint import load_checkpoint, save_checkpoint
from gali.engine.loop.config import load_config
from gali.engine.loop.distributed import World, local_batch_size
from gali.engine.loop.train import train
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import load_spec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.networks import Networks
from gali.engine.nets.paper import build_models
from gali.engine.step.config import ComputeConfig, OptimConfig
from gali.engine.step.eager import GaliStep
from gali.engine.step.graphed import GraphedStep
from tests.test_launch import TINY
from tests.test_step_compute import LATENT, images
from tests.tolerance import assert_twins_close, smooth_activations

MICRO, N = 4, 4  # four micro-batches of 4 images: a global batch of 16


def accumulating_step(accumulate: int, spec_name: str = "gali4") -> GaliStep:
    """make_step's tiny networks (tests/test_step_compute.py) with SiLU for LeakyReLU and no BatchNorm.

    Without BatchNorm no row of a batch depends on another, so the mean gradient of N micro-batches is the
    gradient of their union; SiLU keeps two summation orders from putting a unit on both sides of a kink.
    """
    torch.manual_seed(0)
    spec = load_spec(spec_name)
    G, E, D = build_models(
        ModelConfig(arch="svhn32", latent_dim=LATENT, width=0.125),
        slot_kinds=spec.slot_kinds,
        num_classes=spec.num_classes,
    )
    smooth_activations(G, E, D)
    for net in (G, E, D):
        for parent in list(net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, nn.Identity())
    return GaliStep(
        Networks(G=G, E=E, D=D),
        spec,
        MethodConfig(tuples=spec_name),
        OptimConfig(lr=1e-3),
        LATENT,
        ComputeConfig(kernel_impl="ref", cuda_graph=True),
        accumulate=accumulate,
    )


@pytest.mark.numerics
@pytest.mark.parametrize("phase", ["both", "d", "ge"])
def test_four_micro_batches_step_with_the_mean_gradient_of_the_global_batch(phase):
    """N = 4 on 16 images equals N = 1 on the same 16 images with the same draws, up to summation order.

    The step draws z, ε, boxes, instance noise and dropout per forward, so one N = 1 step on 16 rows draws them in
    another order than four micro-batches do. The reference is therefore four N = 1 steps, each on a fresh copy of the
    same networks and on one quarter of the batch, run in sequence from the same seed: quarter i sees exactly the
    draws of micro-batch i. With no BatchNorm the rows are independent and each head loss is a mean over its rows, so
    the mean of the four quarter gradients is the N = 1 gradient of the global batch. Compared: the gradient each side
    steps with (``.grad``, what the shared optimizer code consumes) and the step's statistics.
    """
    x, noise = images(batch=MICRO * N), torch.tensor(0.1)
    accumulated = accumulating_step(N)
    quarters = [accumulating_step(1) for _ in range(N)]
    torch.manual_seed(5)
    out = accumulated.step(x, noise, phase)
    torch.manual_seed(5)
    outs = [quarter.step(rows, noise, phase) for quarter, rows in zip(quarters, x.split(MICRO), strict=True)]

    reduction = load_spec("gali4").num_classes * MICRO * N * 32 * 32  # the most terms summed into one gradient
    sides = [side for side in ("d", "ge") if phase in ("both", side)]
    for side in sides:
        params = [step.d_params if side == "d" else step.ge_params for step in (accumulated, *quarters)]
        means = [torch.stack([p.grad for p in same]).mean(0) for same in zip(*params[1:], strict=True)]
        scale = max(mean.abs().max().item() for mean in means)
        for got, want in zip(params[0], means, strict=True):
            assert_twins_close(got.grad, want, reduction=reduction, scale=scale, msg=f"{side} gradient")
        assert_twins_close(out[f"loss_{side}"], torch.stack([o[f"loss_{side}"] for o in outs]).mean(), reduction=N)
    assert_twins_close(out["p_true"], torch.stack([o["p_true"] for o in outs]).mean(0), reduction=N)
    # and the test can fail: the mean of only the first three quarters is another gradient
    first = (accumulated.d_params if "d" in sides else accumulated.ge_params)[0]
    three = torch.stack([(q.d_params if "d" in sides else q.ge_params)[0].grad for q in quarters[:3]]).mean(0)
    with pytest.raises(AssertionError):
        assert_twins_close(first.grad, three, reduction=reduction)


def test_the_graph_ready_step_takes_the_update_batch_and_accumulates_like_the_eager_twin():
    """compute.cuda_graph with run.accumulate is supported: one graph per phase holds all micro-batches (CPU twin)."""
    eager = accumulating_step(2)
    graphed = GraphedStep(copy.deepcopy(eager))

    def run(runner: GaliStep | GraphedStep) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        outs = [runner.step(images(seed=i, batch=8), torch.tensor(0.1)) for i in range(2)]
        return [{k: v.clone() for k, v in out.items()} for out in outs]  # a graph's outputs are overwritten

    for want, got in zip(run(eager), run(graphed), strict=True):
        assert all(torch.equal(want[k], got[k]) for k in want)
    for a, b in zip(eager.d_params + eager.ge_params, graphed.inner.d_params + graphed.inner.ge_params, strict=True):
        assert torch.equal(a, b)


def test_a_batch_that_cannot_be_split_is_refused_at_start_with_sizes_that_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run\.accumulate.*got 3.*batch_size=32.*2 rank.*multiple of 6.*30, 36"):
        local_batch_size(32, World(size=2), 3)
    assert local_batch_size(48, World(size=2), 3) == 24  # each rank's batch per update: three micro-batches of 8
    with pytest.raises(ConfigError, match=r"run\.accumulate.*got 0"):
        load_config("demo", ["run.accumulate=0"])
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    cfg = load_config("demo", [*TINY, "run.accumulate=3", f"run.out_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"run\.accumulate.*e\.g\. 30, 33"):
        train(cfg, log=lambda line: None)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


class Interrupted(Exception):
    """Stands for a crash or a pre-emption right after a checkpoint was written."""


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(sorted(run_dir.glob("checkpoint-*.pt"))[-1])[1]


def _assert_equal(got, want, where: str = "state") -> None:
    """Bit-equal nested state: tensors by torch.equal, the rest by ==."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_equal(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, where


def test_an_accumulating_run_counts_real_images_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """`gali train` with run.accumulate=2: 4 updates of 32 images (2 x 16), stopped after the first checkpoint
    (64 images) and resumed by the same command line, ends bit-identical to the uninterrupted run."""
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))

    def command(run_dir: Path) -> list[str]:
        return [*TINY, "run.accumulate=2", "run.kimg=0.128", f"run.dir={run_dir}"]

    assert main(["train", *command(tmp_path / "whole")]) == 0
    whole = _final_state(tmp_path / "whole")
    status = json.loads((tmp_path / "whole" / "status.json").read_text())
    assert status["reason"] == "done" and status["kimg"] == 0.128
    assert whole["images_seen"] == 128 and whole["iteration"] == 4  # kimg counts real images; iterations are updates

    def save_then_stop(path, state):
        save_checkpoint(path, state)
        raise Interrupted(path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(load_config("demo", command(tmp_path / "parts")), log=lambda line: None)
    monkeypatch.undo()
    monkeypatch.setenv("GALI_CACHE", str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "parts").glob("checkpoint-*.pt")] == ["checkpoint-0000000064.pt"]
    assert main(["train", *command(tmp_path / "parts")]) == 0  # the same command line resumes
    parts = _final_state(tmp_path / "parts")
    for key in ("images_seen", "iteration", "G", "E", "D", "opt_d", "opt_ge", "rng"):
        _assert_equal(parts[key], whole[key], key)


def test_accumulate_auto_is_one_on_a_cpu_and_the_plans_choice_for_a_gpu_memory():
    """run.accumulate=auto: 1 without device memory to plan for; for a GPU's memory the smallest divisor N of the
    per-rank batch whose micro-batch fits by the run plan's memory model (engine/loop/plan.py: no smaller divisor's
    does), refused by name where not even one image fits."""
    from gali.engine.loop.plan import count_sizes, resolve_accumulate

    cfg = load_config("demo", ["run.accumulate=auto", "run.batch_size=96"])  # precision 'auto': bf16 on a GPU
    assert resolve_accumulate(cfg, 2, None) == 1
    sizes, per_rank = count_sizes(cfg), 48

    def need(micro_batches: int) -> float:
        return sizes.memory_bytes(per_rank // micro_batches, bf16=True, checkpointed=False, extra_gradients=True)

    for memory, micro_batches in ((need(1), 1), (need(1) - 1, 2), (need(3), 3), (need(3) - 1, 4), (need(48), 48)):
        assert resolve_accumulate(cfg, 2, memory, sizes) == micro_batches
    assert resolve_accumulate(cfg, 2, need(2) + 4096) == 2  # its own count (which may differ by a few bytes)
    with pytest.raises(ConfigError, match=r"run\.accumulate.*not even one image"):
        resolve_accumulate(cfg, 2, need(48) - 1, sizes)
    with pytest.raises(ConfigError, match=r"run\.accumulate.*often"):
        load_config("demo", ["run.accumulate=often"])
