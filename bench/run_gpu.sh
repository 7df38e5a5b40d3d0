#!/usr/bin/env bash
# The whole GPU check in one command, in named stages (bash bench/run_gpu.sh --plan lists them with their work and
# estimated times). Usage, on a machine with a CUDA GPU and its torch and triton installed:
#   bash bench/run_gpu.sh [stage ...]    the default stages, or those named, in the order given
#   bash bench/run_gpu.sh --plan         what each stage does and how long it should take; needs no GPU
# First a setup stage installs what is missing (keeping the machine's torch and triton; offline, point pip at wheels:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR) and checks the imports. Each stage runs under a time limit; its output goes to
# ${OUT:-bench/out}/STAGE.log and its exit status to a PASS/FAIL/SKIP table, printed at the end and written with the
# versions, the commit, the GPU and each log's tail to ${OUT:-bench/out}/report.md. Exits 1 if a stage failed or
# did not run, 2 for an unknown stage; a machine without a CUDA GPU stops it at once.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# name | when | estimated seconds on one H200 | limit in seconds | the work
PLAN=(
  "setup|always|30|300|pip installs pyproject.toml's missing runtime and test requirements (torch and triton pinned to the machine's; DALI and ruff left out) and the package itself (--no-deps -e .), then imports each, gali from this checkout, and checks that torch sees a CUDA device"
  "tests|default|120|600|tests/kernels -m 'not slow' (the Triton kernels compiled for this GPU against their reference twins, fp32/bf16/fp16) and the fast-step tests (CUDA graph replay, bf16, no host sync)"
  "bench-kernels|default|60|360|21 kernel benchmarks, bf16, CUDA-graphed, 0.5 s of timing each: kway_head at N = 8192, F = 1536 for K = 4, K = 8 and K = 4 in 3 groups (triton, triton forward alone, reference); mask_composite box/stroke/dense at 256x3x64x64 and 256x3x256x256 (triton, reference)"
  "bench-step|default|90|360|the full-step benchmark: 3 presets (svhn32-gali4, celeba64-gali4, celeba64-gali-mix) x 7 modes (baseline, fp32, fp32-nchw, fp32-conv, bf16, graph, bf16-graph), no compiled mode"
  "train-kernels|default|60|300|two 10-kimg demo runs, compute.kernel_impl=triton and =ref"
  "train-graph|default|60|300|two 10-kimg demo runs, compute.cuda_graph=false and =true"
  "torchrun|default|45|300|a 1-rank torchrun run (NCCL, CUDA graph on) to 4 kimg, then resumed under torchrun to 6 kimg"
  "torchrun2|default|0|300|a 2-rank torchrun run (NCCL, one GPU a rank) to 4 kimg; SKIP where fewer than 2 GPUs are seen (about 45 s on two)"
  "bench-kernels-full|opt-in|180|600|all 102 kernel benchmarks (every shape, fp32 and bf16, eager and graphed, the authors' formulations), 1 s of timing each"
  "bench-compiled|opt-in|240|600|the full-step benchmark's compiled mode (torch.compile of G, E and D's trunk; cold Inductor cache) for the 3 presets"
  "bench-imagenet|opt-in|180|360|the step benchmark of the imagenet128-gali4 networks at full width: baseline, fp32, bf16, bf16-graph"
  "identity|opt-in|1200|2400|ALI vs GALI-4 on the digits at 10x the demo's budget (2 x 800 kimg), identity and pixel-MSE (gali reproduce); longer than one 10-minute device call"
  "native-masks|opt-in|60|300|builds pipelines/native's DALI-free harness (CMake, nvcc), then the masks operator's CUDA routine against its CPU routine (identical bytes) and its time per batch of 64 x 4 masks at 256x256"
)
BASIS="Estimates, not measurements: no GPU has run this script since the kernel timings of 2026-11-24 on an H100
(bench/reports/2026-11-24-h100-kernels.md), where a kernel benchmark took about 1 s of timing and the demo trained
at 2100-2900 img/s at batch 64 (its batch is 32 now). The rest is reckoned from the work: cold Triton and Inductor
caches, about 1 s per Triton compile, a few seconds of start-up per process, the fast-step tests' 5 s on 2 CPU
cores. A stage still running at its limit is killed and counted FAIL."

