"""The native DALI operator ``fn.gali_masks``: built on demand with CMake, cached, loaded into DALI.

The sources beside this file (``mask_sampler.h``, the one sampling routine; ``gali_masks.cc``, the CPU operator;
``gali_masks.cu``, the CUDA operator; ``CMakeLists.txt``) are compiled with CMake and the system's C++ compiler the
first time a pipeline needs them, into ``$GALI_CACHE/native/dali-<version>-<source hash>[-cpu]/`` (``~/.cache/gali``
by default), reused until DALI or the sources change. The CUDA operator is built where CMake finds a CUDA compiler
(``GALI_NATIVE_CUDA=0`` skips it, in a ``-cpu`` folder of its own); the file ``backends`` beside the library says which
were built, and a GPU pipeline draws its masks on the CPU where the CUDA one was not. ``gali native build`` builds it
explicitly and prints where. Ranks may build at once: each in its own ``.building-<host>-<pid>`` folder, the first to
finish renames it into place. A failed or interrupted
build ends its process group (cmake, the compilers) and removes its folder; one left by a killed process is removed by
the next build. Without CMake, a compiler or DALI, :class:`NativeBuildError` says what is missing and how to install
it; nothing else in gali needs the plugin (the torch backend draws the same masks in Python).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gali.engine.errors import GaliError

from ..digits import cache_root

__all__ = ["HARNESS", "LIBRARY", "NativeBuildError", "build", "build_folder", "has_cuda_backend", "load"]

SOURCES = Path(__file__).resolve().parent
LIBRARY = "libgali_masks.so"
HARNESS = "gali_masks_harness"  # the same routine without DALI (CPU, and CUDA where built): tests, bench/run_gpu.sh
_SOURCE_SUFFIXES = (".h", ".cc", ".cu", ".txt")
_BACKENDS = "backends"  # beside the library: "cpu" or "cpu cuda", from CMake's summary line
_WITH_CUDA = "gali_masks: CPU and CUDA backends"
_loaded: dict[str, Path] = {}  # build folder name (DALI version, source hash) -> the library loaded in this process
_STALE_S = 6 * 3600  # a build folder this old is left over, whatever its name says (a build takes minutes)
_GRACE_S = 5.0  # how long an ended build's cmake gets between SIGTERM and SIGKILL
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


def _cuda_requested() -> bool:
    return os.environ.get("GALI_NATIVE_CUDA", "1") not in ("0", "off", "OFF", "false")


def build_folder() -> Path:
    """Where the plugin of this DALI, these sources and ``GALI_NATIVE_CUDA`` is (or will be) built."""
    return cache_root() / "native" / f"dali-{_dali_version()}-{_source_hash()}{'' if _cuda_requested() else '-cpu'}"


def has_cuda_backend(library: Path) -> bool:
    """Whether the plugin ``library`` was built with its CUDA operator (a GPU pipeline can run it on the device)."""
    backends = library.parent / _BACKENDS
    return backends.is_file() and "cuda" in backends.read_text().split()


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


def _work_folder(folder: Path) -> Path:
    """This process's build folder of ``folder``: ``<name>.building-<host>-<pid>``, beside it."""
    return folder.with_name(f"{folder.name}.building-{socket.gethostname()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    """True if the process ``pid`` exists (this user's or another's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _remove_stale_builds(cache: Path) -> None:
    """Remove the build folders in ``cache`` left by killed builds: their process (of this host) is gone, or they are
    older than ``_STALE_S``. A build on another host that shares the cache is left alone until then."""
    here = socket.gethostname()
    for work in cache.glob("*.building-*"):
        host, _, pid = work.name.rpartition(".building-")[2].rpartition("-")
        try:
            age = time.time() - work.stat().st_mtime
        except FileNotFoundError:  # removed by another rank meanwhile
            continue
        local = host in (here, "")  # "": named by pid alone, as builds before hosts were
        if age > _STALE_S or (local and pid.isdigit() and not _alive(int(pid))):
            shutil.rmtree(work, ignore_errors=True)


def _end_group(process: subprocess.Popen[str]) -> None:
    """End the process group that ``process`` leads (cmake and what it started): SIGTERM, and SIGKILL to what is left
    once the leader has exited or ``_GRACE_S`` has passed."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_GRACE_S)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a build command in a process group of its own, ended with it: no compiler outlives the command, whether
    it finished, failed or was interrupted (Ctrl-C, or SIGTERM/SIGHUP in ``_signals_raise``)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate()
    finally:
        _end_group(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP raise ``SystemExit(128 + signal)``, as SIGINT raises ``KeyboardInterrupt``, so that
    a killed build ends its process group and removes its folder. Only where they would end the process (their
    default action, on the main thread): a training run's own handlers stay."""
    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    signals = [s for s in (signal.SIGTERM, signal.SIGHUP) if main and signal.getsignal(s) is signal.SIG_DFL]

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build(*, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Build the plugin (and the harness beside it) unless this DALI's build of these sources exists;
    return the library's path."""
    folder = build_folder()
    library = folder / LIBRARY
    _remove_stale_builds(folder.parent)
    if library.is_file() and not force:
        if (folder / _BACKENDS).is_file():
            return library
        force = True  # built before the backends were recorded
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeBuildError(
            "cannot build the DALI masks plugin: CMake is not on PATH; install it "
            "(pip install cmake, or apt install cmake), or use data.backend=torch"
        )
    work = _work_folder(folder)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = work / "build.log"
    cuda = "ON" if _cuda_requested() else "OFF"
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
    try:
        with _signals_raise():
            for step, command in steps:
                done = _run(command)
                output += f"$ {' '.join(command)}\n{done.stdout}{done.stderr}"
                log_path.write_text(output)
                if done.returncode != 0:
                    kept = folder.with_name(f"{folder.name}.failed.log")  # the build folder goes, its log stays
                    os.replace(log_path, kept)
                    raise _failure(step, output, kept)
        for product in (LIBRARY, HARNESS):
            shutil.copy2(work / "cmake" / product, work / product)
        (work / _BACKENDS).write_text("cpu cuda\n" if _WITH_CUDA in output else "cpu\n")
        shutil.rmtree(work / "cmake")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
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
