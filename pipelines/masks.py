"""Per-sample inpainting masks drawn by the pipeline: the specification and its Python reference.

With ``method.mask_source = "pipeline"`` the pipeline hands the step each batch's ``masks``, uint8 (B, M, H, W),
1 = masked, one per mask slot of the spec. Each mask is a function of (seed, sample index, slot) alone, not of the
batch, shuffle, batch size or number of ranks. The DALI operator ``fn.gali_masks`` (``pipelines/native/mask_sampler.h``:
the one routine its CPU and CUDA backends compile) and :func:`draw_masks` here (the torch backend's, and the operator's
reference in the tests) draw them bit for bit alike. The routine: a SplitMix64 counter stream keyed by (seed, sample,
slot), uint64 wrapping; each try draws a kind (box, eval_box, stroke) by weight, then its parameters as
``mask_composite``'s samplers do; the first try with [min_pixels, max_pixels] masked pixels is kept, else, after
``max_tries``, a full-width band of ceil(min_pixels / W) rows at a uniform row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from gali.engine.errors import ConfigError

__all__ = ["KINDS", "MaskArgs", "MaskSpec", "box_mask", "draw_masks", "eval_box_range", "stroke_mask"]

KINDS = ("box", "eval_box", "stroke")
WEIGHT_SCALE = 1_000_000  # kind probabilities become integer weights out of this
MAX_STROKES = 16  # the native routine's fixed stroke capacity

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# The evaluation boxes of docs/method.md §5 item 5: sides 8..54 at 64², scaled to the resolution.
EVAL_MASK_MIN, EVAL_MASK_MAX, EVAL_MASK_RESOLUTION = 8, 54, 64


def eval_box_range(resolution: int) -> tuple[int, int]:
    """(min, max) side of the evaluation boxes at ``resolution``: 8..54 at 64², scaled, at least 1."""
    low = max(1, round(EVAL_MASK_MIN * resolution / EVAL_MASK_RESOLUTION))
    return low, max(low, round(EVAL_MASK_MAX * resolution / EVAL_MASK_RESOLUTION))


@dataclass(frozen=True)
class MaskArgs:
    """The operator's integer arguments for one (M, H, W); built by :meth:`MaskSpec.args`."""

    mask_seed: int
    num_masks: int
    height: int
    width: int
    kind_weights: tuple[int, int, int]
    box_min: int
    box_max: int
    eval_min: int
    eval_max: int
    num_strokes: int
    max_thickness: int
    min_pixels: int
    max_pixels: int
    max_tries: int

    def as_kwargs(self) -> dict[str, int | list[int]]:
        """The arguments as ``fn.gali_masks`` keywords."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class MaskSpec:
    """Which masks a pipeline draws (``method.mask_*`` keys build it).

    kind_weights:   probabilities of ('box', 'eval_box', 'stroke') per mask (any non-negative numbers,
                    normalised).
    box_min/box_max: side range of 'box' in pixels (0 = the resolution; the paper's 1..R).
    num_strokes:    segments per 'stroke' mask (1..16); max_thickness: their thickness 1..T in pixels
                    (0 = max(1, R // 8), ``sample_stroke_params``'s default).
    min_coverage / max_coverage: fraction of the image a mask may cover; a draw outside is redrawn
                    up to max_tries times.
    seed:           the masks' seed (the run's seed).
    """

    kind_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    box_min: int = 1
    box_max: int = 0
    num_strokes: int = 4
    max_thickness: int = 0
    min_coverage: float = 0.0
    max_coverage: float = 1.0
    max_tries: int = 8
    seed: int = 0

    def args(self, num_masks: int, height: int, width: int) -> MaskArgs:
        """The operator's arguments for ``num_masks`` masks of height × width; ``ConfigError`` if impossible."""
        if (
            len(self.kind_weights) != len(KINDS)
            or any(not w >= 0 for w in self.kind_weights)
            or not sum(self.kind_weights) > 0
        ):
            raise ConfigError(
                "method.mask_kinds", f"weights of {KINDS} must be >= 0 with a positive sum, got {self.kind_weights}"
            )
        total = sum(self.kind_weights)
        weights = tuple(round(w / total * WEIGHT_SCALE) for w in self.kind_weights)
        side = min(height, width)
        box_max = self.box_max or side
        if not 1 <= self.box_min <= box_max <= side:
            raise ConfigError(
                "method.mask_max_size",
                f"box sides {self.box_min}..{box_max} do not fit a "
                f"{height}x{width} image; keep 1 <= min <= max <= {side}",
            )
        if not 1 <= self.num_strokes <= MAX_STROKES:
            raise ConfigError("method.mask_strokes", f"got {self.num_strokes}; must be in 1..{MAX_STROKES}")
        if self.max_thickness < 0:
            raise ConfigError("method.mask_max_thickness", f"got {self.max_thickness}; must be >= 0 (0 = R // 8)")
        if not 0.0 <= self.min_coverage <= self.max_coverage <= 1.0:
            raise ConfigError(
                "method.mask_min_coverage",
                f"coverage range [{self.min_coverage}, {self.max_coverage}] must lie within [0, 1], min <= max",
            )
        if self.max_tries < 1:
            raise ConfigError("method.mask_max_tries", f"got {self.max_tries}; must be >= 1")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError("run.seed", f"got {self.seed}; must be in [0, 2**63)")
        pixels = height * width
        eval_min, eval_max = eval_box_range(side)
        return MaskArgs(
            mask_seed=self.seed,
            num_masks=num_masks,
            height=height,
            width=width,
            kind_weights=weights,
            box_min=self.box_min,
            box_max=box_max,
            eval_min=eval_min,
            eval_max=eval_max,
            num_strokes=self.num_strokes,
            max_thickness=self.max_thickness or max(1, side // 8),
            min_pixels=math.ceil(self.min_coverage * pixels),
            max_pixels=math.floor(self.max_coverage * pixels),
            max_tries=self.max_tries,
        )


# --- The reference routine ---


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _Stream:
    """The counter-based stream of one (seed, sample, slot)."""

    def __init__(self, seed: int, sample: int, slot: int) -> None:
        self.key = _mix64((_mix64((_mix64(seed & _MASK64) + sample) & _MASK64) + slot) & _MASK64)
        self.count = 0

    def uniform(self, low: int, high: int) -> int:
        self.count += 1
        draw = _mix64((self.key + self.count * _GOLDEN) & _MASK64)
        return low + (((draw >> 32) * (high - low + 1)) >> 32)


def box_mask(top: int, left: int, h: int, w: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of the box [top, top+h) × [left, left+w) over index grids ``rows`` (H, 1), ``cols`` (1, W)."""
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def stroke_mask(strokes: Sequence[tuple[int, int, int, int, int]], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of segments (x0, y0, x1, y1, t): pixels within t/2 of any, ``mask_composite``'s integer test."""
    mask = np.zeros((rows.shape[0], cols.shape[1]), dtype=bool)
    for x0, y0, x1, y1, t in strokes:
        ex, ey, dx, dy = x1 - x0, y1 - y0, cols - x0, rows - y0
        along, length2, t2 = dx * ex + dy * ey, ex * ex + ey * ey, t * t
        mask |= np.where(
            along <= 0,
            4 * (dx * dx + dy * dy) <= t2,
            np.where(
                along >= length2,
                4 * ((dx - ex) ** 2 + (dy - ey) ** 2) <= t2,
                4 * (dx * ey - dy * ex) ** 2 <= t2 * length2,
            ),
        )
    return mask


def _candidate(stream: _Stream, a: MaskArgs, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One try's boolean (H, W) mask, drawn from ``stream``."""
    w_box, w_eval, _ = a.kind_weights
    u = stream.uniform(0, sum(a.kind_weights) - 1)
    if u < w_box + w_eval:
        low, high = (a.box_min, a.box_max) if u < w_box else (a.eval_min, a.eval_max)
        h, w = stream.uniform(low, high), stream.uniform(low, high)
        return box_mask(stream.uniform(0, a.height - h), stream.uniform(0, a.width - w), h, w, rows, cols)
    strokes = [
        (
            stream.uniform(0, a.width - 1),
            stream.uniform(0, a.height - 1),
            stream.uniform(0, a.width - 1),
            stream.uniform(0, a.height - 1),
            stream.uniform(1, a.max_thickness),
        )
        for _ in range(a.num_strokes)
    ]
    return stroke_mask(strokes, rows, cols)


def draw_masks(sample_ids: Sequence[int] | np.ndarray, args: MaskArgs) -> np.ndarray:
    """The masks of ``sample_ids``: uint8 (N, M, H, W), 1 = masked; the native operator's reference."""
    rows = np.arange(args.height, dtype=np.int64).reshape(-1, 1)
    cols = np.arange(args.width, dtype=np.int64).reshape(1, -1)
    out = np.zeros((len(sample_ids), args.num_masks, args.height, args.width), dtype=np.uint8)
    for i, sample in enumerate(np.asarray(sample_ids, dtype=np.int64).tolist()):
        for slot in range(args.num_masks):
            stream = _Stream(args.mask_seed, sample & _MASK64, slot)
            for _ in range(args.max_tries):
                mask = _candidate(stream, args, rows, cols)
                if args.min_pixels <= int(mask.sum()) <= args.max_pixels:
                    break
            else:  # no try within the coverage limits: a full-width band of at least min_pixels
                h = min(args.height, max(1, -(-args.min_pixels // args.width)))
                top = stream.uniform(0, args.height - h)
                mask = box_mask(top, 0, h, args.width, rows, cols)
            out[i, slot] = mask
    return out
