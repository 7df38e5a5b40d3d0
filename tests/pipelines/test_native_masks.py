"""The native DALI operator fn.gali_masks (pipelines/native): built here with CMake, run in CPU-only DALI
pipelines, byte for byte against its Python reference (gali.pipelines.masks); its build's error messages, and what a
failed or killed build leaves (nothing: shown with a fake cmake on PATH).

The plugin is built once per session into the user's cache (``$GALI_CACHE/native``, keyed by the DALI
version and the sources' hash: a clean CI machine builds it, a developer's reruns reuse it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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


# A child process: this DALI already holds the session's plugin (with the CUDA operator where nvcc is found).
CPU_ONLY_PIPELINE = """
import sys
from pathlib import Path
from PIL import Image
from gali.pipelines import native
from gali.pipelines.dali import _build_dali_pipeline
from gali.pipelines.masks import MaskSpec
from gali.pipelines.sources import scan_image_folder

library = native.load()
print(library.parent.name, native.has_cuda_backend(library))
folder = Path(sys.argv[1], "images")
folder.mkdir()
Image.new("RGB", (8, 8)).save(folder / "0.png")
index = scan_image_folder(folder, [])
for masks_device in ("cpu", "gpu"):
    pipe = _build_dali_pipeline(
        index, files=["0.png"], sample_ids=[0], masks=MaskSpec().args(1, 8, 8), shard_id=0, num_shards=1,
        resolution=8, augment=False, decode_device="mixed", layout="HWC", masks_device=masks_device,
        batch_size=1, num_threads=1, device_id=0,
    )
    pipe._build_graph()  # the operators and their devices; running it would need a GPU
    print(masks_device, [op._op.device for op in pipe._ops if type(op._op).__name__ == "GaliMasks"])
"""


def test_a_plugin_built_without_cuda_serves_a_gpu_pipeline_from_its_cpu_operator(plugin, tmp_path):
    """Issue 22, finding 4: GALI_NATIVE_CUDA=0 builds in a folder of its own that records 'cpu' only, and a GPU
    pipeline of that plugin draws its masks with the CPU operator (then copies them to the device)."""
    env = {**os.environ, "GALI_NATIVE_CUDA": "0", "GALI_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CPU_ONLY_PIPELINE, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built, on_cpu, on_gpu = done.stdout.splitlines()
    assert built == f"{plugin.parent.name.removesuffix('-cpu')}-cpu False"
    assert on_cpu == "cpu ['cpu']" and on_gpu == "gpu ['gpu']"  # the loader asks for 'gpu' only with a CUDA build
    assert native.has_cuda_backend(plugin) == (shutil.which("nvcc") is not None)


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


@pytest.fixture
def fake_cmake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Put a fake ``cmake``, a shell script of the given body, first on PATH; DALI's version reads '0' (none needed)."""
    monkeypatch.setattr(native, "_dali_version", lambda: "0")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def make(body: str) -> None:
        (bin_dir / "cmake").write_text("#!/bin/sh\n" + body)
        (bin_dir / "cmake").chmod(0o755)

    return make


def alive(pid: int) -> bool:
    """True if process ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def building_folders() -> list[Path]:
    return sorted(native.build_folder().parent.glob("*.building-*"))


def sleeping_cmake(pids: Path) -> str:
    """A fake cmake's body: it starts a child that ignores SIGTERM (as make starts the compilers), writes both pids to
    ``pids`` and waits."""
    return f"(trap '' TERM; exec sleep 60) &\necho $$ $! > {pids}.tmp && mv {pids}.tmp {pids}\nwait\n"


def test_the_next_build_removes_the_folders_of_killed_builds(fake_cmake):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = native.build_folder()
    host = socket.gethostname()
    stale = [
        folder.with_name(f"{folder.name}.building-{host}-{dead.pid}"),
        folder.with_name(f"dali-0-0123456789abcdef.building-{dead.pid}"),  # another build's, named without a host
        folder.with_name(f"{folder.name}.building-otherhost-{os.getpid()}"),  # made old below
    ]
    kept = [
        folder.with_name(f"{folder.name}.building-{host}-{os.getppid()}"),  # a live build of this host
        folder.with_name(f"{folder.name}.building-otherhost-{dead.pid}"),  # another host's: pids mean nothing here
    ]
    for work in stale + kept:
        (work / "cmake").mkdir(parents=True)
    old = time.time() - 7 * 3600
    os.utime(stale[2], (old, old))
    folder.mkdir()
    (folder / native.LIBRARY).touch()  # built already: the build returns it, and cleans up all the same
    assert native.build() == folder / native.LIBRARY
    assert building_folders() == sorted(kept)


def test_a_failed_build_removes_its_folder_and_keeps_its_log(fake_cmake):
    fake_cmake("echo 'CMake Error: something broke' >&2\nexit 1\n")
    with pytest.raises(native.NativeBuildError, match="CMake configure failed") as info:
        native.build()
    log = native.build_folder().with_name(f"{native.build_folder().name}.failed.log")
    assert f"Full log: {log}" in str(info.value) and "something broke" in log.read_text()
    assert building_folders() == [] and not native.build_folder().exists()


@contextlib.contextmanager
def ended_afterwards(pids: Path) -> Iterator[None]:
    """Inside: a test of a killed build. After it, pass or fail, kill what the fake cmake started that still runs."""
    try:
        yield
    finally:
        for pid in filter(alive, map(int, pids.read_text().split() if pids.exists() else [])):
            os.kill(pid, signal.SIGKILL)


def assert_ended(pids: Path) -> None:
    """The fake cmake and its child are gone, and so is the build's folder."""
    started = [int(pid) for pid in pids.read_text().split()]
    assert wait_until(lambda: not any(alive(pid) for pid in started), timeout=2.0)
    assert building_folders() == []


def test_an_interrupted_build_ends_its_process_group_and_removes_its_folder(fake_cmake, tmp_path):
    pids = tmp_path / "pids"
    fake_cmake(sleeping_cmake(pids))

    def interrupt() -> None:  # Ctrl-C, once the build's processes run
        if wait_until(pids.exists):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker may ignore it
    threading.Thread(target=interrupt, daemon=True).start()
    with ended_afterwards(pids):
        try:
            with pytest.raises(KeyboardInterrupt):
                native.build()
        finally:
            signal.signal(signal.SIGINT, previous)
        assert_ended(pids)


def test_killing_gali_native_build_ends_its_build(fake_cmake, tmp_path):
    pytest.importorskip("nvidia.dali")
    pids = tmp_path / "pids"
    fake_cmake(sleeping_cmake(pids))
    with ended_afterwards(pids):
        gali = subprocess.Popen([sys.executable, "-m", "gali.engine.cli", "native", "build"], stdout=subprocess.DEVNULL)
        try:
            assert wait_until(pids.exists, timeout=30.0), "the fake cmake did not start"
            gali.terminate()  # SIGTERM, as kill and schedulers send it
            assert gali.wait(timeout=10) == 128 + signal.SIGTERM
        finally:
            gali.kill()
            gali.wait()
        assert_ended(pids)
