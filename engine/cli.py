"""The ``gali`` command: train, sample, reconstruct, presets, data tools, eval, reproduce.

gali train [--preset NAME|FILE.toml] [--dry-run] [section.key=value ...]
gali train --resume RUN_DIR|CHECKPOINT [section.key=value ...]
gali profile|info [--preset NAME|FILE.toml] [--steps 20 (profile only)] [section.key=value ...]
gali sample|reconstruct CHECKPOINT [--out FILE.png] [--n 64|16] [--seed 0] [--split test (reconstruct only)]
gali presets;  gali data check|stats ROOT [--workers N]
gali data prepare SRC DST --resolution R|--preset NAME --shards N [--format jpeg|png] [--workers N] [--seed 0]
gali eval CHECKPOINT [data.key=value ...] [--metrics pixel-mse,feature-mse,recon-identity,probe,fid,kid,inpaint] ...
gali reproduce [--preset demo] [--kimg K] [--at-kimg K1,K2] [--seeds N] [--methods ali,alice,gali4,...] ...
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

import torch

from gali.engine.errors import GaliError
from gali.engine.loop.config import dump_config, load_config, load_draft_config, preset_names
from gali.engine.loop.signals import RunStopped
from gali.engine.method.tuple_spec import spec_names

OUT_HELP = "image path, its extension names the format: .png, .jpg, ... (default: a PNG next to the checkpoint)"
LIVE_HELP = "use the live weights of G and E, not the moving averages the checkpoint holds (run.ema_kimg > 0)"


def _not_a_config(path: str, what: str, instead: str) -> None:
    """Refuse a config file given where a checkpoint (or a run folder) is read, saying what to pass."""
    if Path(path).suffix == ".toml":
        raise GaliError(f"{what}: {path} is a config file, not a checkpoint; {instead}")


def _checkpoint_argument(path: str, command: str) -> None:
    """CHECKPOINT of sample, reconstruct and eval: a config file is named as such, with what to give."""
    folder = Path(path).parent
    found = sorted(folder.glob("checkpoint-*.pt"))
    example = f"e.g. {found[-1]}, the newest in its folder" if found else "a run's checkpoint-*.pt"
    _not_a_config(path, f"gali {command}", f"give a checkpoint file ({example})")


def _train(args: argparse.Namespace) -> None:
    if args.resume is not None:
        if args.preset is not None or args.dry_run:
            raise GaliError(
                "gali train --resume takes the config from the checkpoint: drop --preset/--dry-run "
                "and give section.key=value overrides only (e.g. run.kimg=200 to train longer)"
            )
        _not_a_config(
            args.resume,
            "gali train --resume",
            f"give its run folder ({Path(args.resume).parent}: the newest readable checkpoint-*.pt there is "
            f"taken) or one of its checkpoint-*.pt; a new run from this config is gali train --preset {args.resume}",
        )
        from gali.engine.loop.train import resume

        resume(args.resume, args.overrides)
        return
    if args.dry_run:
        cfg, missing = load_draft_config(args.preset or "demo", args.overrides)
        print(dump_config(cfg, missing), end="")
        for key, why in missing.items():
            print(f"gali: {key} is not set (marked MISSING above); training refuses it: {why}", file=sys.stderr)
        return
    cfg = load_config(args.preset or "demo", args.overrides)
    from gali.engine.loop.train import resume, train

    if cfg.run.dir and any(Path(cfg.run.dir).glob("checkpoint-*.pt")):  # a restart: the same command line resumes
        resume(cfg.run.dir, args.overrides)
        return
    train(cfg)


def _profile(args: argparse.Namespace) -> None:
    from gali.engine.loop.profile import nsys_command, profile_training

    cfg = load_config(args.preset, args.overrides)
    images = args.steps * cfg.run.batch_size
    cfg.run.kimg = cfg.run.tick_kimg = cfg.run.snapshot_kimg = images / 1000
    trace = profile_training(cfg)
    print(f"wrote the torch.profiler trace of {args.steps} steps to {trace} (open it in https://ui.perfetto.dev)")
    overrides = [*args.overrides, f"run.kimg={images / 1000:g}"]
    print("on a GPU machine, record the same run in Nsight Systems with:")
    print("  " + nsys_command(args.preset, overrides, str(trace.parent / "gali")))


def _info(args: argparse.Namespace) -> None:
    from gali.engine.loop.info import describe
    from gali.engine.loop.plan import GPUS

    if args.gpu is not None and args.gpu not in GPUS:
        raise GaliError(f"gali info --gpu: got {args.gpu!r}; the plan knows {', '.join(GPUS)}")
    if args.gpus != 1 and args.gpu is None:
        raise GaliError("gali info --gpus N plans a run on N GPUs of a kind: name it with --gpu (e.g. --gpu h100)")
    # It reads no image: a preset whose data.root is not set here is sized all the same.
    print(describe(load_config(args.preset, ["data.backend=synthetic", *args.overrides]), args.gpus, args.gpu))


# The image formats --out writes, by extension (those Pillow can write here are offered).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF"}


def _image_out(out: str | None, default: Path) -> tuple[Path, str]:
    """``--out`` (or ``default``) and the format its extension names; refused before any work when its folder does
    not exist or the extension names no format written here."""
    from PIL import Image

    path = Path(out) if out else default
    Image.init()  # every plugin registered: Image.SAVE lists the formats this Pillow writes
    formats = {ext: f for ext, f in IMAGE_FORMATS.items() if f in Image.SAVE}
    if path.suffix.lower() not in formats:
        raise GaliError(
            f"--out {path}: the extension names the image format, and {path.suffix or 'no extension'!r} is none "
            f"written here; use one of {', '.join(formats)}"
        )
    if not path.parent.is_dir():
        raise GaliError(f"--out {path}: folder {path.parent} does not exist; create it or give another path")
    return path, formats[path.suffix.lower()]


def _sample(args: argparse.Namespace) -> None:
    from gali.engine.loop.checkpoint import load_networks
    from gali.engine.loop.grids import save_image, tile
    from gali.engine.loop.runtime import resolve_device
    from gali.engine.nets.inference import sample_images

    _checkpoint_argument(args.checkpoint, "sample")
    out, image_format = _image_out(args.out, Path(args.checkpoint).with_suffix(".samples.png"))
    device = resolve_device("auto")
    cfg, nets, _ = load_networks(args.checkpoint, device, ema=not args.live)
    z = torch.randn(args.n, cfg.model.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    columns = math.ceil(math.sqrt(args.n))
    classes = cfg.model.label_classes  # a class-conditional G draws class i % C in row i
    labels = torch.arange(args.n, device=device) // columns % classes if classes else None
    save_image(tile(sample_images(nets.G, z, labels), columns=columns), out, image_format)
    print(f"wrote {args.n} samples to {out}")


def _reconstruct(args: argparse.Namespace) -> None:
    from gali.engine.loop.checkpoint import load_networks
    from gali.engine.loop.grids import reconstruction_grid, save_image
    from gali.engine.loop.runtime import resolve_device
    from gali.pipelines import make_pipeline

    _checkpoint_argument(args.checkpoint, "reconstruct")
    out, image_format = _image_out(args.out, Path(args.checkpoint).with_suffix(".reconstructions.png"))
    device = resolve_device("auto")
    cfg, nets, _ = load_networks(args.checkpoint, device, ema=not args.live)
    pipeline = make_pipeline(cfg.data, split=args.split, batch_size=args.n, device=device, seed=args.seed)
    batch = next(iter(pipeline))
    grid = reconstruction_grid(nets.G, nets.E, batch.x, batch.labels if cfg.model.label_classes else None)
    save_image(grid, out, image_format)
    print(f"wrote rows x, G(E(x)), G(E(G(E(x)))) of {args.n} {args.split} images to {out}")


def _presets(args: argparse.Namespace) -> None:
    print("presets:     " + ", ".join(preset_names()))
    print("tuple specs: " + ", ".join(spec_names()))


def _data_check(args: argparse.Namespace) -> int:
    from gali.pipelines.tools import check_images

    report = check_images(args.root, args.workers)
    for name, reason in report.bad:
        print(f"bad: {name}: {reason}")
    print(f"checked {report.checked} files, {len(report.bad)} bad")
    return 1 if report.bad else 0


def _data_prepare(args: argparse.Namespace) -> None:
    from gali.pipelines.tools import prepare_shards

    resolution = args.resolution
    if resolution is None:
        if args.preset is None:
            raise GaliError("gali data prepare: give --resolution R, or --preset NAME to take the preset's")
        resolution = load_draft_config(args.preset)[0].data.resolution
    written = prepare_shards(
        args.src,
        args.dst,
        resolution=resolution,
        shards=args.shards,
        workers=args.workers,
        image_format=args.format,
        seed=args.seed,
        progress=True,
    )
    for split, done in written.items():
        counts = done.class_counts.values()
        origin = f" (from {done.source_split}/)" if done.source_split != split else ""
        print(
            f"{split}: {done.images} images in {len(done.shards)} shards under {Path(args.dst) / split}{origin}; "
            f"{len(counts)} classes, {min(counts)} to {max(counts)} images each; {resolution}x{resolution}; "
            f"{len(done.shards) - done.reused} shards written, {done.reused} already written and verified"
        )
        for line in done.rewritten:
            print(f"  {line}")
        if done.unreadable:
            print(f"  {len(done.unreadable)} of {done.source_images} images unreadable, left out:")
            for name, reason in done.unreadable:
                print(f"    {name}: {reason}")


def _data_stats(args: argparse.Namespace) -> None:
    from gali.pipelines.tools import dataset_stats

    source, stats = dataset_stats(args.root, args.workers)
    print(f"{args.root}: source layout '{source}'")
    for split, s in stats.items():
        total = sum(s.class_counts.values())
        print(f"{split}: {total} images, {len(s.class_counts)} classes")
        width = max(len(name) for name in s.class_counts)
        for name, count in s.class_counts.items():
            print(f"  {name:<{width}}  {count}")
        print(f"  image sizes (width x height), {s.unreadable} unreadable:")
        for (w, h), count in sorted(s.sizes.items()):
            print(f"    {w}-{2 * w - 1} x {h}-{2 * h - 1}: {count}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _kimg_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated kimg such as 20,40; got {text!r}") from None


def _native_build(args: argparse.Namespace) -> None:
    from gali.pipelines.native import build

    library = build(force=args.force, log=print)
    print(f"DALI masks plugin: {library}")


def _add_native_commands(commands: argparse._SubParsersAction) -> None:
    native = commands.add_parser("native", help="the native DALI masks operator (pipelines/native)")
    native.set_defaults(func=_usage(native))
    tools = native.add_subparsers(dest="native_command", title="commands")
    build = tools.add_parser(
        "build",
        help="build the plugin into the cache (CMake, the C++ compiler, nvcc if found) "
        "and print where; pipelines build it on first use anyway",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if this DALI's build exists")
    build.set_defaults(func=_native_build)


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The command of a group given without a subcommand: its help, which lists the subcommands, and exit 2."""

    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        print(f"\n{parser.prog}: error: name one of the commands above", file=sys.stderr)
        return 2

    return show


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check, prepare and describe data sets (any source layout)")
    data.set_defaults(func=_usage(data))
    tools = data.add_subparsers(dest="data_command", title="commands")
    workers = {"type": _positive, "default": None, "help": "decoding threads (default: one per CPU core)"}

    check = tools.add_parser("check", help="decode every image fully; list the unreadable ones (exit 1 if any)")
    check.add_argument("root", help="image folder, filelist folder or .txt, or shard folder")
    check.add_argument("--workers", **workers)
    check.set_defaults(func=_data_check)

    prepare = tools.add_parser(
        "prepare", help="resize once and write WebDataset tar shards (resumable; train/ + val/ as ImageNet's)"
    )
    prepare.add_argument("src", help="image folder (train/<class>/ + test/ or val/, or any source layout) to read")
    prepare.add_argument(
        "dst",
        help="new or empty folder for train/*.tar, test/*.tar, classes.txt and prepare.json; "
        "or the folder of an interrupted prepare of the same source and options, which is resumed",
    )
    prepare.add_argument(
        "--resolution", type=_positive, help="center square crop, resized to R×R (antialiased bilinear)"
    )
    prepare.add_argument("--preset", help="take the resolution from this preset's data.resolution")
    prepare.add_argument("--shards", type=_positive, required=True, help="shards per split")
    prepare.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="JPEG (quality 95) or PNG")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the order of images in the shards")
    prepare.add_argument("--workers", **workers)
    prepare.set_defaults(func=_data_prepare)

    stats = tools.add_parser("stats", help="images per class and a histogram of image sizes")
    stats.add_argument("root", help="image folder, filelist folder or .txt, or shard folder")
    stats.add_argument("--workers", **workers)
    stats.set_defaults(func=_data_stats)


