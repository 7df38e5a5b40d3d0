#!/usr/bin/env bash
# The whole GPU check in one command, in named stages (all of them by default, in this order):
#   tests         kernel and fast-step tests compiled for real (CUDA graphs, bf16, no host sync)
#   bench-kernels kernel benchmarks                      bench-step   the full-step benchmark
#   train-kernels a short demo run per kernel path       train-graph  the same, eager and CUDA-graphed
#   torchrun      a 1-GPU torchrun run (NCCL process group, CUDA graph on), then resumed under torchrun
# and, only when named (not timed on a GPU yet; identity takes up to 6 minutes of the 8):
#   bench-imagenet the step benchmark of the imagenet128-gali4 networks at full width: baseline, fp32, bf16, bf16-graph
#   identity      ALI vs GALI-4 on the digits at 10x the demo's budget, identity and pixel-MSE (gali reproduce)
#   native-masks  the masks operator's CUDA routine against its CPU routine (identical bytes) and its time per
#                 batch of 64 x 4 masks at 256x256, through the DALI-free harness of pipelines/native (CMake, nvcc)
# Writes logs and JSON under ${OUT:-bench/out}. The default stages must finish in 8 minutes on one H100/H200.
# Usage (on a machine with a CUDA GPU, torch and triton installed): bash bench/run_gpu.sh [stage ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GALI_CACHE=${GALI_CACHE:-/tmp/gali-cache}
stages=${*:-tests bench-kernels bench-step train-kernels train-graph torchrun}
for stage in $stages; do
  case $stage in tests|bench-kernels|bench-step|train-kernels|train-graph|torchrun|bench-imagenet|identity|native-masks) ;;
    *) echo "unknown stage '$stage'; stages: tests bench-kernels bench-step train-kernels train-graph torchrun" \
            "bench-imagenet identity native-masks" >&2
       exit 2 ;;
  esac
done

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
  echo "stages: $stages"
} 2>&1 | tee "$out/env.txt"

# Install the package without touching the machine's torch/triton.
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

for stage in $stages; do
  echo "== $stage"
  case $stage in
    tests)
      python3 -m pytest -q tests/kernels -m "not slow" -p no:cacheprovider 2>&1 | tee "$out/tests-kernels.txt" | tail -3
      python3 -m pytest -q tests/test_step_compute.py tests/test_paper_step.py -m "not slow" -p no:cacheprovider 2>&1 \
        | tee "$out/tests-fast-step.txt" | tail -3 ;;
    bench-kernels)
      python3 -m pytest -q bench/test_kway_head.py bench/test_mask_composite.py -p no:cacheprovider \
        --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-kernels.json" 2>&1 \
        | tee "$out/bench-kernels.txt" | tail -40 ;;
    bench-step)
      python3 -m pytest -q bench/test_step.py -k "not imagenet128" -p no:cacheprovider \
        --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-step.json" 2>&1 \
        | tee "$out/bench-step.txt" | tail -30 ;;
    bench-imagenet)
      timeout 300 python3 -m pytest -q bench/test_step.py -k imagenet128 -p no:cacheprovider \
        --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-imagenet.json" 2>&1 \
        | tee "$out/bench-imagenet.txt" | tail -12 ;;
    train-kernels)
      for impl in triton ref; do
        gali train run.device=cuda compute.kernel_impl=$impl run.kimg=10 run.tick_kimg=2.5 run.snapshot_kimg=10 \
          data.workers=4 run.out_dir=/tmp/gali-runs-$impl 2>&1 | tee "$out/train-demo-$impl.txt" | tail -4
      done ;;
    train-graph)
      for mode in "compute.cuda_graph=false" "compute.cuda_graph=true"; do
        gali train run.device=cuda $mode run.kimg=10 run.tick_kimg=2.5 run.snapshot_kimg=10 data.workers=4 \
          run.out_dir=/tmp/gali-runs-graph 2>&1 | tee "$out/train-demo-${mode##*=}-graph.txt" | tail -4
      done ;;
    torchrun)
      rm -rf /tmp/gali-runs-torchrun
      torchrun --standalone --nproc-per-node 1 -m gali train run.device=cuda compute.cuda_graph=true run.kimg=4 \
        run.tick_kimg=1 run.snapshot_kimg=2 data.workers=4 run.out_dir=/tmp/gali-runs-torchrun 2>&1 \
        | tee "$out/torchrun.txt" | tail -4
      torchrun --standalone --nproc-per-node 1 -m gali train --resume /tmp/gali-runs-torchrun/00000-demo \
        run.kimg=6 2>&1 | tee -a "$out/torchrun.txt" | tail -3 ;;
    identity)
      demo_kimg=$(python3 -c "from gali.engine.loop.config import load_config; print(load_config('demo').run.kimg)")
      timeout 360 gali reproduce --methods ali,gali4 --kimg "$(python3 -c "print(10 * $demo_kimg)")" --probe-draws 10 \
        --out-dir /tmp/gali-identity run.device=cuda data.workers=4 2>&1 | tee "$out/identity.txt" | tail -12
      cp /tmp/gali-identity/reproduce.md /tmp/gali-identity/reproduce.json "$out/" 2>/dev/null ;;
    native-masks)
      { cmake -S pipelines/native -B /tmp/gali-harness -DGALI_NATIVE_DALI=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null \
          && cmake --build /tmp/gali-harness -j 8 >/dev/null && echo "harness built"
        # 64 samples x 4 masks at 256x256: boxes, evaluation boxes and 4-stroke masks mixed, coverage 5..60 %
        masks="--seed 7 --first-id 0 --count 64 --masks 4 --height 256 --width 256 --kind-weights 1,1,2"
        masks+=" --box-min 1 --box-max 256 --eval-min 32 --eval-max 216 --strokes 4 --max-thickness 32"
        masks+=" --min-pixels 3277 --max-pixels 39322 --max-tries 8"
        for device in cpu cuda; do
          echo "$device: $(/tmp/gali-harness/gali_masks_harness $masks --device $device --repeat 20 \
            --out /tmp/gali-masks-$device.bin)"
        done
        cmp /tmp/gali-masks-cpu.bin /tmp/gali-masks-cuda.bin && echo "cuda and cpu masks identical"
      } 2>&1 | tee "$out/native-masks.txt" ;;
  esac
done
