"""Kernels run on CUDA when a device is present, else in Triton's CPU interpreter.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when ``gali.kernels.<op>`` is first
imported, so TRITON_INTERPRET=1 is set here, at the root of the tests, before any test module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
