"""The native DALI operator fn.gali_masks (pipelines/native): built here with CMake, run in CPU-only DALI
pipelines, byte for byte against its Python reference (gali.pipelines.masks); its build's error messages.

The plugin is built once per session into the user's cache (``$GALI_CACHE/native``, keyed by the DALI
version and the sources' hash: a clean CI machine builds it, a developer's reruns reuse it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gali.engine.cli import main
from gali.engine.loop.config import load_config
from gali.engine.loop.train import train
from gali.pipelines import check_batch, make_pipeline, native
from gali.pipelines.config import DataConfig
from gali.pipelines.masks import MaskSpec, draw_masks

CPU = torch.device("cpu")
USER_CACHE = os.environ.get("GALI_CACHE")  # read before the pipeline tests' per-test cache replaces it


@pytest.fixture(scope="session")
def plugin() -> Path:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    with pytest.MonkeyPatch.context() as patch:
        if USER_CACHE is None:
            patch.delenv("GALI_CACHE", raising=False)
        else:
            patch.setenv("GALI_CACHE", USER_CACHE)
        return native.load()


def run_operator(ids: list[int], spec: MaskSpec, num_masks: int, height: int, width: int, batch_size: int = 4):
    """The operator's masks of ``ids`` from a CPU-only DALI pipeline fed by an external source."""
    from nvidia.dali import fn, pipeline_def

    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def masks_pipeline():
        sample_ids = fn.external_source(
            source=lambda info: [np.array(i, dtype=np.int64) for i in batches[info.iteration]],
            batch=True,
            batch_info=True,
        )
        return fn.gali_masks(sample_ids, **spec.args(num_masks, height, width).as_kwargs())

    pipe = masks_pipeline()
    pipe.build()
    out = []
    for batch in batches:
        (masks,) = pipe.run()
        out.extend(np.array(masks[i]) for i in range(len(batch)))
    return np.stack(out)


