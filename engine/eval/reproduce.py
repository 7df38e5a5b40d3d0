"""``gali reproduce``: ALI, ALICE, GALI-4, GALI-8 and GALI-mix at one budget, one table.

Each method is its tuple spec (``engine/method/tuples/``) on the same preset (the demo digits by default;
any data set through ``data.*`` overrides), trained with :func:`gali.engine.loop.train.train` for the same
number of kimg from the same seeds, then evaluated by :func:`gali.engine.eval.protocol.evaluate` on the
held-out split: the reconstructions' identity accuracy, reconstruction pixel-MSE, linear-probe error
and, when Inception weights are given, FID. With one seed a cell's ± is the std over test batches
(the paper's); with ``seeds`` > 1 it is the std over seeds of each seed's figure. The paper's
numbers (docs/method.md §4.2) stand beside ours for reference; they are for SVHN and CelebA at the
authors' full budgets, so only the ordering of the methods can be compared.
With ``at_kimg`` each run is also evaluated at those budgets on the way (its checkpoints there), one table row per
method and budget, and the table ends with the budget at which each method's identity first reached 0.80.
Training and evaluation are seeded, so a second run with the same options prints the same table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gali.engine.errors import GaliError
from gali.engine.eval.protocol import EvalOptions, evaluate
from gali.engine.eval.registry import REGISTRY
from gali.engine.files import write_text_atomic
from gali.engine.loop.checkpoint import checkpoint_images
from gali.engine.loop.config import Config, load_config
from gali.engine.loop.train import train
from gali.engine.method.losses import OBJECTIVES
from gali.engine.method.tuple_spec import load_spec, spec_names
from gali.pipelines.config import DataConfig

# The default methods; --methods takes any shipped tuple spec (gali presets lists them), optionally
# with a G/E objective of docs/method.md §1.4 after a '+': 'gali4+minimax', 'gali4+misclassification'.
METHODS = ("ali", "alice", "gali4", "gali8", "gali-mix")
DEFAULT_KIMG = 8.0
# Keys that the command's own options set; an override of one of them would contradict them.
RESERVED_KEYS = ("method.tuples", "method.objective", "run.kimg", "run.seed", "run.out_dir")
METRICS = ("recon-identity", "recon-sharpness", "pixel-mse", "probe")  # and fid, with Inception weights
IDENTITY_GOAL = 0.80  # the identity accuracy whose first budget the table reports (issue 27)

# docs/method.md §4.2: Table 1 (SVHN pixel-MSE), Table 2 (SVHN linear-SVM error, %; ALI is the GALI
# authors' own baseline run), Table 3 (CelebA FID). GALI-mix was only run on CelebA inpainting.
PAPER: dict[str, dict[str, str]] = {
    "ali": {"pixel_mse": "0.023 ± 0.0024", "probe": "19.05 ± 0.53", "fid": "24.49"},
    "alice": {"pixel_mse": "0.0096 ± 0.00067", "probe": "18.89 ± 0.52", "fid": "36.91"},
    "gali4": {"pixel_mse": "0.0132 ± 0.0011", "probe": "16.58 ± 0.38", "fid": "23.11"},
    "gali8": {"pixel_mse": "0.0095 ± 0.0016", "probe": "15.82 ± 0.43", "fid": "—"},
    "gali-mix": {"pixel_mse": "—", "probe": "—", "fid": "—"},
}
NOT_IN_PAPER = {"pixel_mse": "—", "probe": "—", "fid": "—"}
PAPER_NOTE = (
    "Paper columns (docs/method.md §4.2): pixel-MSE on SVHN 32×32 test (Table 1), linear-SVM error on SVHN "
    "with 1,000 labels (Table 2), FID on CelebA 64×64 (Table 3), each after the authors' full training "
    "(100-300 epochs). GALI-mix was evaluated only on CelebA inpainting (pixel-MSE 0.031 ± 0.0050, "
    "Table 5). They are for reference: other data, other budgets."
)


@dataclass
class ReproduceOptions:
    """What to train and how to evaluate it.

    preset:    the preset every method starts from (its data, networks, optimiser and batch size).
    kimg:      training budget per method, in thousands of real images.
    methods:   tuple specs to train, in table order.
    at_kimg:   budgets below ``kimg`` at which each run is evaluated too (multiples of the smallest, as is ``kimg``).
    seed, seeds: each method is trained from seeds ``seed .. seed + seeds − 1``.
    metrics:   what each evaluation measures (``fid`` is added when ``evaluation`` names Inception weights).
    overrides: ``section.key=value`` applied to every method (e.g. ``data.source=folder data.root=...``);
               the keys in :data:`RESERVED_KEYS` are set by the options above and may not be overridden.
    evaluation: settings of the evaluation (its seed is replaced by ``seed``).
    """

    preset: str = "demo"
    kimg: float = DEFAULT_KIMG
    at_kimg: Sequence[float] = ()
    methods: Sequence[str] = METHODS
    metrics: Sequence[str] = METRICS
    seed: int = 0
    seeds: int = 1
    out_dir: str = "runs/reproduce"
    overrides: Sequence[str] = ()
    evaluation: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class SeedRun:
    """One method trained from one seed, evaluated at one budget: its training figures (to that budget: seconds
    from the ticks' rates) and evaluation results."""

    seed: int
    kimg: float
    run_dir: Path
    checkpoint: Path
    images_per_second: float
    train_seconds: float
    eval_seconds: float
    results: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "run_dir": str(self.run_dir), "checkpoint": str(self.checkpoint)}


