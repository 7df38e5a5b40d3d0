"""Kernels run on CUDA when a device is present, else in Triton's CPU interpreter.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when ``gali.kernels.<op>`` is first
imported, so TRITON_INTERPRET=1 is set here, at the root of the tests, before any test module imports a kernel.
"""

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from gali.engine.ranges import ranges

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
