"""``gali eval``: load a checkpoint and a data split, run the selected metrics, print a table, write JSON.

The metrics are pure functions in :mod:`gali.engine.metrics`; this package feeds them from a checkpoint's networks
and a data split, following docs/method.md §4.1 (every choice is recorded in the JSON). Each metric of
:data:`METRICS` is one object in a module of its own (:mod:`gali.engine.eval.registry`): what it reads, how it
measures a batch, how rank 0 combines the ranks' measures, its JSON and table cells. This module keeps what they
share: the options, the one pass over the evaluation split, the table and the JSON.

The evaluation split is read whole, last partial batch included, in a seeded order, in batches of ``batch_size``
(100: the paper's ± is the std over batches of 100); E and G run in eval mode and reconstructions use z = μ_E(x).
``bn_recalibrate`` > 0 first recomputes E's and G's BatchNorm statistics on that many training batches, in memory
only. FID/KID reference features are cached in a file keyed by the data set, split, resolution, image count, seed
and the network file's SHA-256 (:mod:`gali.engine.eval.reference_cache`).
Under ``torchrun -m gali eval`` every rank measures a block of whole batches of the split and of the samples
(:mod:`gali.engine.loop.ranks`); rank 0 gathers the per-batch figures and feature rows in batch order, combines
them as one process would, and alone writes the JSON (see :func:`evaluate`).
The config is the checkpoint's whole config with the ``data.key=value`` overrides on top (a moved ``data.root``),
as ``gali train --resume`` applies its overrides. The JSON goes next to the checkpoint (``checkpoint-N.eval.json``)
with that config; a later evaluation of other metrics is merged into it, each metric keeping the settings it was
measured with. A figure that comes out NaN or infinite is written as null (strict JSON) and listed in
``EvalReport.non_finite``; ``gali eval`` then exits 2 naming it and the checkpoint (:meth:`EvalReport.check_finite`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gali.engine.errors import GaliError
from gali.engine.eval.context import EvalContext, SplitItem, evaluation_config
from gali.engine.eval.metric import Metric, Part
from gali.engine.eval.options import EvalOptions
from gali.engine.eval.reference_cache import default_cache_dir
from gali.engine.eval.registry import REGISTRY
from gali.engine.files import write_text_atomic
from gali.engine.loop.distributed import init_world
from gali.engine.loop.ranks import progress, rank_block, read_block
from gali.pipelines import SplitBatches

__all__ = [
    "METRICS",
    "EvalOptions",
    "EvalReport",
    "SplitBatches",
    "default_cache_dir",
    "evaluate",
    "evaluation_config",
    "metrics_table",
    "parse_metrics",
]

# The metrics of ``gali eval``, with what each measures.
METRICS: dict[str, str] = {name: metric.about for name, metric in REGISTRY.items()}


@dataclass
class EvalReport:
    """What one evaluation produced: the results by metric name, the table, where the JSON went, and the
    figures that came out NaN or infinite (``'pixel-mse.mean'``; null in the JSON, NaN or inf in ``results``)."""

    checkpoint: Path
    results: dict[str, dict[str, Any]]
    table: str
    json_path: Path
    non_finite: tuple[str, ...] = ()
    rank: int = 0  # under torchrun, the rank that returned it: only rank 0's has results, a table and a JSON

    def check_finite(self) -> None:
        """Raise :class:`GaliError` naming the non-finite figures and the checkpoint, if there are any.

        A separate step, so the caller shows the table first and ``gali reproduce`` can still compare
        a diverged method with the others.
        """
        if self.non_finite:
            raise GaliError(
                f"checkpoint {self.checkpoint}: {', '.join(self.non_finite)} came out non-finite (NaN or inf; "
                f"written as null in {self.json_path}): its networks give NaN or inf on these images. Evaluate "
                "an earlier checkpoint of the run, or try --live or --bn-recalibrate N where only the moving "
                "averages or the BatchNorm statistics are bad"
            )


def parse_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """``'pixel-mse,probe'`` or a list of names -> the names, checked against :data:`METRICS`."""
    if isinstance(names, str):
        names = names.split(",")
    parsed = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in parsed if n not in METRICS]
    if unknown or not parsed:
        raise GaliError(
            f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'} in --metrics; "
            f"accepted (comma-separated): {', '.join(METRICS)}"
        )
    return parsed


_POSITIVE = (
    "batch_size",
    "identity_images",
    "probe_labelled",
    "probe_draws",
    "probe_pool",
    "inception_input_size",
    "fid_samples",
    "fid_reference_images",
    "kid_subsets",
    "kid_subset_size",
)


def _check_options(metrics: tuple[str, ...], options: EvalOptions) -> None:
    """Reject contradictory or missing options before any work, naming the option."""
    for name in _POSITIVE:
        value = getattr(options, name)
        if value < 1:
            raise GaliError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if options.split not in ("train", "test"):
        raise GaliError(f"--split must be 'train' or 'test'; got {options.split!r}")
    if options.bn_recalibrate < 0:
        raise GaliError(f"--bn-recalibrate must be >= 0 (batches of the training split); got {options.bn_recalibrate}")
    if options.feature_resize not in ("nearest", "bilinear"):
        raise GaliError(f"--feature-resize must be 'nearest' or 'bilinear'; got {options.feature_resize!r}")
    for name in metrics:
        REGISTRY[name].check(options)


@torch.no_grad()
def _measure(ctx: EvalContext, metrics: list[Metric]) -> tuple[list[Part], list[list[Any]]]:
    """One pass over this rank's block of the evaluation split for every metric and the Parts they share, then one
    gather: the Parts (the shared first, so that rank 0 combines them first) and every rank's measures, in rank order.
    """
    for metric in metrics:
        for shared in metric.shares:
            if shared not in ctx.shared:
                ctx.shared[shared] = shared(ctx)
    parts: list[Part] = [*ctx.shared.values(), *metrics]
    ctx.recalibrate()
    wanted, o = max(part.split_images for part in parts), ctx.options
    if wanted:
        masks = next((m for m in (part.masks() for part in parts) if m is not None), None)
        batches = ctx.batches(o.split, limit=None if wanted == math.inf else int(wanted), masks=masks)
        ctx.images = batches.num_images
        for part in parts:
            part.start(ctx.images)
        block = rank_block(ctx.images, o.batch_size, ctx.world)
        for index, start, batch in progress(
            read_block(batches, block), total=block.batches, what=f"{o.split} split", world=ctx.world
        ):
            item = SplitItem(index, start, batch)
            for part in parts:
                part.measure(item)
    gathered = ctx.world.gather([part.local() for part in parts])
    return parts, [[ranks[i] for ranks in gathered] for i in range(len(parts))]


@torch.no_grad()
def _combine(metrics: list[Metric], parts: list[Part], measures: list[list[Any]]) -> dict[str, dict[str, Any]]:
    """Rank 0, once the process group is closed (torchmetrics would otherwise sync its state over it): the results."""
    combined = [part.combine(ranks) for part, ranks in zip(parts, measures, strict=True)]
    return {metric.name: result for metric, result in zip(metrics, combined[len(parts) - len(metrics) :], strict=True)}


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, one row per metric: name, value (mean ± std where there is one), details."""
    rows = [("metric", "value", "details")] + [(name, *REGISTRY[name].cells(r)) for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)


