"""Compile every GALI Triton kernel for Hopper (sm_90) and Blackwell (sm_100) without a GPU, and read its resources.

Issue 22 item 1: the launchers' configurations, compiled in CI, with registers, spills, shared memory and CTAs/SM.
Each launch is bound through the kernel's own JIT binder (so integer arguments get the launcher's specialisation,
e.g. ``n_feat`` divisible by 16 or not), compiled by ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, and
read from the ``ptxas -v`` log of Triton's own ptxas call. Nothing needs a device or a CUDA driver.

Run: ``python bench/kernel_compile.py OUT.md [--json OUT.json] [--arch 90 ...]`` writes the table (every kernel ×
configuration × dtype × target; sm_90 and, where this Triton targets it, sm_100) and optionally one JSON record per
configuration. Compiling needs Triton in compiled mode: TRITON_INTERPRET=1, read when triton is imported, makes
``triton.language``'s own functions interpreted, so the CPU test suite runs this file in a subprocess without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from gali.kernels import kway_head as kh
from gali.kernels import mask_composite as mc

CUDA = torch.device("cuda")  # the launchers' config functions only read ``device.type``: no device needed
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HOPPER, BLACKWELL = 90, 100
ARCH_NAMES = {HOPPER: "sm_90 (H100/H200)", BLACKWELL: "sm_100 (B200)"}


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits that bound resident CTAs. Source: NVIDIA CUDA C++ Programming Guide, "Technical Specifications
    per Compute Capability" (compute capability 9.0; 10.0 has the same values for these fields), and the Hopper
    Tuning Guide §1.4.1.4 (228 KB of shared memory per SM, up to 227 KB per block); 1 KB per CTA is reserved for
    the system (``cudaDevAttrReservedSharedMemoryPerBlock``); registers are allocated per warp in units of 256."""

    registers: int = 65_536
    shared: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    reserved_shared_per_block: int = 1024
    threads: int = 2048
    blocks: int = 32
    register_unit_per_warp: int = 256
    sms: int = 132  # H100 SXM (H200: 132; B200: 148)


H100 = SMLimits()


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher makes it: positional arguments (tensors stand for pointers, ints for
    sizes), constexprs and options, the grid, and where the shape comes from."""

    kernel: str
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]
    shape: str
    dtype: torch.dtype
    grid_at: dict[int, tuple[int, ...]] = field(default_factory=dict)  # head kernels: grid at N rows, same F, G·K


@dataclass(frozen=True)
class Resources:
    """What ptxas and Triton report for one compiled configuration, and the occupancy it gives."""

    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int
    shared: int  # bytes per CTA: Triton's dynamic shared memory plus ptxas's static
    threads: int
    ctas_per_sm: int
    limiter: str


# ----------------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------------


def _jit_of(launch: Launch) -> JITFunction:
    kernel = getattr(kh, launch.kernel, None) or getattr(mc, launch.kernel)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("compiling needs Triton in compiled mode: run without TRITON_INTERPRET=1")
    return kernel


def _bind(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict, list]:
    """ASTSource, options and specialisation of ``launch``, through the kernel's own binder (as ``JITFunction.run``)."""
    fn = _jit_of(launch)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, "num_warps": launch.num_warps, "num_stages": launch.num_stages}
    kwargs |= {"debug": fn.debug or knobs.runtime.debug, "instrumentation_mode": "", "fpsan_homomorphic_casts": False}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, specialization


def config_id(launch: Launch) -> str:
    """What gets compiled, as a test id: kernel, dtype, constexprs, warps, stages, and the integer arguments'
    specialisation by Triton's rule (a multiple of 16 is ``D``, 1 is a constant), which decides vector widths:
    ``n_feat`` is ``D`` at F = 1536, not at F = 1000. Needs no Triton backend, so the tests can name the cases;
    :func:`compile_configs` checks it against the binder's own specialisation."""
    ints = "".join("D" if v % 16 == 0 else "1" if v == 1 else "." for v in launch.args if type(v) is int)
    dtype = str(launch.dtype).removeprefix("torch.")
    return f"{launch.kernel.strip('_').removesuffix('_kernel')}-{dtype}-{describe(launch)}-ints{ints}"


