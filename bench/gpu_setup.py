"""What ``bench/run_gpu.sh`` installs and checks before its stages (standard library only: it runs before any install).

``python3 bench/gpu_setup.py COMMAND``, from the repository root:

- ``requirements``: pyproject.toml's runtime and ``test`` requirements, one a line, less torch and triton (the
  machine's own are kept), nvidia-dali and nvtx (no stage needs them; GPU images lack them) and ruff (lint only);
- ``constraints``: pins for the installed torch and triton, for ``pip install -c``, so that pip cannot replace them;
- ``missing``: the requirements whose distribution is not installed here;
- ``gpus``: how many CUDA devices torch sees (fails where torch cannot be imported);
- ``versions``: python, torch, CUDA, triton, the GPUs and each requirement's installed version;
- ``check``: ``versions``, then imports torch, triton, gali and each requirement's module, and fails (exit 1, one
  ``FAIL:`` line each) on a missing module, a torch without a CUDA device, a gali imported from another checkout, or
  no ``gali``/``torchrun`` command on PATH.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEPT = ("torch", "triton")  # the machine's builds, matched to its driver and CUDA
LEFT_OUT = ("nvidia-dali", "ruff", "nvtx")  # name prefixes that no stage needs (nvtx: compute.nvtx only)
MODULES = {  # distribution -> import name, where they differ by more than '-' and '_'
    "pillow": "PIL",
    "scikit-learn": "sklearn",
    "pytest-xdist": "xdist",
}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower()


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    chosen = {}
    for requirement in wanted:
        name = _name(requirement)
        if name not in KEPT and not name.startswith(LEFT_OUT):
            chosen.setdefault(name, requirement.split("#")[0].strip())
    return list(chosen.values())


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraints() -> list[str]:
    return [f"{name}=={version}" for name in KEPT if (version := _installed(name))]


def missing() -> list[str]:
    return [requirement for requirement in requirements() if _installed(_name(requirement)) is None]


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def versions() -> list[str]:
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    try:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(gpus())]
        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs seen by torch: {names or 'none'}")
    except ImportError as error:
        lines.append(f"torch: not importable ({error})")
    lines.append(f"triton {_installed('triton')}")
    found = (f"{_name(r)} {_installed(_name(r)) or 'MISSING'}" for r in requirements())
    lines.append("requirements: " + ", ".join(found))
    return lines


def check() -> list[str]:
    """The failures, one line each; none when every stage has what it imports."""
    modules = ["torch", "triton", "gali"]
    modules += [MODULES.get(_name(r), _name(r).replace("-", "_")) for r in requirements()]
    failures = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # an import can fail with more than ImportError (a broken CUDA build, say)
            failures.append(f"cannot import {module}: {type(error).__name__}: {error}")
    if "torch" in sys.modules and not gpus():
        failures.append("torch sees no CUDA device")
    if (gali := sys.modules.get("gali")) is not None and not Path(gali.__file__).resolve().is_relative_to(ROOT):
        failures.append(f"gali is imported from {Path(gali.__file__).parent}, not from this checkout ({ROOT})")
    failures += [f"no '{command}' command on PATH" for command in ("gali", "torchrun") if not shutil.which(command)]
    return failures


def main(command: str) -> int:
    if command in ("requirements", "constraints", "missing", "versions"):
        for line in globals()[command]():
            print(line)
    elif command == "gpus":
        print(gpus())
    elif command == "check":
        for line in versions():
            print(line)
        failures = check()
        for failure in failures:
            print(f"FAIL: {failure}")
        if failures:
            return 1
        print("every import the stages need is there, and torch sees a CUDA device")
    else:
        print(f"usage: python3 {Path(__file__).name} requirements|constraints|missing|gpus|versions|check")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) == 2 else ""))
