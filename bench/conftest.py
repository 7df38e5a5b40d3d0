"""Benchmarks run on CUDA when a device is present, else on CPU with Triton's interpreter (tiny shapes).

TRITON_INTERPRET is read when a kernel is decorated, i.e. when ``gali.kernels.<op>`` is first imported, so it
is set here, before the benchmark modules import a kernel, and only where no CUDA device exists (forcing it
on a GPU machine would run the kernels in the interpreter).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