SPECS = {
    "box": MaskSpec(),
    "mixture": MaskSpec(kind_weights=(1.0, 1.0, 2.0), num_strokes=5, max_thickness=4, seed=11),
    "coverage": MaskSpec(kind_weights=(1.0, 0.0, 1.0), min_coverage=0.15, max_coverage=0.4, max_tries=3, seed=2),
    "fallback": MaskSpec(box_max=2, min_coverage=0.1, max_tries=2, seed=3),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_operator_equals_the_reference_byte_for_byte(plugin, name):
    ids = [0, 1, 7, 123456789, 2**40 + 3, 5, 6, 9]
    got = run_operator(ids, SPECS[name], num_masks=2, height=20, width=24)
    assert got.shape == (8, 2, 20, 24) and got.dtype == np.uint8
    assert np.array_equal(got, draw_masks(ids, SPECS[name].args(2, 20, 24)))


def test_harness_equals_the_reference(plugin, tmp_path):
    """The DALI-free harness (what bench/run_gpu.sh runs on a GPU without DALI) draws the reference's masks."""
    import subprocess

    args = SPECS["mixture"].args(3, 17, 13)
    out = tmp_path / "masks.bin"
    command = [
        str(plugin.parent / native.HARNESS),
        "--seed",
        str(args.mask_seed),
        "--first-id",
        "100",
        "--count",
        "5",
        "--masks",
        "3",
        "--height",
        "17",
        "--width",
        "13",
        "--kind-weights",
        ",".join(map(str, args.kind_weights)),
        "--box-min",
        str(args.box_min),
        "--box-max",
        str(args.box_max),
        "--eval-min",
        str(args.eval_min),
        "--eval-max",
        str(args.eval_max),
        "--strokes",
        str(args.num_strokes),
        "--max-thickness",
        str(args.max_thickness),
        "--min-pixels",
        str(args.min_pixels),
        "--max-pixels",
        str(args.max_pixels),
        "--max-tries",
        str(args.max_tries),
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True)
    got = np.fromfile(out, dtype=np.uint8).reshape(5, 3, 17, 13)
    assert np.array_equal(got, draw_masks(range(100, 105), args))
    bad = subprocess.run([*command[:-2], "--box-max", "99", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "box_max = 99" in bad.stderr


def test_a_samples_masks_do_not_depend_on_its_batch(plugin):
    spec = SPECS["mixture"]
    alone = run_operator([42], spec, 1, 16, 16, batch_size=1)[0]
    assert np.array_equal(run_operator([3, 42, 8], spec, 1, 16, 16, batch_size=3)[1], alone)
    assert np.array_equal(run_operator([42, 42], spec, 1, 16, 16, batch_size=2), np.stack([alone, alone]))


def test_coverage_statistics_over_many_draws(plugin):
    spec = SPECS["coverage"]
    masks = run_operator(list(range(512)), spec, 1, 16, 16, batch_size=128)[:, 0]
    coverage = masks.reshape(512, -1).mean(1)
    assert coverage.min() >= 0.15 and coverage.max() <= 0.4


def test_bad_operator_argument_is_named(plugin):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def broken():
        ids = fn.external_source(source=lambda: [np.array(0, dtype=np.int64)], batch=True)
        return fn.gali_masks(ids, **{**MaskSpec().args(1, 8, 8).as_kwargs(), "box_max": 9})

    with pytest.raises(RuntimeError, match="box_max"):
        pipe = broken()
        pipe.build()
        pipe.run()


def test_dali_backend_masks_follow_the_sample_and_equal_the_torch_backends(plugin, id_folder):
    root = id_folder(n=24)
    args = SPECS["mixture"].args(2, 8, 8)
    want = draw_masks(range(24), args)  # image i of the folder is sample i of the split
    seen = set()
    for backend in ("dali", "torch"):
        cfg = DataConfig(source="folder", root=str(root), resolution=8, backend=backend, workers=1)
        for batch_size, seed, rank, world in ((4, 0, 0, 1), (6, 3, 1, 2)):
            pipe = make_pipeline(
                cfg,
                split="train",
                batch_size=batch_size,
                device=CPU,
                seed=seed,
                rank=rank,
                world_size=world,
                masks=args,
            )
            for batch in pipe:
                check_batch(batch, batch_size=batch_size, resolution=8, device=CPU, num_masks=2, num_classes=1)
                for x, masks in zip(batch.x, batch.masks, strict=True):
                    r, g = np.rint((x[:2, 0, 0].double().numpy() + 1.0) * 127.5).astype(int)
                    assert np.array_equal(masks.numpy(), want[r + 256 * g])
                    seen.add((backend, int(r + 256 * g)))
    assert len(seen) == 48


def test_gali_mix_trains_through_dali_with_pipeline_masks(plugin, tmp_path):
    overrides = [
        "method.tuples=gali-mix",
        "method.mask_source=pipeline",
        "method.mask_kinds=box:0.5,stroke:0.5",
        "data.backend=dali",
        "data.workers=1",
        "model.width=0.125",
        "model.latent_dim=16",
        "run.batch_size=16",
        "run.kimg=0.048",
        "run.tick_kimg=0.016",
        "run.snapshot_kimg=0.048",
        "run.grid_size=2",
        "run.identity_images=0",
        f"run.out_dir={tmp_path / 'runs'}",
    ]
    result = train(load_config("demo", overrides), log=lambda line: None)
    assert result.kimg == pytest.approx(0.048) and np.isfinite(result.recon_mse)


def test_gali_native_build_prints_the_library(plugin, capsys, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(plugin.parents[2]))
    assert main(["native", "build"]) == 0
    assert str(plugin) in capsys.readouterr().out


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("GALI_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("GALI_NATIVE_CUDA", "0")
    with pytest.raises(native.NativeBuildError, match=r"no working C\+\+ compiler \(CXX=/nonexistent/g\+\+\).*apt"):
        native.build()
    assert not (native.build_folder() / native.LIBRARY).exists()


def test_missing_cmake_is_named(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("GALI_CACHE", str(tmp_path))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(native.NativeBuildError, match=r"CMake is not on PATH.*pip install cmake"):
        native.build()


def test_missing_dali_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GALI_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails as if not installed
    with pytest.raises(native.NativeBuildError, match="NVIDIA DALI, which is not installed: pip install nvidia-dali"):
        native.build()
