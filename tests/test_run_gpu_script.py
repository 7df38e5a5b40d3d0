"""bench/run_gpu.sh checked on a CPU: it stops at once without a GPU, its plan fits 8 minutes, and its table is honest.

The table is checked with fake ``nvidia-smi``, ``python3``, ``gali`` and ``torchrun`` first on PATH: the script finds
every command through PATH, so the fakes pass its GPU checks and make a chosen stage's command fail, with no GPU and
no hook in the script. The fakes log each call; the fake ``python3`` hands what it does not fake (reading
pyproject.toml) to the real interpreter.
"""

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "run_gpu.sh"
DEFAULT = ["tests", "bench-kernels", "bench-step", "train-kernels", "train-graph", "torchrun", "torchrun2"]
OPT_IN = ["bench-kernels-full", "bench-compiled", "bench-imagenet", "identity", "native-masks"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a CUDA GPU")

FAIL_IF_ASKED = """[[ -n ${FAKE_FAIL:-} && "$*" == *"$FAKE_FAIL"* ]] && { echo "fake failure: $*"; exit 1; }
echo "fake: $*"
exit 0"""
FAKES = {
    "nvidia-smi": """echo "nvidia-smi $*" >>"$FAKE_LOG"
if [[ $* == -L ]]; then
  [[ ${FAKE_GPUS:-1} -gt 0 ]] || { echo "No devices were found"; exit 6; }
  for ((i = 0; i < ${FAKE_GPUS:-1}; i++)); do echo "GPU $i: NVIDIA H200 (fake)"; done
else
  echo "NVIDIA H200 (fake), 143771 MiB, 580.159.03"
fi""",
    "python3": f"""echo "python3 $*" >>"$FAKE_LOG"
[[ $* == "-m pip install -c "*" -r "* ]] && cat "$5" "$7" >>"$FAKE_LOG"  # what pip was asked to install, and pins
case "$*" in
  *"gpu_setup.py gpus"*) echo "${{FAKE_TORCH_GPUS:-${{FAKE_GPUS:-1}}}}"; exit 0 ;;
  *"gpu_setup.py check"*) echo "fake check"; exit "${{FAKE_CHECK_RC:-0}}" ;;
  *"gpu_setup.py versions"*) echo "torch 2.11.0 (fake), CUDA 13.0"; exit 0 ;;
  *"-m pip "* | *"-m pytest "*) {FAIL_IF_ASKED} ;;
esac
exec {sys.executable} "$@"
""",
    "gali": f'echo "gali $*" >>"$FAKE_LOG"\n{FAIL_IF_ASKED}',
    "torchrun": f'echo "torchrun $*" >>"$FAKE_LOG"\n{FAIL_IF_ASKED}',
}


def run_script(*args: str, env: dict[str, str], limit: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """``bash bench/run_gpu.sh ARGS`` and its seconds; its whole process group is killed past ``limit``."""
    start = time.monotonic()
    process = subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"bash bench/run_gpu.sh {' '.join(args)} still ran after {limit} s")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), time.monotonic() - start


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a run: its OUT and cache in tmp_path, this interpreter's folder first on PATH."""
    return {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "GALI_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.fixture
def fake_gpu(tmp_path, env) -> dict[str, str]:
    """``env`` with the fakes first on PATH: one GPU, every command passes unless FAKE_FAIL is in its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log")}


def table(stdout: str) -> dict[str, str]:
    """The final table's rows: stage -> status."""
    return {m[1]: m[2] for m in re.finditer(r"^\| ([\w-]+) \| ([^|]+?) \| [\d-]+ \|$", stdout, re.MULTILINE)}


def calls(env: dict[str, str]) -> str:
    return Path(env["FAKE_LOG"]).read_text()


@NO_GPU
def test_without_a_cuda_gpu_it_stops_at_once_and_says_why(env):
    result, seconds = run_script(env=env)
    assert result.returncode != 0
    assert seconds < 30
    assert "needs a CUDA GPU" in result.stderr
    assert "bash bench/run_gpu.sh --plan" in result.stderr
    assert not (Path(env["OUT"]) / "report.md").exists()


@pytest.mark.parametrize(
    ("fakes", "reason"),
    [({"FAKE_GPUS": "0"}, "nvidia-smi finds no GPU"), ({"FAKE_TORCH_GPUS": "0"}, "torch sees no CUDA device")],
    ids=["no-gpu-listed", "torch-without-cuda"],
)
def test_with_nvidia_smi_but_no_usable_gpu_it_stops_at_once(fake_gpu, fakes, reason):
    result, seconds = run_script(env={**fake_gpu, **fakes})
    assert result.returncode == 1
    assert seconds < 30
    assert f"needs a CUDA GPU: {reason}" in result.stderr
    assert "-m pip" not in calls(fake_gpu)


def test_the_plan_lists_every_stage_and_the_defaults_fit_in_eight_minutes(env):
    result, _ = run_script("--plan", env=env)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^([\w-]+) +(always|default|opt-in) +(\d+) s +(\d+) s +\S", result.stdout, re.MULTILINE)
    when = {name: kind for name, kind, _, _ in rows}
    assert when == {"setup": "always"} | dict.fromkeys(DEFAULT, "default") | dict.fromkeys(OPT_IN, "opt-in")
    total = int(re.search(r"^default total: (\d+) s", result.stdout, re.MULTILINE)[1])
    assert total == sum(int(estimate) for _, kind, estimate, _ in rows if kind != "opt-in")
    assert total <= 8 * 60
    assert all(int(limit) >= int(estimate) for _, _, estimate, limit in rows)
    assert "Estimates, not measurements" in result.stdout


def test_an_unknown_stage_exits_2_and_names_the_stages(env):
    result, _ = run_script("tests", "no-such-stage", env=env)
    assert result.returncode == 2
    assert "unknown stage 'no-such-stage'" in result.stderr
    assert all(stage in result.stderr for stage in DEFAULT + OPT_IN)


def test_a_failing_stage_fails_the_run_and_the_next_stages_still_run(fake_gpu):
    result, _ = run_script(env={**fake_gpu, "FAKE_FAIL": "bench/test_step.py"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert table(result.stdout) == {
        "setup": "PASS",
        "tests": "PASS",
        "bench-kernels": "PASS",
        "bench-step": "FAIL (exit 1)",
        "train-kernels": "PASS",
        "train-graph": "PASS",
        "torchrun": "PASS",
        "torchrun2": "SKIP",  # one fake GPU
    }
    assert "GPU check: FAIL" in result.stdout
    report = (Path(fake_gpu["OUT"]) / "report.md").read_text()
    assert re.match(r"# GPU check, .+: FAIL\n", report)
    assert "| bench-step | FAIL (exit 1) |" in report
    assert "NVIDIA H200 (fake), 143771 MiB" in report and "torch 2.11.0 (fake)" in report
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.strip() in report
    assert "## bench-step: FAIL (exit 1)" in report and "fake failure: -m pytest -q -p no:cacheprovider" in report
    assert "SKIP: torchrun2 needs 2 GPUs" in report


def test_a_failure_in_the_middle_of_a_stage_fails_it(fake_gpu):
    """train-kernels' first run fails and its second passes: the stage fails."""
    result, _ = run_script("train-kernels", env={**fake_gpu, "FAKE_FAIL": "kernel_impl=triton"})
    assert table(result.stdout) == {"setup": "PASS", "train-kernels": "FAIL (exit 1)"}
    assert result.returncode == 1
    assert "compute.kernel_impl=ref" in calls(fake_gpu)


def test_every_stage_passing_passes_and_setup_keeps_torch(fake_gpu):
    result, _ = run_script(env=fake_gpu)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(table(result.stdout).values()) == {"PASS", "SKIP"}
    assert "GPU check: PASS" in result.stdout
    log = calls(fake_gpu)
    assert re.search(r"^python3 -m pip install -c \S+constraints.txt -r \S+requirements.txt$", log, re.MULTILINE)
    lines = log.splitlines()
    assert {f"torch=={importlib.metadata.version('torch')}", "pytest-benchmark>=4", "scikit-learn>=1.3"} <= set(lines)
    assert not [line for line in lines if re.match(r"(torch|triton|nvidia-dali)\b(?!==)", line)]
    assert "python3 -m pip install --no-deps --no-build-isolation -e .\n" in log
    assert " bench/test_step.py -k not imagenet128 and not compiled " in log


@pytest.mark.parametrize("cause", ["pip", "imports"])
def test_a_failed_setup_runs_no_stage(fake_gpu, cause):
    failing = {"FAKE_FAIL": "-m pip install -c"} if cause == "pip" else {"FAKE_CHECK_RC": "1"}
    result, _ = run_script("tests", "torchrun", env={**fake_gpu, **failing})
    assert result.returncode == 1
    assert table(result.stdout) == {"setup": "FAIL (exit 1)", "tests": "NOT RUN", "torchrun": "NOT RUN"}
    assert "-m pytest" not in calls(fake_gpu) and "torchrun" not in calls(fake_gpu)
    if cause == "pip":
        assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR" in result.stdout


def test_the_two_gpu_stage_runs_two_ranks_on_two_gpus(fake_gpu):
    result, _ = run_script("torchrun2", env={**fake_gpu, "FAKE_GPUS": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert table(result.stdout) == {"setup": "PASS", "torchrun2": "PASS"}
    assert "torchrun --standalone --nproc-per-node 2 -m gali train run.device=cuda" in calls(fake_gpu)


def test_setup_installs_the_requirements_but_keeps_the_machines_torch_and_triton(env):
    def helper(command: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "bench/gpu_setup.py", command], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return done.stdout.split()

    names = {re.match(r"[\w.-]+", requirement)[0].lower() for requirement in helper("requirements")}
    assert {"numpy", "scikit-learn", "tqdm", "pytest", "pytest-benchmark", "tensorboard"} <= names
    assert not names & {"torch", "triton", "ruff"} and not any(name.startswith("nvidia-dali") for name in names)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "triton")]
    assert helper("constraints") == pins


@NO_GPU
def test_the_import_check_fails_without_a_cuda_device():
    done = subprocess.run([sys.executable, "bench/gpu_setup.py", "check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "FAIL: torch sees no CUDA device" in done.stdout
