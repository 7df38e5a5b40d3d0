"""The ``gali`` command: train, sample, reconstruct, presets.

    gali train [--preset NAME|FILE.toml] [--dry-run] [section.key=value ...]
    gali sample CHECKPOINT [--out FILE.png] [--n 64] [--seed 0]
    gali reconstruct CHECKPOINT [--out FILE.png] [--n 16] [--split test]
    gali presets
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gali.engine.config import dump_config, load_config, preset_names
from gali.engine.errors import GaliError
from gali.engine.tuples import spec_names


def _train(args: argparse.Namespace) -> None:
    cfg = load_config(args.preset, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return
    from gali.engine.train import train

    train(cfg)


def _sample(args: argparse.Namespace) -> None:
    from gali.engine.images import sample_images, save_grid
    from gali.engine.train import load_generator_encoder, resolve_device

    device = resolve_device("auto")
    cfg, nets = load_generator_encoder(args.checkpoint, device)
    z = torch.randn(args.n, cfg.model.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out or Path(args.checkpoint).with_suffix(".samples.png"))
    save_grid(sample_images(nets.G, z), out, columns=math.ceil(math.sqrt(args.n)))
    print(f"wrote {args.n} samples to {out}")


def _reconstruct(args: argparse.Namespace) -> None:
    from gali.engine.images import save_reconstruction_grid
    from gali.engine.train import load_generator_encoder, resolve_device
    from gali.pipelines import make_pipeline

    device = resolve_device("auto")
    cfg, nets = load_generator_encoder(args.checkpoint, device)
    pipeline = make_pipeline(cfg.data, split=args.split, batch_size=args.n, device=device, seed=args.seed)
    x = next(iter(pipeline)).x
    out = Path(args.out or Path(args.checkpoint).with_suffix(".reconstructions.png"))
    save_reconstruction_grid(nets.G, nets.E, x, out)
    print(f"wrote rows x, G(E(x)), G(E(G(E(x)))) of {args.n} {args.split} images to {out}")


def _presets(args: argparse.Namespace) -> None:
    print("presets:     " + ", ".join(preset_names()))
    print("tuple specs: " + ", ".join(spec_names()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gali", description="Train and use GALI models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a preset plus section.key=value overrides")
    train.add_argument("--preset", default="demo", help="preset name (see `gali presets`) or a .toml file")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.set_defaults(func=_train)

    sample = commands.add_parser("sample", help="a grid of G(z) from a checkpoint")
    sample.add_argument("checkpoint")
    sample.add_argument("--out", help="PNG path (default: next to the checkpoint)")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample)

    recon = commands.add_parser("reconstruct", help="x, G(E(x)), G(E(G(E(x)))) rows from a checkpoint")
    recon.add_argument("checkpoint")
    recon.add_argument("--out", help="PNG path (default: next to the checkpoint)")
    recon.add_argument("--n", type=int, default=16)
    recon.add_argument("--split", default="test", choices=("train", "test"))
    recon.add_argument("--seed", type=int, default=0)
    recon.set_defaults(func=_reconstruct)

    presets = commands.add_parser("presets", help="list presets and tuple specs")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GaliError as exc:
        print(f"gali: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