_PTXAS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_shared": r"(\d+) bytes smem",
}


def compile_launch(launch: Launch, arch: int = HOPPER, limits: SMLimits = H100) -> Resources:
    """Compile ``launch`` for sm_``arch`` with no device and return its registers, spills, shared memory and CTAs/SM.

    Compilation is forced (a cache hit would give no ptxas log to read); the cache directory is TRITON_CACHE_DIR.
    """
    target = GPUTarget("cuda", arch, 32)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log to stdout
        src, options, _ = _bind(launch, target)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
    text = log.getvalue()
    found = {name: re.search(pattern, text) for name, pattern in _PTXAS.items()}
    if found["registers"] is None:
        raise RuntimeError(f"no `ptxas -v` register count for {launch.kernel}:\n{text}")
    stats = {name: int(m.group(1)) if m else 0 for name, m in found.items()}
    shared = compiled.metadata.shared + stats["static_shared"]
    threads = launch.num_warps * 32
    ctas, limiter = ctas_per_sm(stats["registers"], threads, shared, limits)
    return Resources(
        stats["registers"], stats["spill_stores"], stats["spill_loads"], stats["stack"], shared, threads, ctas, limiter
    )


def ctas_per_sm(registers: int, threads: int, shared: int, limits: SMLimits = H100) -> tuple[int, str]:
    """Theoretical resident CTAs per SM and the resources that bound them, '+'-joined on a tie (as the CUDA
    occupancy calculator)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(registers * 32 / limits.register_unit_per_warp) * limits.register_unit_per_warp
    bounds = {
        "registers": limits.registers // (regs_per_warp * warps) if registers else limits.blocks,
        "shared": limits.shared // (shared + limits.reserved_shared_per_block),
        "threads": limits.threads // threads,
        "blocks": limits.blocks,
    }
    if shared > limits.shared_per_block:
        bounds["shared"] = 0
    fewest = min(bounds.values())
    return fewest, "+".join(name for name, bound in bounds.items() if bound == fewest)


def supported_archs() -> list[int]:
    """sm_90, and sm_100 where this Triton's NVIDIA backend and its ptxas accept capability 100."""
    archs = [HOPPER]
    try:
        make_backend(GPUTarget("cuda", BLACKWELL, 32)).parse_options({})
        archs.append(BLACKWELL)
    except Exception:  # any refusal means no sm_100 target here
        pass
    return archs