@dataclass
class MethodRow:
    """One method's line of the table at one budget: its runs, one per seed."""

    method: str
    num_classes: int
    runs: list[SeedRun]

    @property
    def kimg(self) -> float:
        return self.runs[0].kimg

    def mean(self, metric: str, key: str) -> float:
        """``metric``'s ``key`` averaged over the seeds (NaN where not measured)."""
        values = [run.results[metric][key] for run in self.runs if metric in run.results]
        return float(np.mean(values)) if values else float("nan")

    def cell(self, metric: str, key: str = "mean", *, scale: float = 1.0, digits: int = 4) -> str:
        """``metric``'s ``key`` as mean ± std: over test batches for one seed (where the metric has them), else over
        seeds; '—' where it was not measured."""
        results = [run.results[metric] for run in self.runs if metric in run.results]
        if not results:
            return "—"
        values = np.asarray([r[key] for r in results], dtype=np.float64) * scale
        if len(values) == 1:
            spread = scale * results[0]["std"] if key == "mean" and "std" in results[0] else None
            return f"{values[0]:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


@dataclass
class ReproduceReport:
    """The rows in table order, the Markdown table, and the files it was written to."""

    rows: list[MethodRow]
    table: str
    markdown_path: Path
    json_path: Path


def _check(options: ReproduceOptions) -> None:
    unknown = [m for m in options.methods if split_method(m) is None]
    if unknown or not options.methods:
        raise GaliError(
            f"unknown method {', '.join(map(repr, unknown)) or '(none given)'} in --methods; "
            f"accepted (comma-separated): a tuple spec ({', '.join(spec_names())}), optionally "
            f"+objective ({', '.join(OBJECTIVES)}), e.g. gali4+minimax"
        )
    reserved = [o for o in options.overrides if o.partition("=")[0].strip() in RESERVED_KEYS]
    if reserved:
        raise GaliError(
            f"{', '.join(reserved)}: set by gali reproduce itself (--methods, --kimg, --seed, --out-dir); "
            "drop the override or use the option"
        )
    if options.kimg <= 0:
        raise GaliError(f"--kimg must be > 0; got {options.kimg}")
    if options.seeds < 1:
        raise GaliError(f"--seeds must be >= 1; got {options.seeds}")
    budgets = budgets_of(options)
    step = round(budgets[0] * 1000)
    if budgets[0] <= 0 or budgets[-1] > options.kimg or any(round(b * 1000) % step for b in budgets):
        raise GaliError(
            f"--at-kimg {','.join(f'{b:g}' for b in options.at_kimg)}: give budgets above 0 and at most --kimg "
            f"{options.kimg:g}, each (and --kimg) a multiple of the smallest, e.g. --at-kimg 20,40 --kimg 80"
        )
    unknown = [m for m in options.metrics if m not in REGISTRY]
    if unknown or not options.metrics:
        raise GaliError(
            f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'} in --metrics; accepted "
            f"(comma-separated): {', '.join(REGISTRY)}"
        )


def budgets_of(options: ReproduceOptions) -> list[float]:
    """The budgets each run is evaluated at, in increasing order: ``at_kimg`` and ``kimg``."""
    return sorted({*options.at_kimg, options.kimg})


def split_method(method: str) -> tuple[str, str] | None:
    """``'gali4+minimax'`` -> ``('gali4', 'minimax')``, ``'ali'`` -> ``('ali', 'product')``; None if unknown."""
    spec, _, objective = method.partition("+")
    objective = objective or "product"
    return (spec, objective) if spec in spec_names() and objective in OBJECTIVES else None


