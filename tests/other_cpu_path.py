"""Print the torch CPU kernel path for the numerics tests' second pass: one below this machine's own.

``ATEN_CPU_CAPABILITY=$(python tests/other_cpu_path.py) pytest -m numerics`` runs the parity, equivalence and
bit-exactness tests on the kernels another CPU would pick (AVX-512 machines → avx2, AVX2 machines → default).
"""

import torch

BELOW = {"AVX512": "avx2", "AVX2": "default"}

if __name__ == "__main__":
    print(BELOW.get(torch.backends.cpu.get_cpu_capability(), "default"))