field() {  # field NAME INDEX: one column of NAME's row in PLAN (1 when, 2 estimate, 3 limit, 4 work)
  local row cols
  for row in "${PLAN[@]}"; do
    [[ ${row%%|*} == "$1" ]] && { IFS='|' read -ra cols <<<"$row"; echo "${cols[$2]}"; return; }
  done
}
names() {  # names WHEN...: the stages whose 'when' is one of WHEN
  local row when
  for row in "${PLAN[@]}"; do
    IFS='|' read -r _ when _ <<<"$row"
    [[ " $* " == *" $when "* ]] && echo "${row%%|*}"
  done
}

print_plan() {
  local name missing total=0
  printf '%-19s %-8s %9s %9s  %s\n' stage when estimate limit work
  for name in $(names always default opt-in); do
    printf '%-19s %-8s %7s s %7s s  %s\n' "$name" "$(field "$name" 1)" "$(field "$name" 2)" "$(field "$name" 3)" \
      "$(field "$name" 4)"
  done
  for name in $(names always default); do total=$((total + $(field "$name" 2))); done
  printf '\ndefault total: %d s (%d min %02d s) on one H200, setup included; it must stay within 8 min\n\n%s\n' \
    "$total" $((total / 60)) $((total % 60)) "$BASIS"
  missing=$(python3 bench/gpu_setup.py missing 2>&1 | paste -sd' ')
  echo
  echo "setup's requirements: $(python3 bench/gpu_setup.py requirements 2>&1 | paste -sd' ')"
  echo "missing for $(command -v python3): ${missing:-none}"
}

case ${1:-} in
  --plan) print_plan; exit 0 ;;
  -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