def reproduce_table(rows: Sequence[MethodRow], *, header: str) -> str:
    """A Markdown table of ``rows`` with the paper's numbers beside them, under ``header``; with several budgets,
    the budget at which each method's identity (mean over seeds) first reached :data:`IDENTITY_GOAL`."""
    lines = [
        header,
        "",
        "| method | K | kimg | train s | train img/s | identity | nearest own | pixel-MSE | sharpness "
        "| probe error (%) | FID | paper pixel-MSE (SVHN) | paper probe error (%) (SVHN) | paper FID (CelebA) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER.get(row.method, NOT_IN_PAPER)
        speed = np.mean([run.images_per_second for run in row.runs])
        seconds = np.mean([run.train_seconds for run in row.runs])
        lines.append(
            f"| {row.method} | {row.num_classes} | {row.kimg:g} | {seconds:.0f} | {speed:.0f} "
            f"| {row.cell('recon-identity', 'accuracy', digits=3)} | {row.cell('recon-identity', 'nearest', digits=3)} "
            f"| {row.cell('pixel-mse')} | {row.cell('recon-sharpness', digits=3)} "
            f"| {row.cell('probe', scale=100, digits=2)} | {row.cell('fid', 'value', digits=2)} "
            f"| {paper['pixel_mse']} | {paper['probe']} | {paper['fid']} |"
        )
    lines += ["", PAPER_NOTE]
    if len({row.kimg for row in rows}) > 1:
        lines += ["", *goal_lines(rows)]
    return "\n".join(lines)


def goal_lines(rows: Sequence[MethodRow]) -> list[str]:
    """Per method, the first budget whose identity, averaged over the seeds, reached :data:`IDENTITY_GOAL`."""
    lines = [f"First budget at identity ≥ {IDENTITY_GOAL:.2f} (mean over seeds):", ""]
    for method in dict.fromkeys(row.method for row in rows):
        reached = [r.kimg for r in rows if r.method == method and r.mean("recon-identity", "accuracy") >= IDENTITY_GOAL]
        budgets = [r.kimg for r in rows if r.method == method]
        lines.append(f"- {method}: " + (f"{min(reached):g} kimg" if reached else f"not within {max(budgets):g} kimg"))
    return lines


def _header(options: ReproduceOptions, data: DataConfig, rows: Sequence[MethodRow]) -> str:
    first = rows[0].runs[0].results
    pixel, probe, identity = first.get("pixel-mse"), first.get("probe"), first.get("recon-identity")
    where = "scikit-learn digits" if data.source == "digits" else f"{data.source} {data.root}"
    seeds = (
        f"seed {options.seed}"
        if options.seeds == 1
        else f"seeds {options.seed}..{options.seed + options.seeds - 1}; every ± is the std over the {options.seeds} "
        "seeds of each seed's figure"
    )
    parts = [
        f"{options.kimg:g} kimg per method from preset '{options.preset}' on {where} "
        f"({data.resolution}×{data.resolution}), {seeds}."
    ]
    if identity:
        split = identity["split"]
        parts.append(
            f"Identity: accuracy of a linear classifier of the real training images on the reconstructions "
            f"G(μ_E(x)) of the {identity['images']} {split} images (on the real {split} images: "
            f"{identity['ceiling']:.3f}; chance {identity['chance']:.3f})."
        )
    if pixel:
        spread = f"mean ± std over {pixel['n']} batches of up to" if options.seeds == 1 else "mean over batches of"
        parts.append(
            f"pixel-MSE: {spread} {pixel['batch_size']} of the "
            f"{pixel['images']} {pixel['split']} images, [0, 1] space, z = μ_E(x)."
        )
    if probe:
        parts.append(
            f"Probe: linear SVM on E's features, {probe['n']} draws of {probe['labelled']} labelled "
            f"training images, C chosen on {probe['validation']} validation images, "
            f"error on {probe['test']} {probe['split']} images."
        )
    fid = first.get("fid")
    if fid:
        parts.append(
            f"FID: {fid['generated']} samples vs {fid['reference']['images']} {fid['reference']['split']} "
            f"images, {fid['implementation']}, network {fid['network']}."
        )
    return " ".join(parts)


def reproduce(options: ReproduceOptions | None = None, *, log: Callable[[str], None] = print) -> ReproduceReport:
    """Train every method of ``options.methods`` at one budget, evaluate each, return the table.

    Writes ``reproduce.md`` (the table) and ``reproduce.json`` (every row's figures and full
    evaluation results) into ``options.out_dir``; each method's run folder is
    ``out_dir/<method>/NNNNN-<preset>``.
    """
    options = options or ReproduceOptions()
    _check(options)
    out = Path(options.out_dir)
    metrics = [*options.metrics, *(["fid"] if options.evaluation.inception else [])]
    budgets = budgets_of(options)
    rows: list[MethodRow] = []
    for method in options.methods:
        runs: list[list[SeedRun]] = []
        for seed in range(options.seed, options.seed + options.seeds):
            spec, objective = split_method(method)
            cfg = load_config(
                options.preset,
                [
                    f"run.snapshot_kimg={budgets[0]}",
                    "run.keep_checkpoints=0",  # every budget's checkpoint is evaluated
                    *options.overrides,
                    f"method.tuples={spec}",
                    f"method.objective={objective}",
                    f"run.kimg={options.kimg}",
                    f"run.seed={seed}",
                    f"run.out_dir={out / method / f'seed{seed}'}",
                ],
            )
            evaluation = replace(options.evaluation, seed=seed)
            runs.append(_train_and_evaluate(cfg, method, seed, budgets, metrics, evaluation, log))
        num_classes = load_spec(cfg.method.tuples).num_classes
        rows += [MethodRow(method, num_classes, [seed_runs[i] for seed_runs in runs]) for i in range(len(budgets))]
    table = reproduce_table(rows, header=_header(options, cfg.data, rows))
    out.mkdir(parents=True, exist_ok=True)
    markdown_path = out / "reproduce.md"
    write_text_atomic(markdown_path, table + "\n")
    json_path = _write_json(out, options, budgets, rows)
    return ReproduceReport(rows=rows, table=table, markdown_path=markdown_path, json_path=json_path)


def _write_json(out: Path, options: ReproduceOptions, budgets: list[float], rows: Sequence[MethodRow]) -> Path:
    """``out/reproduce.json``: the options, every row's runs with their full evaluation results, the paper's."""
    json_path = out / "reproduce.json"
    write_text_atomic(
        json_path,
        json.dumps(
            {
                "preset": options.preset,
                "kimg": options.kimg,
                "at_kimg": budgets,
                "seed": options.seed,
                "seeds": options.seeds,
                "overrides": list(options.overrides),
                "rows": [
                    {
                        "method": row.method,
                        "num_classes": row.num_classes,
                        "kimg": row.kimg,
                        "runs": [run.to_dict() for run in row.runs],
                    }
                    for row in rows
                ],
                "paper": PAPER,
            },
            indent=2,
        )
        + "\n",
    )
    return json_path


def _train_and_evaluate(
    cfg: Config,
    method: str,
    seed: int,
    budgets: Sequence[float],
    metrics: Sequence[str],
    evaluation: EvalOptions,
    log: Callable[[str], None],
) -> list[SeedRun]:
    """Train one method from one seed, then evaluate its checkpoint at each budget."""
    log(f"== {method}, seed {seed}: training {cfg.run.kimg:g} kimg")
    result = train(cfg, log=log)
    ticks = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    ticks = [t for t in ticks if "event" not in t]
    checkpoints = sorted(result.run_dir.glob("checkpoint-*.pt"))
    runs = []
    for kimg in budgets:  # the checkpoint of the first step at or past the budget
        checkpoint = next(p for p in checkpoints if checkpoint_images(p) >= round(kimg * 1000))
        log(f"== {method}, seed {seed}: evaluating {checkpoint}")
        start = time.perf_counter()
        report = evaluate(checkpoint, metrics, evaluation, log=log)
        seconds = _train_seconds(ticks, checkpoint_images(checkpoint) / 1000)
        runs.append(
            SeedRun(
                seed=seed,
                kimg=kimg,
                run_dir=result.run_dir,
                checkpoint=checkpoint,
                images_per_second=kimg * 1000 / seconds,
                train_seconds=seconds,
                eval_seconds=time.perf_counter() - start,
                results=report.results,
            )
        )
    return runs


def _train_seconds(ticks: list[dict[str, Any]], kimg: float) -> float:
    """Seconds of training to ``kimg``: each tick's images over its rate (snapshots and evaluations excluded)."""
    seconds, previous = 0.0, 0.0
    for tick in ticks:
        if tick["kimg"] > kimg + 1e-9:
            break
        seconds += (tick["kimg"] - previous) * 1000 / tick["images_per_s"]
        previous = tick["kimg"]
    return seconds