def _eval_options(args: argparse.Namespace, data_overrides: Sequence[str] = ()):
    """The evaluation settings shared by ``gali eval`` and ``gali reproduce``."""
    from gali.engine.eval.protocol import EvalOptions

    return EvalOptions(
        batch_size=args.batch_size,
        seed=args.seed,
        data_overrides=tuple(data_overrides),
        probe_labelled=args.probe_labelled,
        probe_validation=args.probe_validation,
        probe_draws=args.probe_draws,
        probe_pool=args.probe_pool,
        probe_logistic_images=args.probe_logistic_images,
        probe_logistic_validation=args.probe_logistic_validation,
        probe_logistic_epochs=args.probe_logistic_epochs,
        inception=args.inception,
        inception_input_size=args.inception_input_size,
        fid_samples=args.fid_samples,
        fid_reference_images=args.fid_reference_images,
        cache_dir=args.fid_cache,
        identity_images=args.identity_images,
        bn_recalibrate=args.bn_recalibrate,
    )


def _check_feature_model(args: argparse.Namespace) -> None:
    """--feature-model and --feature-arch agree, or are refused naming the options typed."""
    from gali.engine.nets.feature_models import FEATURE_ARCHS, _is_torchscript

    path = Path(args.feature_model).expanduser() if args.feature_model else None
    if path is None:
        if args.feature_arch:
            raise GaliError(
                "--feature-arch names the architecture of a state-dict --feature-model; give --feature-model"
            )
        return
    if not path.is_file():
        return  # evaluate() says so, before any work
    if _is_torchscript(path) and args.feature_arch:
        raise GaliError(
            f"--feature-arch {args.feature_arch}: --feature-model {path} is a TorchScript file, which carries its own "
            "architecture; drop --feature-arch (it is for a state-dict --feature-model)"
        )
    if not _is_torchscript(path) and not args.feature_arch:
        raise GaliError(
            f"--feature-model {path} is a state dict, not a TorchScript file, so its architecture must be named: "
            f"add --feature-arch {' or '.join(FEATURE_ARCHS)}"
        )