def toolchain() -> str | None:
    """Why the NVIDIA toolchain is unusable here (no backend or no ptxas), or None when it is there."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(HOPPER).path
    except Exception as error:
        return f"Triton's NVIDIA backend is not installed ({error})"
    return None if path and Path(path).exists() else f"ptxas not found (looked for {path})"


# ----------------------------------------------------------------------------------------------------------
# The launches the launchers make
# ----------------------------------------------------------------------------------------------------------
# Each builder repeats its launcher's argument list and takes the configuration from the launcher's own
# config function, so a changed config is compiled here; a changed argument list fails the binder.


def _t(dtype: torch.dtype) -> torch.Tensor:
    """A stand-in for a pointer argument: 16-byte aligned, like a CUDA allocation."""
    return torch.empty(64, dtype=dtype)


def head_launches(k: int, groups: int, n: int, f: int, dtype: torch.dtype, shape: str) -> list[Launch]:
    """The forward, the partial reduction and the two h-gradient scalings of one head call (N rows, F features)."""
    n_col = groups * k
    cfg = kh._launch_config(n, f, n_col, dtype, CUDA)
    ptrs = (_t(dtype), _t(dtype), _t(dtype), _t(torch.int64), _t(torch.float32), _t(torch.float32))
    fwd = Launch(
        "_kway_head_fwd_kernel",
        (*ptrs, _t(dtype), _t(dtype), _t(torch.float32), n, f, k, 1.0 / max(1, n // k), cfg.stride_partial,
         cfg.n_split, cfg.f_per_split),
        {"NUM_GROUPS": groups, "BLOCK_N": cfg.block_n, "BLOCK_F": cfg.block_f, "BLOCK_C": cfg.block_c,
         "F_ALIGN": cfg.f_align, "INTERPRET": False},
        cfg.num_warps, cfg.num_stages, (cfg.grid,), shape, dtype,
        {rows: (kh._launch_config(rows, f, n_col, dtype, CUDA).grid,) for rows in (400, 8192)},
    )  # fmt: skip
    block_p, block_cr = kh._reduce_config(cfg.row_blocks, CUDA)
    reduce = Launch(
        "_kway_head_reduce_kernel",
        (_t(torch.float32), _t(dtype), _t(dtype), _t(torch.float32), _t(torch.float32), cfg.row_blocks, n_col * f,
         n_col, cfg.stride_partial),
        {"BLOCK_P": block_p, "BLOCK_C": block_cr, "INTERPRET": False},
        4, 3, (triton.cdiv(cfg.stride_partial, block_cr),), shape, dtype,  # Triton's default warps and stages
        {rows: (triton.cdiv(cfg.stride_partial, block_cr),) for rows in (400, 8192)},
    )  # fmt: skip
    block, num_warps = 1024, 4  # _kway_head_scale's CUDA block
    scales = [
        Launch(
            "_scale_sum_kernel",
            (_t(dtype), _t(dtype), _t(torch.float32), _t(dtype), _t(torch.float32), n * f),
            {"HAS_B": has_b, "BLOCK": block, "INTERPRET": False},
            num_warps,
            3,
            (triton.cdiv(n * f, block),),
            shape,
            dtype,
            {rows: (triton.cdiv(rows * f, block),) for rows in (400, 8192)},
        )
        for has_b in (True, False)
    ]
    return [fwd, reduce, *scales]


_PARAMS = {"box": torch.int32, "stroke": torch.float32, "dense": torch.uint8}


def mask_launches(
    kind: str, batch: int, channels: int, size: int, dtype: torch.dtype, shape: str, *, strokes: int = 4, **flags: bool
) -> list[Launch]:
    """The forward and (with ``bwd`` flags) the backward of one mask_composite call on (B, C, size, size) images.
    ``flags``: the forward's HAS_Y, HAS_NOISE and the backward's HAS_G_MASKED, HAS_G_MIX, NEED_X, NEED_Y."""
    block, num_warps = mc._launch_config(size * size)
    grid = (triton.cdiv(size * size, block), batch)
    common = {"KIND": mc._KIND_CODE[kind], "NUM_STROKES": strokes if kind == "stroke" else 1, "BLOCK": block}
    has_y, has_noise = flags["HAS_Y"], flags["HAS_NOISE"]
    fwd = Launch(
        "_mask_composite_fwd_kernel",
        (_t(dtype), _t(dtype), _t(dtype), _t(dtype), _t(_PARAMS[kind]), _t(dtype), _t(dtype), _t(dtype),
         channels, size, size, -2.0, 0.1 if has_noise else 0.0),
        {**common, "HAS_Y": has_y, "HAS_NOISE": has_noise, "STD_IN_TENSOR": False},
        num_warps, 3, grid, shape, dtype,
    )  # fmt: skip
    if "NEED_X" not in flags:
        return [fwd]
    backward = {name: flags[name] for name in ("HAS_G_MASKED", "HAS_G_MIX", "NEED_X", "NEED_Y")}
    bwd = Launch(
        "_mask_composite_bwd_kernel",
        (_t(dtype), _t(dtype), _t(_PARAMS[kind]), _t(dtype), _t(dtype), channels, size, size),
        {**common, **backward},
        num_warps, 3, grid, shape, dtype,
    )  # fmt: skip
    return [fwd, bwd]


# (source, K, groups G, rows N = K · batch, features F). The presets' heads come from building each preset's D on
# the meta device (engine/config/presets/*.toml at main 6386e13; gali-pt with a 2048-d feature model); the issue's
# widths: F = 1000 and F = 307 (svhn32 at model.width = 0.3), at N = 400 and N = 8192.
HEAD_SHAPES: tuple[tuple[str, int, int, int, int], ...] = (
    ("bench K4-N8192-F1536", 4, 1, 8192, 1536),
    ("bench K8-N8192-F1536", 8, 1, 8192, 1536),
    ("bench K4-G3-N8192-F1536", 4, 3, 8192, 1536),
    ("bench K8-G3-N8192-F1536", 8, 3, 8192, 1536),
    ("celeba64-ali/alice", 2, 1, 200, 2048),
    ("celeba64-gali-mix", 8, 1, 800, 2048),
    ("celeba64-gali-pt", 4, 1, 80, 2048),
    ("celeba64-gali4", 4, 1, 400, 2048),
    ("demo", 4, 1, 128, 256),
    ("imagenet128-ali", 2, 3, 2048, 5632),
    ("imagenet128-gali-mix", 8, 3, 8192, 5632),
    ("imagenet128-gali4(-e256)", 4, 3, 4096, 5632),
    ("imagenet256-gali4", 4, 3, 1024, 5632),
    ("svhn32-ali/alice", 2, 1, 200, 1024),
    ("svhn32-gali4/gali-pt", 4, 1, 400, 1024),
    ("svhn32-gali8", 8, 1, 800, 1024),
    ("issue F=1000 N=400", 4, 1, 400, 1000),
    ("issue F=1000 N=8192", 4, 1, 8192, 1000),
    ("issue F=307 N=400", 4, 1, 400, 307),
    ("issue F=307 N=8192", 4, 1, 8192, 307),
)

# (source, kind, batch, channels, size, flags). bench/test_mask_composite.py: every kind, masked and mix with noise,
# gradients to x and y. Presets (gali-mix at 64² and 128²): chains.py's masked input (no gradient) and mix of data x
# with G's output y (gradient to y only), box masks drawn in the step or the pipeline's dense masks.
_BENCH = {"HAS_Y": True, "HAS_NOISE": True, "HAS_G_MASKED": True, "HAS_G_MIX": True, "NEED_X": True, "NEED_Y": True}
_MASKED = {"HAS_Y": False, "HAS_NOISE": False}
_MIX = {"HAS_Y": True, "HAS_NOISE": False, "HAS_G_MASKED": False, "HAS_G_MIX": True, "NEED_X": False, "NEED_Y": True}
MASK_SHAPES: tuple[tuple[str, str, int, int, int, dict[str, bool]], ...] = (
    *((f"bench {b}x3x{s}x{s}", kind, b, 3, s, _BENCH) for kind in ("box", "stroke", "dense")
      for b, s in ((256, 64), (64, 256), (256, 256))),
    *((f"{preset} {use}", kind, 100 if s == 64 else 1024, 3, s, flags) for preset, s in
      (("celeba64-gali-mix", 64), ("imagenet128-gali-mix", 128)) for kind in ("box", "dense")
      for use, flags in (("masked", _MASKED), ("mix", _MIX))),
)  # fmt: skip


def all_launches(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[Launch]:
    """Every launch the launchers make for the bench and preset shapes, in ``dtypes``."""
    launches = []
    for dtype in dtypes:
        for source, k, groups, n, f in HEAD_SHAPES:
            launches += head_launches(k, groups, n, f, dtype, source)
        for source, kind, batch, channels, size, flags in MASK_SHAPES:
            launches += mask_launches(kind, batch, channels, size, dtype, f"{source} {kind}", **flags)
    return launches


def unique_configs(launches: list[Launch]) -> dict[str, list[Launch]]:
    """Launches grouped by :func:`config_id` (what gets compiled), in first-seen order."""
    groups: dict[str, list[Launch]] = {}
    for launch in launches:
        groups.setdefault(config_id(launch), []).append(launch)
    return groups


def compile_configs(archs: list[int], shard: tuple[int, int] = (0, 1)) -> Iterator[dict]:
    """Compile each unique configuration for each of ``archs``: one record per configuration and target, with its
    resources, or the error that stopped it (so that one failure does not hide the others). ``shard`` (i, n)
    compiles every n-th configuration from the i-th, so that n processes share the work."""
    index, count = shard
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for cid, group in list(unique_configs(all_launches()).items())[index::count]:
            first = group[0]
            record = {"id": cid, "arch": arch, "kernel": first.kernel, "dtype": str(first.dtype), "error": None}
            record |= {
                "config": describe(first),
                "grid": first.grid,
                "grid_at": {str(n): g for n, g in first.grid_at.items()},
            }
            record["shapes"] = sorted({f"{launch.shape} {_grid(launch.grid)}" for launch in group})
            specs = {str(_bind(launch, target)[2]) for launch in group}
            try:
                if len(specs) != 1:
                    raise RuntimeError(f"config_id groups launches Triton specialises differently: {specs}")
                record |= dataclasses.asdict(compile_launch(first, arch))
            except Exception as error:  # recorded, and reported by the table and the test
                record["error"] = f"{type(error).__name__}: {error}"[:2000]
            yield record


def describe(launch: Launch) -> str:
    """The configuration in a few words: constexprs (less INTERPRET), warps, stages."""
    consts = ", ".join(
        f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.constexprs.items() if k != "INTERPRET"
    )
    return f"{consts}, w{launch.num_warps}, s{launch.num_stages}"


# ----------------------------------------------------------------------------------------------------------
# The report table
# ----------------------------------------------------------------------------------------------------------


def _grid(grid: tuple[int, ...] | None) -> str:
    return "—" if grid is None else "×".join(map(str, grid))


def table(records: list[dict]) -> str:
    """Markdown: one row per kernel × configuration × dtype × target, each with the shapes that pick it."""
    rows = [
        "| kernel | dtype | target | configuration | int args | regs | spill st/ld B | stack B | smem B "
        "| CTAs/SM (bound) | grid | grid N=400 | grid N=8192 | shapes (grid) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        name = r["kernel"].strip("_").removesuffix("_kernel")
        ints = r["id"].rsplit("-ints", 1)[1]  # one character per integer argument: D ÷16, 1 constant, . neither
        head = f"| {name} | {r['dtype'].removeprefix('torch.')} | sm_{r['arch']} | {r['config']} | `{ints}` "
        if r["error"]:
            rows.append(head + f"| FAILED: {r['error'].splitlines()[0]} | | | | | | | | {'; '.join(r['shapes'])} |")
            continue
        rows.append(
            head + f"| {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} "
            f"| {r['ctas_per_sm']} ({r['limiter']}) | {_grid(r['grid'])} | {_grid(r['grid_at'].get('400'))} "
            f"| {_grid(r['grid_at'].get('8192'))} | {'; '.join(r['shapes'])} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the table (and the JSON records); compile in a throwaway cache. Exit 1 if a configuration failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="markdown table to write")
    parser.add_argument("--json", type=Path, help="also write one JSON record per configuration and target")
    parser.add_argument(
        "--arch", type=int, action="append", help="compute capability (default: 90, and 100 if supported)"
    )
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th configuration from the I-th")
    args = parser.parse_args(argv)
    shard = tuple(int(part) for part in args.shard.split("/"))
    if reason := toolchain():
        print(reason, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope():
        knobs.cache.dir = cache
        records = list(compile_configs(args.arch or supported_archs(), shard))
    args.out.write_text(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
