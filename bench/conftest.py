"""Benchmarks run on CUDA when a device is present, else on CPU with Triton's interpreter (tiny shapes).

TRITON_INTERPRET is read when a kernel is decorated, i.e. when ``gali.kernels.<op>`` is first imported, so it
is set here, before the benchmark modules import a kernel, and only where no CUDA device exists (forcing it
on a GPU machine would run the kernels in the interpreter).
"""

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cuda_graphed(step: Callable[[], object]) -> Callable[[], None]:
    """Capture ``step`` in a CUDA graph (warm-up on a side stream first) and return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.fixture
def cuda_graphed() -> Callable[[Callable[[], object]], Callable[[], None]]:
    """The graph-capture helper every benchmark's '-graph' cases use."""
    return _cuda_graphed