def _eval(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from gali.engine.eval.protocol import evaluate

    _checkpoint_argument(args.checkpoint, "eval")
    _check_feature_model(args)
    options = replace(
        _eval_options(args, args.overrides),
        split=args.split,
        feature_model=args.feature_model,
        feature_arch=args.feature_arch,
        feature_input_size=args.feature_input_size,
        feature_resize=args.feature_resize,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        ema=not args.live,
    )
    report = evaluate(args.checkpoint, args.metrics, options)
    if report.rank:  # torchrun -m gali eval: rank 0 alone prints the table and writes the JSON
        return
    print(report.table)
    print(f"wrote {report.json_path}")
    report.check_finite()  # a NaN or infinite figure: exit 2 with a message, after the table and the JSON


def _reproduce(args: argparse.Namespace) -> None:
    from gali.engine.eval.reproduce import ReproduceOptions, reproduce

    budget = {} if args.kimg is None else {"kimg": args.kimg}
    options = ReproduceOptions(
        **budget,
        preset=args.preset,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        at_kimg=tuple(args.at_kimg),
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        seed=args.seed,
        seeds=args.seeds,
        out_dir=args.out_dir,
        overrides=tuple(args.overrides),
        evaluation=_eval_options(args),
    )
    report = reproduce(options)
    print(report.table)
    print(f"wrote {report.markdown_path} and {report.json_path}")


def _add_eval_options(parser: argparse.ArgumentParser, *, batch_help: str) -> None:
    """Options of the evaluation protocol (docs/method.md §4.1) common to eval and reproduce."""
    parser.add_argument("--batch-size", type=_positive, default=100, help=batch_help)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data order, masks, probe draws and z (reproduce: and of training)",
    )
    parser.add_argument("--probe-labelled", type=_positive, default=1000, help="labelled images per SVM")
    parser.add_argument(
        "--probe-validation",
        type=_positive,
        default=None,
        help="validation images for choosing C (default min(10000, (N - labelled) / 2))",
    )
    parser.add_argument("--probe-draws", type=_positive, default=100, help="random labelled sets (SVMs) averaged")
    parser.add_argument("--probe-pool", type=_positive, default=20_000, help="most training images read for the probe")
    parser.add_argument(
        "--probe-logistic-images",
        type=_positive,
        default=None,
        help="most training images probe-logistic reads (default: the whole training split)",
    )
    parser.add_argument(
        "--probe-logistic-validation",
        type=_positive,
        default=None,
        help="training images probe-logistic holds out to choose its L2 weight (default min(10000, N / 10))",
    )
    parser.add_argument(
        "--probe-logistic-epochs", type=_positive, default=30, help="SGD epochs of each probe-logistic fit"
    )
    parser.add_argument(
        "--identity-images",
        type=_positive,
        default=20_000,
        help="most training images the recon-identity classifier is fitted on",
    )
    parser.add_argument(
        "--bn-recalibrate",
        type=int,
        default=0,
        metavar="N",
        help="recompute E's and G's BatchNorm statistics on N training batches first (E on x, "
        "G on mu_E(x)); 0 keeps the checkpoint's",
    )
    parser.add_argument(
        "--inception",
        help="local TorchScript Inception for FID/KID (clean-fid/StyleGAN3 "
        "inception-2015-12-05.pt, or forward(x) -> (N, D)); never downloaded",
    )
    parser.add_argument("--inception-input-size", type=_positive, default=299, help="side images are resized to")
    parser.add_argument("--fid-samples", type=_positive, default=10_000, help="generated images for FID/KID")
    parser.add_argument(
        "--fid-reference-images", type=_positive, default=50_000, help="most real images of the split for FID/KID"
    )
    parser.add_argument(
        "--fid-cache",
        help="folder of cached reference features, FID/KID's and probe-logistic's (default $GALI_CACHE/fid)",
    )


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    from gali.engine.eval.protocol import METRICS  # scikit-learn and torchmetrics load only when used
    from gali.engine.eval.reproduce import METRICS as REPRODUCE_METRICS
    from gali.engine.method.losses import OBJECTIVES
    from gali.engine.nets.feature_models import FEATURE_ARCHS

    evaluation = commands.add_parser(
        "eval",
        help="evaluate a checkpoint: table on stdout, JSON next to it",
        epilog="metrics: " + "; ".join(f"{name}: {what}" for name, what in METRICS.items()),
    )
    evaluation.add_argument("checkpoint")
    evaluation.add_argument(
        "--metrics", default="pixel-mse", help=f"comma-separated, of {', '.join(METRICS)} (default: pixel-mse)"
    )
    evaluation.add_argument("--split", default="test", choices=("train", "test"))
    evaluation.add_argument(
        "--feature-model", help="frozen feature network for feature-MSE (TorchScript or state dict); never downloaded"
    )
    evaluation.add_argument(
        "--feature-arch",
        choices=tuple(FEATURE_ARCHS),
        help="architecture of a state-dict --feature-model (a TorchScript file carries its own)",
    )
    evaluation.add_argument("--feature-input-size", type=int, default=0, help="resize before it (0 = data resolution)")
    evaluation.add_argument("--feature-resize", choices=("nearest", "bilinear"), default="nearest")
    evaluation.add_argument("--live", action="store_true", help=LIVE_HELP)
    evaluation.add_argument("--kid-subsets", type=_positive, default=100)
    evaluation.add_argument("--kid-subset-size", type=_positive, default=1000)
    _add_eval_options(evaluation, batch_help="images per batch; the ± is over batches")
    evaluation.add_argument(
        "overrides", nargs="*", metavar="data.key=value", help="data settings of the evaluation: e.g. a moved data.root"
    )
    evaluation.set_defaults(func=_eval)

    repro = commands.add_parser("reproduce", help="train ALI, ALICE, GALI-4, GALI-8, GALI-mix at one budget; one table")
    repro.add_argument("--preset", default="demo", help="preset every method starts from")
    repro.add_argument(
        "--kimg",
        type=float,
        default=None,
        help="training budget per method (default: gali.engine.eval.reproduce.DEFAULT_KIMG, 8; "
        "the demo preset's own is 80)",
    )
    repro.add_argument(
        "--at-kimg",
        type=_kimg_list,
        default=(),
        help="comma-separated budgets below --kimg at which each run is evaluated too, e.g. 20,40 with --kimg 80",
    )
    repro.add_argument(
        "--metrics",
        default=",".join(REPRODUCE_METRICS),
        help="comma-separated gali eval metrics of each evaluation (fid is added with --inception)",
    )
    repro.add_argument(
        "--methods",
        default="ali,alice,gali4,gali8,gali-mix",
        help="comma-separated tuple specs (gali presets lists them), each optionally with +objective "
        f"({', '.join(OBJECTIVES)}; default product), e.g. gali4+minimax",
    )
    repro.add_argument(
        "--seeds",
        type=_positive,
        default=1,
        help="train each method from seeds --seed .. --seed+N-1; the table gives mean ± std over them",
    )
    repro.add_argument("--out-dir", default="runs/reproduce", help="run folders and reproduce.md/.json go here")
    _add_eval_options(
        repro,
        batch_help="images per batch of the evaluation only (the ± is over batches); each method trains with "
        "its preset's run.batch_size (an override run.batch_size=N changes it)",
    )
    repro.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="applied to every method, e.g. data.source=folder data.root=DIR",
    )
    repro.set_defaults(func=_reproduce)