command_line="bash bench/run_gpu.sh${1:+ $*}"
stages=("$@")
[[ $# -gt 0 ]] || mapfile -t stages < <(names default)
for stage in "${stages[@]}"; do
  if [[ $stage == setup || -z $(field "$stage" 1) ]]; then
    echo "unknown stage '$stage'; stages: $(names default opt-in | paste -sd' ')" >&2
    exit 2
  fi
done

# Nothing below means anything without a CUDA GPU: say so at once rather than run the stages on a CPU.
no_gpu() {
  echo "bench/run_gpu.sh needs a CUDA GPU: $1. See the stages and their estimated times with: bash bench/run_gpu.sh --plan" >&2
  exit 1
}
command -v nvidia-smi >/dev/null || no_gpu "there is no nvidia-smi on PATH"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi finds no GPU"
gpus=$(python3 bench/gpu_setup.py gpus 2>/dev/null) || no_gpu "python3 cannot import torch"
[[ $gpus -ge 1 ]] || no_gpu "torch sees no CUDA device"

out=${OUT:-bench/out}
mkdir -p "$out"
export out gpus PYTHONUNBUFFERED=1 GALI_CACHE=${GALI_CACHE:-/tmp/gali-cache}

# The stages. Each is a function run in its own bash under its limit; it returns non-zero if any of its commands
# failed, and 77 for SKIP.
stage_setup() {
  local pins
  pins=$(mktemp -d) || return 1
  trap 'rm -rf "$pins"' EXIT
  python3 bench/gpu_setup.py requirements >"$pins/requirements.txt" \
    && python3 bench/gpu_setup.py constraints >"$pins/constraints.txt" \
    && echo "keeping: $(paste -sd' ' "$pins/constraints.txt")" || return 1
  if ! python3 -m pip install -c "$pins/constraints.txt" -r "$pins/requirements.txt"; then
    echo "FAIL: pip could not install: $(python3 bench/gpu_setup.py missing | paste -sd' ')"
    echo "Without a package index, bring them as wheels: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR bash bench/run_gpu.sh"
    return 1
  fi
  python3 -m pip install --no-deps --no-build-isolation -e . || return 1
  python3 bench/gpu_setup.py check
}
pytest_q() { python3 -m pytest -q -p no:cacheprovider --durations=10 "$@"; }
stage_tests() {
  local rc=0
  pytest_q tests/kernels -m "not slow" || rc=1
  pytest_q tests/test_step_compute.py tests/test_paper_step.py -m "not slow" || rc=1
  return $rc
}
stage_bench_kernels() {  # the shapes the presets use, graphed (eager times are host overhead), bf16 (the GPU default)
  local kway="test_kway_head and graph and (K4-N8192 or K8-N8192 or K4-G3-N8192)"
  local masks="test_mask_composite and graph and bfloat16 and (256x3x64x64 or 256x3x256x256) and not loop"
  pytest_q bench/test_kway_head.py bench/test_mask_composite.py -k "($kway) or ($masks)" --benchmark-max-time=0.5 \
    --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-kernels.json"
}
stage_bench_kernels_full() {
  pytest_q bench/test_kway_head.py bench/test_mask_composite.py \
    --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-kernels-full.json"
}
stage_bench_step() {
  pytest_q bench/test_step.py -k "not imagenet128 and not compiled" \
    --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-step.json"
}
stage_bench_compiled() {
  pytest_q bench/test_step.py -k "compiled and not imagenet128" \
    --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-compiled.json"
}
stage_bench_imagenet() {
  pytest_q bench/test_step.py -k imagenet128 \
    --benchmark-columns=median,min,rounds --benchmark-json="$out/bench-imagenet.json"
}
demo_run() { gali train run.device=cuda run.kimg=10 run.tick_kimg=2.5 run.snapshot_kimg=10 data.workers=4 "$@"; }
stage_train_kernels() {
  local rc=0 impl
  for impl in triton ref; do
    echo "-- compute.kernel_impl=$impl"
    demo_run compute.kernel_impl=$impl run.out_dir=/tmp/gali-runs-$impl || rc=1
  done
  return $rc
}
stage_train_graph() {
  local rc=0 graph
  for graph in false true; do
    echo "-- compute.cuda_graph=$graph"
    demo_run compute.cuda_graph=$graph run.out_dir=/tmp/gali-runs-graph || rc=1
  done
  return $rc
}
stage_torchrun() {
  rm -rf /tmp/gali-runs-torchrun
  torchrun --standalone --nproc-per-node 1 -m gali train run.device=cuda compute.cuda_graph=true run.kimg=4 \
    run.tick_kimg=1 run.snapshot_kimg=2 data.workers=4 run.out_dir=/tmp/gali-runs-torchrun || return 1
  echo "-- resumed"
  torchrun --standalone --nproc-per-node 1 -m gali train --resume /tmp/gali-runs-torchrun/00000-demo run.kimg=6
}
stage_torchrun2() {
  if [[ $gpus -lt 2 ]]; then
    echo "SKIP: torchrun2 needs 2 GPUs; torch sees $gpus"
    return 77
  fi
  rm -rf /tmp/gali-runs-torchrun2
  torchrun --standalone --nproc-per-node 2 -m gali train run.device=cuda run.kimg=4 run.tick_kimg=1 \
    run.snapshot_kimg=2 data.workers=4 run.out_dir=/tmp/gali-runs-torchrun2
}
stage_identity() {
  local demo_kimg
  demo_kimg=$(python3 -c "from gali.engine.loop.config import load_config; print(load_config('demo').run.kimg)") \
    || return 1
  gali reproduce --methods ali,gali4 --kimg "$(python3 -c "print(10 * $demo_kimg)")" --probe-draws 10 \
    --out-dir /tmp/gali-identity run.device=cuda data.workers=4 || return 1
  cp /tmp/gali-identity/reproduce.md /tmp/gali-identity/reproduce.json "$out/"
}
stage_native_masks() {
  local rc=0 device result masks
  cmake -S pipelines/native -B /tmp/gali-harness -DGALI_NATIVE_DALI=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null \
    && cmake --build /tmp/gali-harness -j 8 >/dev/null && echo "harness built" || return 1
  # 64 samples x 4 masks at 256x256: boxes, evaluation boxes and 4-stroke masks mixed, coverage 5..60 %
  masks="--seed 7 --first-id 0 --count 64 --masks 4 --height 256 --width 256 --kind-weights 1,1,2"
  masks+=" --box-min 1 --box-max 256 --eval-min 32 --eval-max 216 --strokes 4 --max-thickness 32"
  masks+=" --min-pixels 3277 --max-pixels 39322 --max-tries 8"
  for device in cpu cuda; do
    # shellcheck disable=SC2086  # $masks is a list of options
    result=$(/tmp/gali-harness/gali_masks_harness $masks --device $device --repeat 20 --out /tmp/gali-masks-$device.bin) \
      || rc=1
    echo "$device: $result"
  done
  cmp /tmp/gali-masks-cpu.bin /tmp/gali-masks-cuda.bin && echo "cuda and cpu masks identical" || rc=1
  return $rc
}
mapfile -t stage_functions < <(compgen -A function stage_)
export -f pytest_q demo_run "${stage_functions[@]}"

# The accounting: one row per stage, written to the report after each, so that a run cut short still leaves one.
declare -A status seconds
started=$(date -u '+%Y-%m-%d %H:%M UTC')
commit=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
[[ -n $(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null) ]] \
  && commit+=" (with uncommitted changes)"
gpu_names=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)
versions="(setup did not pass)"

run_stage() {  # run_stage NAME: runs stage_NAME under its limit, records PASS/FAIL/SKIP and its seconds
  local name=$1 limit rc begin
  limit=$(field "$name" 3)
  echo "== $name (limit $limit s)"
  begin=$SECONDS
  timeout -k 30 "$limit" bash -c "stage_${name//-/_}" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - begin))
  case $rc in
    0) status[$name]=PASS ;;
    77) status[$name]=SKIP ;;
    124|137) status[$name]="FAIL (killed at its $limit s limit)" ;;
    *) status[$name]="FAIL (exit $rc)" ;;
  esac
  echo "== $name: ${status[$name]} in ${seconds[$name]} s"
  write_report
}

