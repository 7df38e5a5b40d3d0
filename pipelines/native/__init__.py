"""The native DALI operator ``fn.gali_masks``: built on demand with CMake, cached, loaded into DALI.

The sources beside this file (``mask_sampler.h``, the one sampling routine; ``gali_masks.cc``, the CPU operator;
``gali_masks.cu``, the CUDA operator; ``CMakeLists.txt``) are compiled with CMake and the system's C++ compiler the
first time a pipeline needs them, into ``$GALI_CACHE/native/dali-<version>-<source hash>/`` (``~/.cache/gali`` by
default), reused until DALI or the sources change. The CUDA operator is built where CMake finds a CUDA compiler
(``GALI_NATIVE_CUDA=0`` skips it). ``gali native build`` builds it explicitly and prints where. Ranks may build at once:
each in its own folder, the first to finish renames it into place. Without CMake, a compiler or DALI,
:class:`NativeBuildError` says what is missing and how to install it; nothing else in gali needs the plugin (the torch
backend draws the same masks in Python).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from gali.engine.errors import GaliError

from ..digits import cache_root

__all__ = ["HARNESS", "LIBRARY", "NativeBuildError", "build", "build_folder", "load"]

SOURCES = Path(__file__).resolve().parent
LIBRARY = "libgali_masks.so"
HARNESS = "gali_masks_harness"  # the same routine without DALI (CPU, and CUDA where built): tests, bench/run_gpu.sh
_SOURCE_SUFFIXES = (".h", ".cc", ".cu", ".txt")
_loaded: dict[str, Path] = {}  # build folder name (DALI version, source hash) -> the library loaded in this process
# What CMake prints when the C++ compiler is missing or broken.
_NO_COMPILER = (
    "No CMAKE_CXX_COMPILER could be found",
    "Could not find compiler set in environment variable CXX",
    "not a full path to an existing compiler",
    "is not able to compile a simple test program",
)


class NativeBuildError(GaliError):
    """The DALI plugin cannot be built or loaded; the message says what is missing and what to do."""


def _dali_version() -> str:
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise NativeBuildError(
            "the masks operator is a plugin of NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 "
            "(CUDA 13; nvidia-dali-cuda120 for CUDA 12), or use data.backend=torch, which draws the same masks"
        ) from e
    return dali.__version__


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCES.iterdir() if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_folder() -> Path:
    """Where the plugin of this DALI and these sources is (or will be) built."""
    return cache_root() / "native" / f"dali-{_dali_version()}-{_source_hash()}"


def _failure(step: str, output: str, log_path: Path) -> NativeBuildError:
    """The build's failure, with the missing tool named where CMake's output shows it."""
    compiler = os.environ.get("CXX")
    if any(sign in output for sign in _NO_COMPILER):
        what = f"no working C++ compiler (CXX={compiler})" if compiler else "no C++ compiler found"
        hint = "install one (apt install g++, or your distribution's C++17 compiler) or point CXX at it"
    elif "NVIDIA DALI must be importable" in output:
        what, hint = "CMake could not import NVIDIA DALI", f"install nvidia-dali-cuda130 for {sys.executable}"
    else:
        what, hint = f"{step} failed", "see the log"
    tail = "\n".join(output.strip().splitlines()[-12:])
    return NativeBuildError(f"cannot build the DALI masks plugin: {what}; {hint}. Full log: {log_path}\n{tail}")


def build(*, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Build the plugin (and the harness beside it) unless this DALI's build of these sources exists;
    return the library's path."""
    folder = build_folder()
    library = folder / LIBRARY
    if library.is_file() and not force:
        return library
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeBuildError(
            "cannot build the DALI masks plugin: CMake is not on PATH; install it "
            "(pip install cmake, or apt install cmake), or use data.backend=torch"
        )
    work = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = work / "build.log"
    cuda = "OFF" if os.environ.get("GALI_NATIVE_CUDA", "1") in ("0", "off", "OFF", "false") else "ON"
    steps = [
        (
            "CMake configure",
            [
                cmake,
                "-S",
                str(SOURCES),
                "-B",
                str(work / "cmake"),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DGALI_NATIVE_CUDA={cuda}",
            ],
        ),
        (
            "CMake build",
            [
                cmake,
                "--build",
                str(work / "cmake"),
                "--target",
                "gali_masks",
                HARNESS,
                "--parallel",
                str(os.cpu_count() or 1),
            ],
        ),
    ]
    if log:
        log(f"building the DALI masks plugin in {folder} (CUDA backend: {cuda.lower()} if a CUDA compiler is found)")
    output = ""
    for step, command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        output += f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"
        log_path.write_text(output)
        if done.returncode != 0:
            raise _failure(step, output, log_path)
    for product in (LIBRARY, HARNESS):
        shutil.copy2(work / "cmake" / product, work / product)
    shutil.rmtree(work / "cmake")
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        work.rename(folder)
    except OSError:  # another process finished first: its build is the same build
        shutil.rmtree(work, ignore_errors=True)
    return library


def load(*, log: Callable[[str], None] | None = None) -> Path:
    """Build the plugin if needed and load it into DALI (once per process); ``fn.gali_masks`` then exists."""
    name = build_folder().name
    if name in _loaded:  # loaded already (from whichever cache folder): DALI holds one copy per process
        return _loaded[name]
    library = build(log=log)
    import nvidia.dali.plugin_manager as plugin_manager

    try:
        plugin_manager.load_library(str(library))
    except RuntimeError as e:
        raise NativeBuildError(
            f"DALI cannot load the masks plugin {library}: {e}; rebuild it with `gali native build --force`"
        ) from e
    _loaded[name] = library
    return library