def version_line() -> str:
    """``gali <version> (commit <sha>)``: the installed distribution's version and, from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("gali")
    except PackageNotFoundError:
        release = "unknown"
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"
    except OSError:  # no git
        commit = "unknown (no git)"
    return f"gali {release} (commit {commit})"


class _Parser(argparse.ArgumentParser):
    """A command's parser: its options and its ``section.key=value`` overrides may come in any order
    (``gali train --preset demo run.seed=1 --dry-run run.kimg=2``), as argparse's intermixed parsing reads them.
    A command with subcommands of its own (``gali data``) is parsed as usual."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        grouped = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._intermixing or grouped:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _PrintVersion(argparse.Action):
    """``--version``: asks git for the commit only when given."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gali", description="Train and use GALI models.")
    parser.add_argument("--version", nargs=0, action=_PrintVersion, help="print the version and the commit, and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train from a preset plus section.key=value overrides")
    train.add_argument("--preset", help="preset name (see `gali presets`) or a .toml file (default: demo)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR|CHECKPOINT",
        help="continue an interrupted run from its newest readable checkpoint, in its run folder",
    )
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.set_defaults(func=_train)

    profile = commands.add_parser(
        "profile",
        help="a short run with NVTX ranges under torch.profiler; writes trace.json and prints the nsys command",
    )
    profile.add_argument("--preset", default="demo", help="preset name or .toml path (default: demo)")
    profile.add_argument("--steps", type=_positive, default=20, help="training steps to record (default: 20)")
    profile.add_argument("overrides", nargs="*", help="section.key=value overrides")
    profile.set_defaults(func=_profile)

    info = commands.add_parser(
        "info",
        help="parameters per network, FLOPs and activation memory per training image: size a run before starting it",
    )
    info.add_argument("--preset", default="demo", help="preset name or .toml path (default: demo)")
    info.add_argument("--gpus", type=_positive, default=1, help="GPUs of the run plan (default: 1; needs --gpu)")
    info.add_argument(
        "--gpu", help="print a run plan on this GPU (h100, h200, b200, a100-80gb): the batch that fits, the time"
    )
    info.add_argument("overrides", nargs="*", help="section.key=value overrides")
    info.set_defaults(func=_info)

    sample = commands.add_parser("sample", help="a grid of G(z) from a checkpoint")
    sample.add_argument("checkpoint")
    sample.add_argument("--out", help=OUT_HELP)
    sample.add_argument("--n", type=_positive, default=64, help="images (default: 64)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--live", action="store_true", help=LIVE_HELP)
    sample.set_defaults(func=_sample)

    recon = commands.add_parser("reconstruct", help="x, G(E(x)), G(E(G(E(x)))) rows from a checkpoint")
    recon.add_argument("checkpoint")
    recon.add_argument("--out", help=OUT_HELP)
    recon.add_argument("--n", type=_positive, default=16, help="images of the split (default: 16)")
    recon.add_argument("--split", default="test", choices=("train", "test"))
    recon.add_argument("--seed", type=int, default=0)
    recon.add_argument("--live", action="store_true", help=LIVE_HELP)
    recon.set_defaults(func=_reconstruct)

    presets = commands.add_parser("presets", help="list presets and tuple specs")
    presets.set_defaults(func=_presets)

    _add_data_commands(commands)
    _add_native_commands(commands)
    _add_eval_commands(commands)
    return parser


def _gali_folders() -> tuple[str, ...]:
    """The folders of gali's own modules (as installed, or in the checkout of an editable install)."""
    names = ("gali", "gali.engine", "gali.kernels", "gali.pipelines")
    return tuple(os.path.join(folder, "") for name in names for folder in find_spec(name).submodule_search_locations)


def _warning_formatter(folders: tuple[str, ...], default: Callable[..., str]) -> Callable[..., str]:
    """``warnings.formatwarning`` for the command: gali's own warnings as ``gali: warning: ...``, without the
    internal source line; any other module's as Python prints them."""

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if os.path.abspath(filename).startswith(folders):
            return f"gali: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    default_format = warnings.formatwarning
    warnings.formatwarning = _warning_formatter(_gali_folders(), default_format)
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.func(args) or 0
        except RunStopped as exc:
            print(f"gali: {exc}", file=sys.stderr)
            return exc.exit_code
        except GaliError as exc:
            print(f"gali: error: {exc}", file=sys.stderr)
            return 2
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
