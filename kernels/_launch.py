"""Launch helpers every op file shares (as Liger-Kernel's ``ops/utils.py``), defined here once.

- the optional triton import: ``triton``, ``tl`` and ``InterpretedFunction`` (all None without the package;
  the op files then define no kernels and their reference twins still run), and :func:`interpreted`, whether
  a kernel runs in Triton's CPU interpreter;
- the ``impl`` names every public op accepts (:data:`IMPLS`, :data:`Impl`) and :func:`use_triton`, the one
  resolution of ``impl`` to the Triton path or the reference;
- :func:`device_guard`, the CUDA device context around a launch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the reference paths work without triton
    triton = tl = InterpretedFunction = None

__all__ = ["IMPLS", "Impl", "InterpretedFunction", "device_guard", "interpreted", "tl", "triton", "use_triton"]

Impl = Literal["auto", "triton", "ref"]
IMPLS: tuple[str, ...] = ("auto", "triton", "ref")


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter. Triton decides interpreted-or-compiled when a
    kernel is decorated, i.e. when its op module is first imported, from TRITON_INTERPRET."""
    return InterpretedFunction is not None and isinstance(kernel, InterpretedFunction)


def use_triton(op: str, impl: str, t: object, dtypes: tuple[torch.dtype, ...], kernel: object) -> bool:
    """Resolve ``impl`` for op ``op`` on input ``t``: True runs the Triton path, False the reference.

    'auto' is Triton on CUDA tensors of a dtype in ``dtypes`` and the reference elsewhere; 'ref' is always
    the reference; 'triton' is an error where Triton cannot run: without the triton package, or on a CPU
    tensor when ``kernel`` (one of the op's kernels) was not decorated in Triton's interpreter, or on any
    other device. A ``t`` that is not a tensor resolves as on CUDA, so that the op's input checks name it.
    An unknown ``impl`` is a ValueError. Errors name the op and say what to do.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r} ('auto': Triton on CUDA, else ref)")
    if impl == "ref":
        return False
    on_cuda = isinstance(t, Tensor) and t.is_cuda
    if impl == "auto":
        return triton is not None and on_cuda and t.dtype in dtypes
    if triton is None:
        raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install triton); or use impl='ref'")
    if on_cuda or not isinstance(t, Tensor):
        return True
    if t.device.type == "cpu":
        if interpreted(kernel):
            return True
        module = getattr(getattr(kernel, "fn", kernel), "__module__", "the op's module")
        raise RuntimeError(
            f"{op}: impl='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            f"{module} is first imported; or use impl='ref'"
        )
    raise RuntimeError(
        f"{op}: impl='triton' runs on CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got a tensor on "
        f"{t.device}; use impl='auto' or impl='ref'"
    )


def device_guard(t: Tensor) -> AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device); a no-op context on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()