table() {
  local name
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  for name in setup "${stages[@]}"; do
    echo "| $name | ${status[$name]:-NOT RUN} | ${seconds[$name]:--} |"
  done
}

verdict() {
  local name
  for name in setup "${stages[@]}"; do
    [[ ${status[$name]:-NOT RUN} == PASS || ${status[$name]:-} == SKIP ]] || { echo FAIL; return; }
  done
  echo PASS
}

write_report() {
  local name
  {
    echo "# GPU check, $started: $(verdict)"
    echo
    echo "- command: \`$command_line\`"
    echo "- commit: $commit"
    echo "- GPU (nvidia-smi: name, memory, driver): ${gpu_names//$'\n'/; }"
    echo "- versions:"
    echo "  - ${versions//$'\n'/$'\n'  - }"
    echo
    table
    for name in setup "${stages[@]}"; do
      [[ -f $out/$name.log && -n ${status[$name]:-} ]] || continue
      echo
      echo "## $name: ${status[$name]}"
      echo
      echo "The last 80 lines of \`$out/$name.log\`:"
      echo
      echo '```'
      tail -n 80 "$out/$name.log"
      echo '```'
    done
  } >"$out/report.md"
}

run_stage setup
if [[ ${status[setup]} == PASS ]]; then
  versions=$(python3 bench/gpu_setup.py versions 2>&1)
  for stage in "${stages[@]}"; do run_stage "$stage"; done
fi
write_report
echo
table
echo
echo "GPU check: $(verdict); report: $out/report.md"
[[ $(verdict) == PASS ]]
