#!/usr/bin/env bash
# The whole GPU check in one command: kernel and fast-step tests compiled for real (CUDA graphs, bf16, no
# host sync), kernel and full-step benchmarks, and a short training run per kernel implementation and step
# mode. Writes logs and JSON under ${OUT:-bench/out}.
# Usage (on a machine with a CUDA GPU, torch and triton installed): bash bench/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GALI_CACHE=${GALI_CACHE:-/tmp/gali-cache}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
} 2>&1 | tee "$out/env.txt"

# Install the package without touching the machine's torch/triton.
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

python3 -m pytest -q tests/kernels -m "not slow" -p no:cacheprovider 2>&1 | tee "$out/tests-kernels.txt" | tail -3
python3 -m pytest -q tests/test_step_compute.py tests/test_paper_step.py -p no:cacheprovider 2>&1 \
  | tee "$out/tests-fast-step.txt" | tail -3

python3 -m pytest -q bench/test_kway_head.py bench/test_mask_composite.py -p no:cacheprovider \
  --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-kernels.json" 2>&1 \
  | tee "$out/bench-kernels.txt" | tail -40

python3 -m pytest -q bench/test_step.py -p no:cacheprovider --benchmark-columns=median,min,rounds \
  --benchmark-json="$out/bench-step.json" 2>&1 | tee "$out/bench-step.txt" | tail -30

for impl in triton ref; do
  gali train run.device=cuda compute.kernel_impl=$impl run.kimg=10 run.tick_kimg=2.5 run.snapshot_kimg=10 \
    data.workers=4 run.out_dir=/tmp/gali-runs-$impl 2>&1 | tee "$out/train-demo-$impl.txt" | tail -4
done

for mode in "compute.cuda_graph=false" "compute.cuda_graph=true"; do
  gali train run.device=cuda $mode run.kimg=10 run.tick_kimg=2.5 run.snapshot_kimg=10 data.workers=4 \
    run.out_dir=/tmp/gali-runs-graph 2>&1 | tee "$out/train-demo-${mode##*=}-graph.txt" | tail -4
done
