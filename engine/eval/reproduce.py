"""``gali reproduce``: ALI, ALICE, GALI-4, GALI-8 and GALI-mix at one budget, one table.

Each method is its tuple spec (``engine/method/tuples/``) on the same preset (the demo digits by default;
any data set through ``data.*`` overrides), trained with :func:`gali.engine.loop.train.train` for the same
number of kimg from the same seeds, then evaluated by :func:`gali.engine.eval.protocol.evaluate` on the
held-out split: the reconstructions' identity accuracy, reconstruction pixel-MSE, linear-probe error
and, when Inception weights are given, FID. With one seed a cell's ± is the std over test batches
(the paper's); with ``seeds`` > 1 it is the std over seeds of each seed's figure. The paper's
numbers (docs/method.md §4.2) stand beside ours for reference; they are for SVHN and CelebA at the
authors' full budgets, so only the ordering of the methods can be compared.
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
from gali.engine.files import write_text_atomic
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
    seed, seeds: each method is trained from seeds ``seed .. seed + seeds − 1``.
    overrides: ``section.key=value`` applied to every method (e.g. ``data.source=folder data.root=...``);
               the keys in :data:`RESERVED_KEYS` are set by the options above and may not be overridden.
    evaluation: settings of the evaluation (its seed is replaced by ``seed``).
    """

    preset: str = "demo"
    kimg: float = DEFAULT_KIMG
    methods: Sequence[str] = METHODS
    seed: int = 0
    seeds: int = 1
    out_dir: str = "runs/reproduce"
    overrides: Sequence[str] = ()
    evaluation: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class SeedRun:
    """One method trained from one seed: its training figures and evaluation results."""

    seed: int
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
    """One method's line of the table: its runs, one per seed."""

    method: str
    num_classes: int
    runs: list[SeedRun]

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


def split_method(method: str) -> tuple[str, str] | None:
    """``'gali4+minimax'`` -> ``('gali4', 'minimax')``, ``'ali'`` -> ``('ali', 'product')``; None if unknown."""
    spec, _, objective = method.partition("+")
    objective = objective or "product"
    return (spec, objective) if spec in spec_names() and objective in OBJECTIVES else None


def reproduce_table(rows: Sequence[MethodRow], *, header: str) -> str:
    """A Markdown table of ``rows`` with the paper's numbers beside them, under ``header``."""
    lines = [
        header,
        "",
        "| method | K | train img/s | identity | pixel-MSE | probe error (%) | FID | paper pixel-MSE (SVHN) "
        "| paper probe error (%) (SVHN) | paper FID (CelebA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER.get(row.method, NOT_IN_PAPER)
        speed = np.mean([run.images_per_second for run in row.runs])
        lines.append(
            f"| {row.method} | {row.num_classes} | {speed:.0f} | {row.cell('recon-identity', 'accuracy', digits=3)} "
            f"| {row.cell('pixel-mse')} | {row.cell('probe', scale=100, digits=2)} "
            f"| {row.cell('fid', 'value', digits=2)} | {paper['pixel_mse']} | {paper['probe']} | {paper['fid']} |"
        )
    return "\n".join([*lines, "", PAPER_NOTE])


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
    metrics = ["recon-identity", "pixel-mse", "probe"] + (["fid"] if options.evaluation.inception else [])
    rows: list[MethodRow] = []
    for method in options.methods:
        runs = []
        for seed in range(options.seed, options.seed + options.seeds):
            spec, objective = split_method(method)
            cfg = load_config(
                options.preset,
                [
                    f"run.snapshot_kimg={options.kimg}",
                    *options.overrides,
                    f"method.tuples={spec}",
                    f"method.objective={objective}",
                    f"run.kimg={options.kimg}",
                    f"run.seed={seed}",
                    f"run.out_dir={out / method / f'seed{seed}'}",
                ],
            )
            runs.append(_train_and_evaluate(cfg, method, seed, metrics, replace(options.evaluation, seed=seed), log))
        rows.append(MethodRow(method=method, num_classes=load_spec(cfg.method.tuples).num_classes, runs=runs))
    table = reproduce_table(rows, header=_header(options, cfg.data, rows))
    out.mkdir(parents=True, exist_ok=True)
    markdown_path = out / "reproduce.md"
    write_text_atomic(markdown_path, table + "\n")
    json_path = out / "reproduce.json"
    write_text_atomic(
        json_path,
        json.dumps(
            {
                "preset": options.preset,
                "kimg": options.kimg,
                "seed": options.seed,
                "seeds": options.seeds,
                "overrides": list(options.overrides),
                "rows": [
                    {"method": row.method, "num_classes": row.num_classes, "runs": [run.to_dict() for run in row.runs]}
                    for row in rows
                ],
                "paper": PAPER,
            },
            indent=2,
        )
        + "\n",
    )
    return ReproduceReport(rows=rows, table=table, markdown_path=markdown_path, json_path=json_path)


def _train_and_evaluate(
    cfg: Config, method: str, seed: int, metrics: Sequence[str], evaluation: EvalOptions, log: Callable[[str], None]
) -> SeedRun:
    """Train one method from one seed, then evaluate its last checkpoint."""
    log(f"== {method}, seed {seed}: training {cfg.run.kimg:g} kimg")
    start = time.perf_counter()
    result = train(cfg, log=log)
    train_seconds = time.perf_counter() - start
    checkpoint = sorted(result.run_dir.glob("checkpoint-*.pt"))[-1]
    log(f"== {method}, seed {seed}: evaluating {checkpoint}")
    start = time.perf_counter()
    report = evaluate(checkpoint, metrics, evaluation, log=log)
    return SeedRun(
        seed=seed,
        run_dir=result.run_dir,
        checkpoint=checkpoint,
        images_per_second=result.images_per_second,
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - start,
        results=report.results,
    )
