"""Kernels run on CUDA when a device is present, else in Triton's CPU interpreter.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when ``gali.kernels.<op>`` is first
imported, so TRITON_INTERPRET=1 is set here, at the root of the tests, before any test module imports a kernel.
"""

import contextlib
import getpass
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gali.engine.ranges import ranges

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One Inductor cache per CPU kernel path: torch 2.13 reuses C++ built under one ATEN_CPU_CAPABILITY under
# another, which gave wrong gradients (and once a double free) in the numerics pass on another path. And one per
# version of the kernels: AOTAutograd's cache keys a graph by its forward, not by a custom op's registered backward,
# so a changed backward was served stale from the cache (wrong gradients in the kernels' compile test).
CPU_PATH = torch.backends.cpu.get_cpu_capability()
KERNELS = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parents[1].glob("kernels/*.py"))))
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{CPU_PATH}_{KERNELS.hexdigest()[:12]}"),
)


def pytest_report_header() -> str:
    """The CPU kernel path torch runs on (the numerics tests run again under another: tests/other_cpu_path.py)."""
    chosen = os.environ.get("ATEN_CPU_CAPABILITY", "unset: the machine's best")
    return f"torch {torch.__version__}, CPU kernel path {CPU_PATH} (ATEN_CPU_CAPABILITY={chosen})"


@pytest.fixture
def recorded_ranges():
    """A context manager: ranges on inside it, and the ``gali/*`` ranges entered there, in order, after it.

    The names are read from outside, as a user sees them: from torch.profiler, which records every
    range as a ``record_function`` label.
    """

    @contextlib.contextmanager
    def record() -> Iterator[list[str]]:
        names: list[str] = []
        with ranges(True), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            yield names
        entered = [e for e in profiler.events() if e.name.startswith("gali/")]
        names += [e.name for e in sorted(entered, key=lambda e: (e.time_range.start, -e.time_range.end))]

    return record
