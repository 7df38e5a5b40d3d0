"""A recipe sweep on the demo digits: does E learn to encode, under which recipe, by how many kimg?

Each (recipe, method, seed) is one ``gali train`` run (the ``demo`` preset plus the recipe's overrides) in its own
process (``OMP_NUM_THREADS`` as the caller sets it), into ``OUT/<recipe>/<method>/seed<S>``; a run whose folder already
ends with the final snapshot is skipped, so an interrupted sweep resumes. The snapshots' held-out records
(``gali.engine.loop.snapshots``) are the data; ``report`` makes Markdown tables (mean ± std over seeds) and plots.

    OMP_NUM_THREADS=1 python bench/sweep_digits.py run --recipes demo,lr2e-4 --methods ali,gali4 \\
        --seeds 0,1,2 --kimg 40 --out /tmp/sweep
    python bench/sweep_digits.py report --out /tmp/sweep --markdown bench/reports/X.md --plot bench/reports/X.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# Named recipes: overrides of the demo preset. "demo" is the preset as shipped; the rest start from BASE.
BASE = ["model.width=0.25", "model.latent_dim=16", "optim.lr=2e-4", "run.snapshot_bn_recalibrate=10"]
RECIPES: dict[str, list[str]] = {
    "demo": [],
    "base": BASE,
    "ema2": [*BASE, "run.ema_kimg=2"],
    "lr-ge4e-4": [*BASE, "optim.lr_ge=4e-4"],
    "lr-d1e-4": [*BASE, "optim.lr_d=1e-4"],
    "beta0": [*BASE, "optim.beta1=0"],
    "z8": [*BASE, "model.latent_dim=8"],
    "noise0": [*BASE, "method.instance_noise=0"],
    "lr1e-4": [*BASE, "optim.lr=1e-4"],
    "b16": [*BASE, "run.batch_size=16"],
    "z4": [*BASE, "model.latent_dim=4"],
    "z8-lr3e-4": [*BASE, "model.latent_dim=8", "optim.lr=3e-4"],
    "z8-b16": [*BASE, "model.latent_dim=8", "run.batch_size=16"],
    "z8-lr-ge4e-4": [*BASE, "model.latent_dim=8", "optim.lr_ge=4e-4"],
    "z8-w0125": [*BASE, "model.latent_dim=8", "model.width=0.125"],
    "z8-noise0": [*BASE, "model.latent_dim=8", "method.instance_noise=0"],
    "z4-lr-ge4e-4": [*BASE, "model.latent_dim=4", "optim.lr_ge=4e-4"],
    "z8-lr-d1e-4-ge4e-4": [*BASE, "model.latent_dim=8", "optim.lr_d=1e-4", "optim.lr_ge=4e-4"],
    "z8-lr-ge6e-4": [*BASE, "model.latent_dim=8", "optim.lr_ge=6e-4"],
    "z8-lr-ge4e-4-ema4": [*BASE, "model.latent_dim=8", "optim.lr_ge=4e-4", "run.ema_kimg=4"],
    # batch 64 trains about 1.2x more images per second than 32 on the 2-core CPU: 100 kimg in the demo's time
    "demo-b64": ["run.batch_size=64"],
    "demo-b64-lr1.5": ["run.batch_size=64", "optim.lr=3e-4", "optim.lr_ge=6e-4"],
    "demo-lr-ge6e-4": ["optim.lr_ge=6e-4"],
    "demo-noise0": ["method.instance_noise=0"],
}
SPLIT = "test"  # the snapshot record's keys end with the held-out split: identity_test, ...


def run_folder(out: Path, recipe: str, method: str, seed: int) -> Path:
    return out / recipe / method / f"seed{seed}"


def snapshots(folder: Path) -> list[dict]:
    """The snapshot records of the run under ``folder`` (its one numbered run folder), oldest first."""
    logs = sorted(folder.glob("*/metrics.jsonl"))
    if not logs:
        return []
    records = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "snapshot"]


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for recipe in args.recipes.split(","):
        overrides = RECIPES[recipe]
        for seed in map(int, args.seeds.split(",")):
            for method in args.methods.split(","):
                folder = run_folder(out, recipe, method, seed)
                done = snapshots(folder)
                if done and done[-1]["kimg"] >= args.kimg:
                    continue
                if folder.exists():  # an interrupted run: start it again from scratch
                    subprocess.run(["rm", "-rf", str(folder)], check=True)
                command = [
                    sys.executable,
                    "-m",
                    "gali",
                    "train",
                    "--preset",
                    "demo",
                    *overrides,
                    f"method.tuples={method}",
                    f"run.seed={seed}",
                    f"run.kimg={args.kimg}",
                    f"run.snapshot_kimg={args.snapshot_kimg}",
                    f"run.tick_kimg={args.snapshot_kimg}",
                    f"run.out_dir={folder}",
                    "run.progress=lines",
                    "run.tensorboard=off",
                    "run.keep_checkpoints=1",
                ]
                start = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                last = snapshots(folder)[-1:] or [{}]
                print(
                    f"{recipe} {method} seed {seed}: {seconds:.0f} s, rc {result.returncode}, last snapshot "
                    f"{json.dumps(last[0])}",
                    flush=True,
                )
                if result.returncode:
                    print(result.stderr[-2000:], flush=True)


def collect(out: Path) -> dict[tuple[str, str], dict[float, list[dict]]]:
    """{(recipe, method): {kimg: [snapshot record per seed]}} of every run under ``out``."""
    table: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for log in sorted(out.glob("*/*/seed*/*/metrics.jsonl")):
        recipe, method = log.parts[-5], log.parts[-4]
        for record in snapshots(log.parent.parent):
            table[recipe, method][round(record["kimg"])].append(record)
    return table


def _value(records: list[dict], key: str) -> tuple[float, float, int]:
    """Mean, std and count over seeds of the snapshot figure ``key`` (``identity``, ``recon_mse_bn_recal``, ...)."""
    values = [r[f"{key}_{SPLIT}"] for r in records if f"{key}_{SPLIT}" in r]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def report(args: argparse.Namespace) -> None:
    table = collect(Path(args.out))
    columns = (
        "identity",
        "identity_bn_recal",
        "identity_nearest",
        "recon_mse",
        "recon_mse_bn_recal",
        "e_sigma",
        "e_mu_spread",
    )
    lines = [
        "| recipe | method | kimg | seeds | identity | identity, BN recal. | nearest | pixel-MSE "
        "| pixel-MSE, BN recal. | E σ | μ spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (recipe, method), by_kimg in sorted(table.items()):
        for kimg in sorted(by_kimg):
            records = by_kimg[kimg]
            cells = []
            for key in columns:
                mean, std, n = _value(records, key)
                cells.append("—" if not n else f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
            lines.append(f"| {recipe} | {method} | {kimg} | {len(records)} | {' | '.join(cells)} |")
    lines += [
        "",
        "BatchNorm statistics: identity with the statistics recomputed on "
        "real images minus identity with the running statistics of training, per snapshot",
        "",
        "| recipe | method | snapshots | mean difference | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for (recipe, method), by_kimg in sorted(table.items()):
        differences = [
            r[f"identity_bn_recal_{SPLIT}"] - r[f"identity_{SPLIT}"]
            for records in by_kimg.values()
            for r in records
            if f"identity_bn_recal_{SPLIT}" in r
        ]
        if differences:
            lines.append(
                f"| {recipe} | {method} | {len(differences)} | {np.mean(differences):+.3f} "
                f"| {min(differences):+.3f} | {max(differences):+.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        _plot(table, Path(args.plot))


def _plot(table: dict[tuple[str, str], dict[float, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (recipe, method), by_kimg in sorted(table.items()):
        kimgs = sorted(by_kimg)
        for axis, key in ((left, "identity"), (right, "recon_mse")):
            stats = [_value(by_kimg[k], key) for k in kimgs]
            means, stds = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            (line,) = axis.plot(
                kimgs, means, marker="o", ms=3, label=f"{recipe} {method}", linestyle="-" if method == "gali4" else "--"
            )
            axis.fill_between(kimgs, means - stds, means + stds, color=line.get_color(), alpha=0.15)
    left.set(xlabel="kimg", ylabel="identity accuracy of reconstructions (test)", ylim=(0, 1))
    right.set(xlabel="kimg", ylabel="pixel-MSE of reconstructions (test)")
    left.axhline(0.8, color="grey", lw=0.8, ls=":")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--recipes", default="demo")
    r.add_argument("--methods", default="ali,gali4")
    r.add_argument("--seeds", default="0")
    r.add_argument("--kimg", type=float, default=40)
    r.add_argument("--snapshot-kimg", type=float, default=5)
    r.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--plot")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