def _finite_or_null(value: Any, path: str, found: list[str]) -> Any:
    """``value`` with each NaN or infinite float made None (null in strict JSON); their dotted paths go to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item, f"{path}.{key}", found) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item, f"{path}[{i}]", found) for i, item in enumerate(value)]
    return value


def _write_json(path: Path, checkpoint: Path, config: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Merge ``results`` into the JSON at ``path`` (same checkpoint), written atomically."""
    previous: dict[str, Any] = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("metrics", {})
        except ValueError:
            previous = {}
    document = {"checkpoint": str(checkpoint), "config": config, "metrics": {**previous, **results}}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def evaluate(
    checkpoint: str | Path,
    metrics: str | Sequence[str] = ("pixel-mse",),
    options: EvalOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> EvalReport:
    """Run ``metrics`` on ``checkpoint``; print nothing but ``log`` lines, return the results and table.

    The JSON is written next to the checkpoint as ``<checkpoint stem>.eval.json``. Raises
    :class:`GaliError` (or a subclass) naming the path, option or value for every bad input:
    a missing checkpoint, feature network or Inception file, an unknown metric, a feature network
    with the wrong output shape, too few labelled images for the probe. A figure that comes out
    non-finite does not raise: it is null in the JSON and named in ``non_finite`` (see
    :meth:`EvalReport.check_finite`).

    Under torchrun (``RANK`` set) the ranks share the work and rank 0 alone logs, writes the JSON and returns the
    results; the other ranks return an empty report with their ``rank``. The process group is made here
    (:func:`gali.engine.loop.distributed.init_world`) and closed after the one gather, before rank 0 combines.
    """
    options = options or EvalOptions()
    names = parse_metrics(metrics)
    _check_options(names, options)
    checkpoint = Path(checkpoint)
    world, device = init_world(options.device)
    try:
        ctx = EvalContext(checkpoint, options, world, device, log)
        if world.size > 1:
            ctx.log(f"evaluating on {world.size} ranks, each a block of whole batches")
        selected = [REGISTRY[name](ctx) for name in names]
        parts, measures = _measure(ctx, selected)
    finally:
        world.close()  # no collective after the gather
    json_path = checkpoint.with_name(checkpoint.name.removesuffix(".pt") + ".eval.json")
    if not world.is_main:
        return EvalReport(checkpoint=checkpoint, results={}, table="", json_path=json_path, rank=world.rank)
    results = _combine(selected, parts, measures)
    non_finite: list[str] = []
    stored = {name: _finite_or_null(result, name, non_finite) for name, result in results.items()}
    _write_json(json_path, checkpoint, ctx.cfg.to_dict(), stored)
    return EvalReport(
        checkpoint=checkpoint,
        results=results,
        table=metrics_table(results),
        json_path=json_path,
        non_finite=tuple(non_finite),
    )
